"""poelm import nanochat / export --format nanochat (poelm/trajectory/nanochat.py), against
checkpoints and a forward built here from the reference's facts (nanochat_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanochat_fixtures as fx
from poelm.train import checkpoint as ckpt_mod
from poelm.trajectory import nanochat

LAYERS = (2, 2)  # poe_every 2 over 4 layers


def cli(*args):
    """``poelm ARGS`` in this process (a subprocess per call costs a torch import each)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from poelm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanochat")
    tok = fx.tokenizer_json(root / "tokenizer")
    built = fx.write_folder(root / "base_checkpoints" / "d4", world=2)
    out = root / "imported"
    res = nanochat.import_nanochat(root / "base_checkpoints" / "d4", out, tokenizer=tok)
    return {"root": root, "dir": root / "base_checkpoints" / "d4", "tok": tok, "out": out, "ckpt": Path(res["path"]), "res": res, **built}


def ids_for(T=300, B=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, fx.V, (B, T), generator=g)


# ----------------------------------------------------------------------------- names and layout
def test_name_map_round_trips_every_reference_tensor():
    for name, _ in fx.ref_names():
        p = nanochat.to_poelm_name(name)
        assert p is not None and nanochat.to_ref_name(p) == name
    assert nanochat.to_poelm_name("transformer.h.0.attn.c_z.weight") is None
    assert nanochat.to_poelm_name("lm_head_stage.weight") is None  # dual-head specialist: not ours


def test_stage_layout_from_poe_every_and_given():
    assert nanochat.stage_layout({"n_layer": 10, "poe_every": 4}) == (4, 4, 2)
    assert nanochat.stage_layout({"n_layer": 32, "poe_every": 8}) == (8, 8, 8, 8)
    assert nanochat.stage_layout({"n_layer": 32, "poe_every": 8}, [16, 6, 5, 5]) == (16, 6, 5, 5)
    with pytest.raises(Exception, match="sum to 31"):
        nanochat.stage_layout({"n_layer": 32}, [16, 6, 5, 4])


# ----------------------------------------------------------------------------- import: weights
def test_import_keeps_weights_exactly_and_crops_padding(ref):
    ck = ckpt_mod.load(ref["ckpt"])
    w = ref["weights"]
    for name, t in ck.model_state.items():
        src = w[nanochat.to_ref_name(name)]
        assert t.dtype == torch.float32
        if nanochat.PADDED_RE.fullmatch(name):
            assert t.shape[0] == fx.V
            src = src[: fx.V]
        assert torch.equal(t, src.float()), name
    assert ck.config.model.stage_layers == LAYERS and ck.config.model.window_pattern == "SL"
    assert ck.config.optim.optimizer == "nanochat" and ck.step == 1200
    manifest = json.loads((ref["ckpt"] / "manifest.json").read_text())
    prov = manifest["provenance"]
    assert prov["step"] == 1200 and prov["world_size"] == 2
    assert set(prov["files"]) == {"model_001200.pt", "meta_001200.json", "optim_001200_rank0.pt", "optim_001200_rank1.pt"}
    from poelm.fsio import sha256_file

    assert prov["files"]["model_001200.pt"]["sha256"] == sha256_file(ref["dir"] / "model_001200.pt")


def test_stage_log_probs_match_the_reference_forward(ref):
    model, _, _ = ckpt_mod.load_model(ref["ckpt"])
    idx = ids_for()
    with torch.no_grad():
        want = fx.reference_stage_log_probs(ref["weights"], idx, LAYERS)
        got = model.stage_log_probs(idx)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_compiled_prefix_is_stripped(ref, tmp_path):
    fx.write_folder(tmp_path / "ref", world=0, prefixed=True)
    res = nanochat.import_nanochat(tmp_path / "ref", tmp_path / "out", tokenizer=ref["tok"])
    a = ckpt_mod.load(res["path"]).model_state
    b = ckpt_mod.load(ref["ckpt"]).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res["weights_only"]


# ----------------------------------------------------------------------------- import: optimizer
def test_optimizer_shards_written_by_hand_are_gathered(ref):
    ck = ckpt_mod.load(ref["ckpt"])
    full = ref["full_state"]
    seen = 0
    for key, t in ck.optim_tensors.items():
        pname, skey = key.rsplit("/", 1)
        src = full[nanochat.to_ref_name(pname)][skey]
        if nanochat.PADDED_RE.fullmatch(pname):
            src = src[: fx.V]
        assert torch.equal(t.reshape(src.shape), src), key
        seen += 1
    assert seen == sum(len([k for k in st if k != "step"]) for st in full.values())
    assert ck.optim_meta["params"]["wte.weight"]["step"] == 7


def test_module_scatter_equals_hand_sharding(ref):
    """wt-optim's scatter of the full state over 2 ranks == the shards written by hand here."""
    from poelm.train import optim_nanochat

    ck = ckpt_mod.load(ref["ckpt"])
    shapes = {nanochat.to_poelm_name(n): tuple(s) for n, s in fx.ref_names()}
    tensors = {f"{nanochat.to_poelm_name(n)}/{k}": v for n, st in ref["full_state"].items() for k, v in st.items() if k != "step"}
    meta = json.loads(json.dumps(ck.optim_meta))
    for n, rec in meta["params"].items():
        rec["shape"] = list(shapes[n])
    meta["groups"] = {g["name"]: meta["groups"][g["name"]] for g in optim_nanochat.reference_param_groups(shapes)}  # json sorted them
    by_module = optim_nanochat.scatter_reference_state(tensors, meta, shapes, world_size=2)
    by_hand = fx.shard_by_hand(ref["full_state"], 2)
    for r in range(2):
        a, b = by_module[r]["state"], by_hand[r]["state"]
        assert a.keys() == b.keys()
        for i in a:
            assert a[i].keys() == b[i].keys()
            for k in b[i]:
                assert (a[i][k] == b[i][k]) if k == "step" else torch.equal(a[i][k], b[i][k]), (r, i, k)
        assert [g["params"] for g in by_module[r]["param_groups"]] == [g["params"] for g in by_hand[r]["param_groups"]]


# ----------------------------------------------------------------------------- export: HF and nanochat
def test_hf_export_log_probs_and_greedy(ref, tmp_path):
    from transformers import AutoModelForCausalLM

    from poelm.trajectory import export

    out = export.export(ref["ckpt"], tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    idx = ids_for(T=280, B=1)
    with torch.no_grad():
        want = fx.reference_stage_log_probs(ref["weights"], idx, LAYERS)
        for k in range(len(LAYERS)):
            assert (hf(idx, stages=k).logits - want[k]).abs().max().item() < 1e-4
        # greedy: the reference's argmax of sum_k log p_k (not renormalised; the PoE's argmax)
        x = idx[:, :20]
        for _ in range(8):
            z = fx.reference_stage_log_probs(ref["weights"], x, LAYERS)
            x = torch.cat([x, z.sum(0)[:, -1].argmax(-1, keepdim=True)], 1)
        got = hf.generate(idx[:, :20], max_new_tokens=8, do_sample=False)[0, 20:].tolist()
    want_tokens = x[0, 20:].tolist()
    bos = hf.generation_config.eos_token_id  # the export stops at <|bos|> (a new document)
    if bos in want_tokens:
        want_tokens = want_tokens[: want_tokens.index(bos) + 1]
    assert got == want_tokens and len(got) >= 3


def test_cached_decoding_equals_uncached_past_the_short_window(ref):
    from poelm.infer.engine import Engine

    model, _, _ = ckpt_mod.load_model(ref["ckpt"])
    short = 256  # ceil(1024 / 4 / 128) * 128: layers 0 and 2 see 257 keys
    prompt = ids_for(T=250, B=1, seed=5)[0].tolist()
    res = Engine(model).generate(prompt, 16, return_logprobs=True)
    x = torch.tensor([prompt + res.tokens[0]])
    assert x.shape[1] > short + 8
    with torch.no_grad():
        full = model(x)[0, len(prompt) - 1 : -1]  # uncached: one forward over the whole sequence
    cached = torch.stack(res.logprobs[0])
    assert (full - cached).abs().max().item() < 1e-4
    assert full.argmax(-1).tolist() == res.tokens[0]


def test_export_then_import_is_bitwise(ref, tmp_path):
    res = nanochat.export_nanochat(ref["ckpt"], tmp_path / "nc")
    assert res["files"] == ["model_001200.pt", "meta_001200.json", "optim_001200_rank0.pt"]
    # the reference tensors come back bitwise: padding rows and bf16 storage included
    sd = torch.load(tmp_path / "nc" / "model_001200.pt", weights_only=True)
    assert sd.keys() == ref["weights"].keys()
    for k, v in ref["weights"].items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    meta = json.loads((tmp_path / "nc" / "meta_001200.json").read_text())
    assert meta["model_config"] == ref["meta"]["model_config"] and meta["dataloader_state_dict"] == ref["meta"]["dataloader_state_dict"]
    # and import(export(x)) == x, weights and optimizer state
    back = nanochat.import_nanochat(tmp_path / "nc", tmp_path / "again", tokenizer=ref["tok"])
    a, b = ckpt_mod.load(ref["ckpt"]), ckpt_mod.load(back["path"])
    for x, y in ((a.model_state, b.model_state), (a.optim_tensors, b.optim_tensors)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.optim_meta["params"] == b.optim_meta["params"] and a.optim_meta["step"] == b.optim_meta["step"]
    pa = load_file(str(ref["ckpt"] / nanochat.PADDING_FILE))
    pb = load_file(str(Path(back["path"]) / nanochat.PADDING_FILE))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def _imported_optimizer(ckpt):
    """The imported run's model and nanochat optimizer (built from the imported config) with the
    imported state loaded."""
    from poelm.core.model import PoEGPT
    from poelm.train.optim import build_optimizer

    ck = ckpt_mod.load(ckpt)
    model = PoEGPT(ck.config.model)
    model.load_state_dict(ck.model_state)
    opt = build_optimizer(model, ck.config.optim)
    opt.load_full_state_dict(ck.optim_tensors, ck.optim_meta)
    return ck, model, opt


def test_imported_lrs_are_the_saved_initial_lrs_not_user_config(ref):
    from poelm.train.nanochat_rules import adamw_update, muon_update

    ck, model, opt = _imported_optimizer(ref["ckpt"])
    saved = fx.group_options()  # what the shards carry: user_config's lrs x batch_lr_scale 0.7
    assert ck.config.optim.lr_scale == pytest.approx(fx.BATCH_LR_SCALE, rel=1e-12)
    assert ck.config.optim.embedding_lr == pytest.approx(fx.USER_LRS["embedding_lr"], rel=1e-12)
    assert len(opt.groups) == len(saved)
    for g, want in zip(opt.groups.values(), saved):
        assert g.base_lr == pytest.approx(want["initial_lr"], rel=1e-6, abs=0), g.name
        assert g.lr == pytest.approx(want["lr"], rel=1e-6, abs=0), g.name  # lrm 0.5 as saved
    # one step equals the rules' step at the saved lrs (AdamW step 7 -> 8; Muon at its saved options)
    params = dict(model.named_parameters())
    torch.manual_seed(5)
    for p in params.values():
        p.grad = torch.randn_like(p) * 1e-2
    names = {"wte.weight": 1, "lm_head.weight": 0, "x0_lambdas": 4, "blocks.0.attn.c_q.weight": None}
    want = {}
    for n, gi in names.items():
        p, g = params[n].detach().clone(), params[n].grad.clone()
        if gi is None:
            o = next(o for o in saved if o["kind"] == "muon")
            buf, sec = ck.optim_tensors[f"{n}/momentum_buffer"].clone(), ck.optim_tensors[f"{n}/second_momentum_buffer"].clone()
            muon_update(p, g, buf, sec, o["lr"], o["momentum"], o["weight_decay"], o["ns_steps"], o["beta2"])
        else:
            o = saved[gi]
            m, v = ck.optim_tensors[f"{n}/exp_avg"].clone(), ck.optim_tensors[f"{n}/exp_avg_sq"].clone()
            adamw_update(p, g, m, v, 8, o["lr"], o["betas"], o["eps"], o["weight_decay"])
        want[n] = p
    opt.step()
    for n, p in want.items():
        assert torch.allclose(params[n].detach(), p, rtol=1e-6, atol=1e-9), n
        assert not torch.equal(params[n].detach(), ck.model_state[n]), n


def test_muon_base_weight_decay_comes_from_the_saved_schedule(ref, tmp_path):
    import math

    from poelm.config import ScheduleConfig

    base, step, steps = 0.28, 1200, ScheduleConfig().steps
    factor = 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))  # base_train's last set value before the save
    shards = fx.shard_by_hand(fx.make_full_state(), 2, options=fx.group_options(muon_wd=base * factor))
    fx.write_folder(tmp_path / "ref", step=step, shards=shards)
    res = nanochat.import_nanochat(tmp_path / "ref", tmp_path / "imp", tokenizer=ref["tok"])
    ck = ckpt_mod.load(res["path"])
    assert ck.config.optim.weight_decay == pytest.approx(base, rel=1e-9)
    prov = json.loads((Path(res["path"]) / "manifest.json").read_text())["provenance"]
    assert prov["optim_config"]["weight_decay"] == pytest.approx(base, rel=1e-9)
    # a group whose lr the rules cannot give: one error line naming it, nothing written
    opts = fx.group_options()
    opts[2]["initial_lr"] *= 1.01  # value_embedding no longer embedding_lr x s x 0.5
    fx.write_folder(tmp_path / "bad", step=step, shards=fx.shard_by_hand(fx.make_full_state(), 2, options=opts))
    r = cli("import", "nanochat", tmp_path / "bad", tmp_path / "imp2", "--tokenizer", ref["tok"])
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr
    assert "value_embedding" in r.stderr and not (tmp_path / "imp2").exists()


def test_bf16_optimizer_state_round_trips_with_its_dtype(ref, tmp_path):
    full = fx.make_full_state()
    fx.write_folder(tmp_path / "ref", shards=fx.shard_by_hand(full, 2, dtype=torch.bfloat16))
    res = nanochat.import_nanochat(tmp_path / "ref", tmp_path / "imp", tokenizer=ref["tok"])
    nanochat.export_nanochat(res["path"], tmp_path / "nc")
    got = torch.load(tmp_path / "nc" / "optim_001200_rank0.pt", weights_only=True)["state"]
    want = fx.shard_by_hand(full, 1, dtype=torch.bfloat16)[0]["state"]
    assert got.keys() == want.keys()
    kinds = set()
    for i, st in want.items():
        assert got[i].keys() == st.keys(), i
        for k, t in st.items():
            if torch.is_tensor(t):
                assert got[i][k].dtype == t.dtype and torch.equal(got[i][k], t), (i, k)
                kinds.add(t.dtype)
            else:
                assert got[i][k] == t
    assert kinds == {torch.bfloat16, torch.float32}  # both kinds were in the source


# ----------------------------------------------------------------------------- continue
def test_continue_resumes_the_imported_optimizer_state(ref, tmp_path):
    r = cli("continue", "--from", ref["out"], "--steps", "2", "--out", tmp_path / "run", "--quiet",
            "--set", "train.seq_len=64", "--set", "train.device_batch_size=2", "--set", "train.eval_tokens=512", "--set", "train.tokens_per_step=128")
    assert r.returncode == 0, r.stderr
    seed = ckpt_mod.load(tmp_path / "run" / "step-01200")
    end = ckpt_mod.load(tmp_path / "run" / "step-01202")
    src = ckpt_mod.load(ref["ckpt"])
    # the seed save carries the imported state unchanged; two steps later the AdamW counts moved 7 -> 9
    assert all(torch.equal(seed.optim_tensors[k], src.optim_tensors[k]) for k in src.optim_tensors)
    assert end.optim_meta["params"]["wte.weight"]["step"] == 9
    # every AdamW parameter advanced, backout_lambda included (the reference touches it with 0 x sum)
    adamw = {n: r["step"] for n, r in end.optim_meta["params"].items() if end.optim_meta["groups"][r["group"]]["kind"] == "adamw"}
    assert adamw["backout_lambda"] == 9 and set(adamw.values()) == {9}
    assert not torch.equal(end.model_state["lm_head.weight"], src.model_state["lm_head.weight"])
    # a poelm-trained step goes back to nanochat and returns bitwise (fp32 now: bf16 would round)
    nanochat.export_nanochat(end.path, tmp_path / "nc")
    meta = json.loads((tmp_path / "nc" / "meta_001202.json").read_text())
    assert meta["step"] == 1202 and meta["dataloader_state_dict"] is None
    back = ckpt_mod.load(nanochat.import_nanochat(tmp_path / "nc", tmp_path / "again", tokenizer=ref["tok"])["path"])
    for x, y in ((end.model_state, back.model_state), (end.optim_tensors, back.optim_tensors)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_weights_only_import_needs_fresh_optimizer(ref, tmp_path):
    fx.write_folder(tmp_path / "ref", world=0)
    r = cli("import", "nanochat", tmp_path / "ref", tmp_path / "imp", "--tokenizer", ref["tok"])
    assert r.returncode == 0, r.stderr
    assert "weights-only" in r.stdout
    prov = json.loads((tmp_path / "imp" / "step-01200" / "manifest.json").read_text())["provenance"]
    assert prov["optimizer"].startswith("none: weights-only")
    args = ["continue", "--from", tmp_path / "imp", "--steps", "1", "--out", tmp_path / "run", "--quiet", "--set", "train.seq_len=64",
            "--set", "train.device_batch_size=2", "--set", "train.eval_tokens=512", "--set", "train.tokens_per_step=128"]
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--fresh-optimizer" in r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))
    r = cli(*args, "--fresh-optimizer")
    assert r.returncode == 0, r.stderr
    assert ckpt_mod.load(tmp_path / "run" / "step-01201").meta["fresh_optimizer"] is True


# ----------------------------------------------------------------------------- bad input
def _bad(tmp_path, ref, mutate, *extra):
    d = tmp_path / "ref"
    if d.exists():
        shutil.rmtree(d)
    fx.write_folder(d, world=2)
    mutate(d)
    out = tmp_path / "out"
    r = cli("import", "nanochat", d, out, "--tokenizer", ref["tok"], *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not out.exists()
    return lines[0]


def _edit_meta(d, **kw):
    p = d / "meta_001200.json"
    m = json.loads(p.read_text())
    for k, v in kw.items():
        if k in fx.CFG:
            m["model_config"][k] = v
        else:
            m[k] = v
    p.write_text(json.dumps(m))


def _retensor(d, fn):
    p = d / "model_001200.pt"
    sd = torch.load(p, weights_only=True)
    fn(sd)
    torch.save(sd, p)


@pytest.mark.parametrize("case, mutate, extra, needle", [
    ("no model file", lambda d: (d / "model_001200.pt").unlink(), (), "no model_XXXXXX.pt"),
    ("step not there", lambda d: None, ("--step", "5"), "no step 5"),
    ("shards missing", lambda d: (d / "optim_001200_rank0.pt").unlink(), (), "missing for rank(s) 0"),
    ("unknown tensor", lambda d: _retensor(d, lambda sd: sd.__setitem__("transformer.h.0.attn.c_z.weight", torch.zeros(2))), (), "unknown tensor"),
    ("missing tensor", lambda d: _retensor(d, lambda sd: sd.pop("smear_lambda")), (), "smear_lambda"),
    ("layout sum", lambda d: None, ("--stage-layers", "2,1"), "sum to 3"),
    ("dual head", lambda d: _edit_meta(d, dual_head=True), (), "dual_head"),
    ("frozen layers", lambda d: _edit_meta(d, frozen_layers=2), (), "frozen_layers"),
    ("stage delta", lambda d: _edit_meta(d, base_model_dir="/x/d4"), (), "stage-delta"),
    ("vocab mismatch", lambda d: _edit_meta(d, vocab_size=310), (), "vocab_size is 310"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(ref, tmp_path, case, mutate, extra, needle):
    line = _bad(tmp_path, ref, mutate, *extra)
    assert needle in line, line


def test_bad_tokenizer_and_out(ref, tmp_path):
    fx.write_folder(tmp_path / "ref", world=0)
    small = fx.tokenizer_json(tmp_path / "tok280", vocab=280)
    r = cli("import", "nanochat", tmp_path / "ref", tmp_path / "out", "--tokenizer", small)
    assert r.returncode == 2 and "has 280 tokens" in r.stderr and not (tmp_path / "out").exists()
    r = cli("import", "nanochat", tmp_path / "ref", tmp_path / "out")
    assert r.returncode == 2 and "--tokenizer" in r.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    r = cli("import", "nanochat", tmp_path / "ref", tmp_path / "busy", "--tokenizer", ref["tok"])
    assert r.returncode == 2 and "not empty" in r.stderr and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x"]


def test_the_cards_checkpoint_maps_to_the_presets_model():
    """The card's 3B meta with --stage-layers 16,6,5,5 gives exactly the presets' [model], so
    `continue --from <import> --config cognica-3b-b2` is a continual phase (same architecture)."""
    from poelm import config as config_mod

    mc = dict(sequence_len=2048, vocab_size=32768, n_layer=32, n_head=16, n_kv_head=8, n_embd=2048, window_pattern="SSSL",
              dual_head=False, frozen_layers=0, per_stage_head=True, poe_every=8, intermediate_size=12800)
    got = nanochat.model_config(mc, nanochat.stage_layout(mc, [16, 6, 5, 5])).to_dict()
    for preset in ("cognica-3b", "cognica-3b-b2"):
        cfg = config_mod.load(preset)
        assert cfg.model.to_dict() == got and cfg.optim.optimizer == "nanochat"
    back = nanochat.reference_model_config(config_mod.load("cognica-3b").model, mc)
    assert {k: back[k] for k in mc} == mc and back["stage_layers"] == [16, 6, 5, 5]
