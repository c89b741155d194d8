"""Export to a Hugging Face folder: loads offline through the Auto classes with no warnings, the
logits are poelm's PoE log-probs, generate() matches poelm's greedy decoding, the tokenizer
prepends BOS itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from poelm.train import checkpoint
from poelm.trajectory import export as export_mod
from poelm.core.errors import CheckpointError, PoelmError
from poelm.infer.engine import Engine
from poelm.core.model import REFERENCE_OPS, ModelConfig, PoEGPT

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, one two three four five six.",
         "Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 20
PHASE = {"name": "b2", "start_step": 0, "steps": 1000, "warmup": 10, "peak": 0.5, "warmdown_ratio": 0.55, "final": 0.0}


def make_ckpt(d: Path, step: int = 100, tokens: int = 1000, seed: int = 0, ops: dict | None = None) -> tuple[PoEGPT, object]:
    """A tiny checkpoint dir laid out as poelm.checkpoint.save writes it (no optimizer state).
    The weights are perturbed so the per-stage heads differ (a fresh init zeroes them).
    ``ops``: extra ``ModelConfig`` fields (the reference's ops)."""
    from poelm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=3, n_embd=32, n_head=2, n_kv_head=1, intermediate=64,
                      max_seq_len=64, stage_layers=(1, 1, 1), **(ops or {}))
    model = PoEGPT(cfg)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if cfg.smear:
            model.smear_lambda.fill_(0.7)  # a smear that matters
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"seed": seed}}))
    (d / "meta.json").write_text(json.dumps({"step": step, "rel_step": step, "phase": PHASE, "lrm": 0.5, "tokens": tokens,
                                             "tokens_in_phase": tokens, "train_val_bpb": 2.5}))
    tok.save(d)
    checkpoint.write_manifest(d)
    return model.eval(), tok


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


# The reference's ops, with a short window of 4 keys (prompts and generations run past it).
REF = {**REFERENCE_OPS, "short_window": 4, "window_pattern": "SL"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _exported(tmp_path_factory, None)


@pytest.fixture(scope="module")
def exported_ref(tmp_path_factory):
    return _exported(tmp_path_factory, REF)


# Tests that also run on an export of a model with the reference's ops (smear, windows...).
BOTH = pytest.mark.parametrize("which", ["exported", "exported_ref"], ids=["poelm-ops", "reference-ops"])


def _exported(tmp_path_factory, ops):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    model, tok = make_ckpt(root / "ckpt", ops=ops)
    out = export_mod.export(root / "ckpt", root / "hf", bounds=[0.5, 0.25])
    handler = Captured()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    transformers.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
            hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    finally:
        tlog.removeHandler(handler)
    return {"root": root, "out": out, "model": model, "tok": tok, "hf": hf, "hf_tok": hf_tok,
            "warnings": [str(w.message) for w in caught] + handler.records}


def prompt_ids(tok, text="Hello world, the quick"):
    return torch.tensor([tok.encode_doc(text)])


def test_no_warnings_on_load(exported):
    assert exported["warnings"] == []
    # the tokenizer is transformers' own class: no remote code for it
    assert type(exported["hf_tok"]).__module__.startswith("transformers.")
    assert type(exported["hf"]).__name__ == "PoelmForCausalLM"


def test_folder_contents_and_config(exported):
    out = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "configuration_poelm.py", "modeling_poelm.py", "model.py", "poe.py", "errors.py", "inputs.py", "engine.py",
            "speculative.py", "state.py", "sampler.py", "hfloop.py", "options.py", "README.md",
            "poelm_manifest.json"} <= names
    pkg = Path(export_mod.__file__).resolve().parents[1]
    for room, name in [("core", "model.py"), ("core", "poe.py"), ("core", "errors.py"), ("core", "inputs.py"), ("infer", "engine.py"),
                       ("infer", "speculative.py"), ("infer", "state.py"), ("infer", "sampler.py"), ("infer", "hfloop.py"),
                       ("infer", "options.py")]:  # verbatim
        assert (out / name).read_bytes() == (pkg / room / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "poelm"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_poelm.PoelmConfig",
                               "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM"}
    assert all(isinstance(v, str) for v in cfg["auto_map"].values())
    mcfg = exported["model"].config.to_dict()
    assert {k: cfg[k] for k in mcfg} == mcfg
    assert (cfg["step"], cfg["rel_step"], cfg["phase_name"], cfg["lrm"], cfg["tokens"]) == (100, 100, "b2", 0.5, 1000)
    assert cfg["phase"] == PHASE
    assert cfg["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]
    assert cfg["poelm_config"]["train"] == {"seed": 0}
    # the manifest covers every other file with its sha256
    man = json.loads((out / "poelm_manifest.json").read_text())
    assert set(man["files"]) == names - {"poelm_manifest.json"}
    assert man["files"]["model.safetensors"]["sha256"] == export_mod.sha256_file(out / "model.safetensors")
    assert (man["step"], man["tokens"], man["lrm"], man["phase"]) == (100, 1000, 0.5, "b2")
    assert export_mod.weights_metadata(out / "model.safetensors")["poelm_step"] == "100"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == exported["tok"].bos_id == gen["eos_token_id"]


def test_config_fields_follow_model_config():
    from poelm.hf.configuration_poelm import MODEL_FIELDS

    assert set(MODEL_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)}


@BOTH
def test_logits_equal_poelm(which, request):
    exported = request.getfixturevalue(which)
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
        z = model.stage_log_probs(ids)
        assert torch.allclose(hf(ids, stages=0).logits, z[0], atol=1e-5, rtol=0)
        prefix2 = torch.log_softmax(z[:2].mean(0), -1)
        assert torch.allclose(hf(ids, stages=range(2)).logits, prefix2, atol=1e-5, rtol=0)
        full = torch.log_softmax(z.mean(0), -1)
        assert torch.allclose(hf(ids).logits, full, atol=1e-5, rtol=0)
        # the logits are normalised log-probs
        assert torch.allclose(hf(ids).logits.exp().sum(-1), torch.ones(ids.shape), atol=1e-5)


def test_loss_is_mean_poe_nll(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    with torch.no_grad():
        out = hf(ids, labels=ids)
        logp = model(ids)
    want = -logp[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    assert abs(out.loss.item() - want.item()) < 1e-5


def greedy_poelm(model, ids, n, eos):
    """poelm greedy decoding without a cache: argmax of the full-K PoE, stop after EOS."""
    x = ids
    for _ in range(n):
        nxt = model(x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
        if nxt.item() == eos:
            break
    return x


@BOTH
def test_generate_greedy_matches_poelm_and_uses_cache(which, request):
    exported = request.getfixturevalue(which)
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    lengths = []
    hook = hf.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = hf.generate(ids, max_new_tokens=20, do_sample=False)
    finally:
        hook.remove()
    ref = greedy_poelm(model, ids, 20, eos=tok.bos_id)
    assert out.tolist() == ref.tolist()
    assert out.shape[1] > ids.shape[1] + 5
    # the prompt once, then one token per step: the KV cache carries the past
    assert lengths[0] == ids.shape[1] and set(lengths[1:]) == {1}
    res = Engine(model).generate(ids[0].tolist(), 20, stop_tokens=(tok.bos_id,))
    assert res.tokens[0] == out[0, ids.shape[1]:].tolist()


@BOTH
def test_sampling_with_cache_equals_without(which, request):
    exported = request.getfixturevalue(which)
    hf, tok = exported["hf"], exported["tok"]
    ids = prompt_ids(tok)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(hf.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50, use_cache=use_cache).tolist())
    assert runs[0] == runs[1]


@BOTH
def test_generate_wand_and_speculative_are_generate_poe_modes(which, request):
    exported = request.getfixturevalue(which)
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    n = ids.shape[1]
    wand = hf.generate_wand(ids, max_new_tokens=10)  # the branch's calibrated bounds from config.json
    assert wand[0, :n].tolist() == ids[0].tolist()  # prompt + new tokens, as generate() returns
    want = Engine(model).generate(ids[0].tolist(), 10, mode="wand", bounds=[0.5, 0.25], stop_tokens=(tok.bos_id,)).tokens[0]
    assert wand[0, n:].tolist() == want
    assert torch.equal(wand, hf.generate(ids, max_new_tokens=10, poe_mode="wand"))
    greedy = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(hf.generate_speculative(ids, max_new_tokens=10, m=3), greedy)  # token-identical to full-K greedy
    assert torch.equal(hf.generate(ids, max_new_tokens=10, poe_mode="wand", poe_bounds=[math.inf] * 2), greedy)
    assert torch.equal(hf.generate_route(ids, max_new_tokens=10, tau=1.0), greedy)
    assert torch.equal(hf.generate(ids, max_new_tokens=10, poe_mode="stage=0"), greedy_poelm_stages(model, ids, 10, tok.bos_id, 0))


def greedy_poelm_stages(model, ids, n, eos, stages):
    x = ids
    for _ in range(n):
        nxt = model(x, stages=stages)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
        if nxt.item() == eos:
            break
    return x


TEXTS3 = ["Hello", "The quick brown fox jumps over the", "Lorem ipsum dolor"]


def left_padded(exported, texts=TEXTS3):
    enc = exported["hf_tok"](texts, padding=True, padding_side="left", return_tensors="pt")
    assert len(set(enc.attention_mask.sum(1).tolist())) == len(texts)  # every row a different length
    return enc


@pytest.mark.parametrize("mode", ["full", "stage=1", "prefix=2", "wand", "route", "speculative"])
@BOTH
def test_left_padded_generate_equals_each_prompt_alone(which, request, mode):
    exported = request.getfixturevalue(which)
    hf, hf_tok = exported["hf"], exported["hf_tok"]
    enc = left_padded(exported)
    kw = dict(max_new_tokens=14, do_sample=False, poe_mode=mode, poe_tau=0.3 if mode == "route" else None)
    batch = hf.generate(**enc, **kw)
    W, pad = enc.input_ids.shape[1], hf.generation_config.pad_token_id
    assert torch.equal(batch[:, :W], enc.input_ids)
    for i, text in enumerate(TEXTS3):
        one = hf_tok(text, return_tensors="pt")
        alone = hf.generate(**one, **kw)[0, one.input_ids.shape[1]:].tolist()
        row = batch[i, W:].tolist()
        assert row[: len(alone)] == alone and set(row[len(alone):]) <= {pad}  # then padding after its EOS


@BOTH
def test_batched_speculative_and_wand_equal_greedy_generate(which, request):
    exported = request.getfixturevalue(which)
    hf = exported["hf"]
    enc = left_padded(exported)
    greedy = hf.generate(**enc, max_new_tokens=16, do_sample=False)
    for m in (1, 3, 5, "auto"):
        assert torch.equal(hf.generate(**enc, max_new_tokens=16, poe_mode="speculative", poe_m=m), greedy)
    assert torch.equal(hf.generate(**enc, max_new_tokens=16, poe_mode="speculative", poe_m=3, poe_draft=2), greedy)
    assert torch.equal(hf.generate(**enc, max_new_tokens=16, poe_mode="wand", poe_bounds=[math.inf, math.inf]), greedy)
    # bounds at the true range of every decoded position certify every exit: still greedy. Later
    # stages that barely move the stream (and near-zero stage heads) make early exits happen.
    import copy

    from poelm.core import poe
    from poelm.core.inputs import positions_from_mask

    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for b in hf.model.blocks[1:]:
            b.attn.c_proj.weight.mul_(0.05)
            b.mlp.c_proj.weight.mul_(0.05)
        for h in hf.model.stage_heads:
            h.weight.mul_(0.05)
        hf.model.lm_head.weight.mul_(20.0)
    hf.model._merged_cache.clear()
    greedy = hf.generate(**enc, max_new_tokens=16, do_sample=False)
    W = enc.input_ids.shape[1]
    valid = torch.cat([enc.attention_mask, torch.ones(3, greedy.shape[1] - W, dtype=torch.long)], 1).bool()
    with torch.no_grad():
        z = hf.model.stage_log_probs(greedy, positions=positions_from_mask(valid), valid=valid)[:, :, W - 1 : -1]
    certified = (poe.wand_ranges(z).flatten(1).amax(1) * 1.001).tolist()
    wand = hf.generate(**enc, max_new_tokens=16, poe_mode="wand", poe_bounds=certified, return_dict_in_generate=True)
    assert torch.equal(wand.sequences, greedy)
    assert min(d for row in wand.exit_depths for d in row) < 3, certified  # some positions exited early


def test_return_dict_carries_poe_statistics(exported):
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    hf = exported["hf"]
    enc = left_padded(exported)
    spec = hf.generate(**enc, max_new_tokens=12, poe_mode="speculative", poe_m=3, return_dict_in_generate=True, output_scores=True)
    assert isinstance(spec, GenerateDecoderOnlyOutput) and spec.poe_mode == "speculative"
    st = spec.poe_stats
    assert len(spec.accepted) == 3 and sum(map(sum, spec.accepted)) == st["accepted"]
    assert math.isclose(spec.acceptance, st["accepted"] / st["proposed"])
    assert len(spec.scores) == spec.sequences.shape[1] - enc.input_ids.shape[1] and spec.scores[0].shape == (3, hf.config.vocab_size)
    # each score row's argmax is the token chosen at that step (greedy)
    W = enc.input_ids.shape[1]
    for j, sc in enumerate(spec.scores):
        for b in range(3):
            if sc[b].abs().sum() > 0:
                assert int(sc[b].argmax()) == int(spec.sequences[b, W + j])
    wand = hf.generate(**enc, max_new_tokens=12, poe_mode="wand", poe_bounds=[0.5, 0.25], return_dict_in_generate=True)
    width = wand.sequences.shape[1] - W
    assert [len(d) for d in wand.exit_depths] == [width - _pads_after_eos(hf, wand.sequences[b, W:]) for b in range(3)]
    assert all(1 <= d <= 3 for row in wand.exit_depths for d in row) and wand.acceptance is None
    assert math.isclose(wand.mean_depth, sum(map(sum, wand.exit_depths)) / sum(map(len, wand.exit_depths)))


def _pads_after_eos(hf, row):
    """Tokens after the first EOS (the pad filling) in a generated row."""
    row = row.tolist()
    eos = hf.generation_config.eos_token_id
    return len(row) - row.index(eos) - 1 if eos in row else 0


def test_generate_contract_eos_pad_min_new_sampling(exported):
    hf = exported["hf"]
    enc = left_padded(exported)
    W = enc.input_ids.shape[1]
    free = hf.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=7)  # no EOS: 12 tokens each
    stop = int(free[1, W + 3])
    for mode in ("full", "speculative", "wand"):
        kw = dict(max_new_tokens=12, do_sample=False, poe_mode=mode, poe_bounds=[math.inf] * 2 if mode == "wand" else None)
        cut = hf.generate(**enc, eos_token_id=stop, pad_token_id=7, **kw)
        ref = hf.generate(**enc, eos_token_id=stop, pad_token_id=7, max_new_tokens=12, do_sample=False)
        assert torch.equal(cut, ref)
        row = cut[1, W:].tolist()
        assert row[: row.index(stop) + 1] == free[1, W : W + row.index(stop) + 1].tolist() and set(row[row.index(stop) + 1 :]) <= {7}
        late = hf.generate(**enc, eos_token_id=stop, pad_token_id=7, min_new_tokens=8, **kw)
        assert torch.equal(late, hf.generate(**enc, eos_token_id=stop, pad_token_id=7, min_new_tokens=8, max_new_tokens=12, do_sample=False))
        assert all(stop not in late[b, W : W + 8].tolist() for b in range(3))
        # sampling through the engine: top_k=1 (or a tiny top_p) leaves the argmax only
        for samp in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=0.5)):
            assert torch.equal(hf.generate(**enc, do_sample=True, **samp, **{k: v for k, v in kw.items() if k != "do_sample"}), free[:, :W + 12])
        torch.manual_seed(3)
        a = hf.generate(**enc, do_sample=True, top_k=20, **{k: v for k, v in kw.items() if k != "do_sample"})
        torch.manual_seed(3)
        b = hf.generate(**enc, do_sample=True, top_k=20, **{k: v for k, v in kw.items() if k != "do_sample"})
        assert torch.equal(a, b)


def test_streamer_receives_what_generate_returns(exported):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    hf = exported["hf"]
    enc = left_padded(exported)
    W = enc.input_ids.shape[1]
    for mode in ("full", "speculative", "wand"):
        s = Collect()
        out = hf.generate(**enc, max_new_tokens=10, do_sample=False, poe_mode=mode, streamer=s,
                          poe_bounds=[0.5, 0.25] if mode == "wand" else None)
        assert s.ended == 1 and s.puts[0] == enc.input_ids.tolist()  # the prompt first, as transformers sends it
        cols = torch.tensor(s.puts[1:]).T if len(s.puts) > 1 else torch.zeros(3, 0, dtype=torch.long)
        assert cols.tolist() == out[:, W:].tolist()


def test_single_stage_cache_cannot_serve_deeper_forward(exported):
    from transformers import DynamicCache

    hf, tok = exported["hf"], exported["tok"]
    ids = prompt_ids(tok)
    cache = DynamicCache()
    hf(ids, stages=0, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        hf(ids[:, -1:], cache=cache, use_cache=True)


@BOTH
def test_right_padded_loglikelihood_batch_equals_batch_of_one(which, request):
    """lm-eval style scoring: four contexts+continuations of different lengths, right-padded in
    one batch, give per row the log-probs of that row alone (positions past a row's end aside)."""
    exported = request.getfixturevalue(which)
    hf, tok = exported["hf"], exported["tok"]
    rows = [tok.encode_doc(t) for t in ["Hello world", "The quick brown fox jumps over the lazy dog", "Lorem", "one two three four"]]
    L = max(map(len, rows))
    ids = torch.zeros(4, L, dtype=torch.long)
    mask = torch.zeros(4, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        batch = hf(ids, attention_mask=mask).logits
        nomask = hf(ids).logits  # causal attention alone never lets a real token see later padding
        for i, r in enumerate(rows):
            alone = hf(torch.tensor([r])).logits[0]
            assert torch.allclose(batch[i, : len(r)], alone, atol=1e-5, rtol=0)
            assert torch.allclose(nomask[i, : len(r)], alone, atol=1e-5, rtol=0)
            cont = torch.tensor(r[1:])
            ll_b = batch[i, : len(r) - 1].gather(-1, cont[:, None]).sum()
            ll_1 = alone[:-1].gather(-1, cont[:, None]).sum()
            assert abs(float(ll_b - ll_1)) < 1e-4


@BOTH
def test_left_padded_forward_uses_mask_and_position_ids(which, request):
    exported = request.getfixturevalue(which)
    hf, tok = exported["hf"], exported["tok"]
    enc = left_padded(exported)
    with torch.no_grad():
        out = hf(**enc).logits
        pos = (enc.attention_mask.cumsum(-1) - 1).clamp_min(0)
        assert torch.equal(hf(**enc, position_ids=pos).logits, out)  # the positions it derives itself
        assert not torch.allclose(hf(**enc, position_ids=torch.zeros_like(pos)).logits, out)  # position_ids are not ignored
        for i, text in enumerate(TEXTS3):
            one = exported["hf_tok"](text, return_tensors="pt").input_ids
            n = one.shape[1]
            assert torch.allclose(out[i, -n:], hf(one).logits[0], atol=1e-5, rtol=0)
        assert torch.allclose(hf(**enc, logits_to_keep=1).logits, out[:, -1:], atol=1e-6)


def test_hidden_states_map_to_stages(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hs = model.hiddens(ids, detach=False)
    assert len(out.hidden_states) == model.config.depth + 1
    assert torch.allclose(out.hidden_states[0], model.embed(ids))
    ends = [sum(model.config.stage_layers[: k + 1]) for k in range(model.config.n_stages)]
    for k, e in enumerate(ends):
        assert torch.allclose(out.stage_hidden_states[k], hs[k], atol=1e-6)
        assert out.stage_hidden_states[k] is out.hidden_states[e]
    with torch.no_grad():
        assert len(hf(ids, stages=0, output_hidden_states=True).hidden_states) == model.config.stage_layers[0] + 1
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        hf(ids, output_attentions=True)


def test_resize_token_embeddings_resizes_every_vocab_parameter(exported):
    import copy

    hf = copy.deepcopy(exported["hf"])
    V = hf.config.vocab_size
    old = {k: v.clone() for k, v in hf.model.state_dict().items()}
    hf.resize_token_embeddings(V + 5)
    m = hf.model
    vocab_params = {"wte.weight", "lm_head.weight"} | {f"stage_heads.{k}.weight" for k in range(len(m.stage_heads))} | {
        f"value_embeds.{k}.weight" for k in m.value_embeds}
    for name, p in m.state_dict().items():
        if name in vocab_params:
            assert p.shape[0] == V + 5 and torch.equal(p[:V], old[name]), name
        else:
            assert torch.equal(p, old[name]), name
    for h in m.stage_heads:
        assert torch.count_nonzero(h.weight[V:]) == 0  # stage heads start at zero
    assert torch.allclose(m.wte.weight[V], old["wte.weight"].mean(0))
    assert hf.config.vocab_size == m.config.vocab_size == V + 5
    ids = torch.tensor([[0, 5, V + 4, V + 1]])  # new ids run through every vocab-sized table
    with torch.no_grad():
        assert hf(ids).logits.shape == (1, 4, V + 5)
    out = hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=[])
    assert out.shape == (1, 7)
    hf.resize_token_embeddings(V - 10, pad_to_multiple_of=8)
    assert hf.config.vocab_size == (V - 10 + 7) // 8 * 8 and m.value_embeds[next(iter(m.value_embeds))].weight.shape[0] == hf.config.vocab_size


def test_bad_inputs_raise_value_errors_before_compute(exported):
    from transformers import StaticCache

    hf, tok = exported["hf"], exported["hf_tok"]
    V, S = hf.config.vocab_size, hf.config.max_seq_len
    calls = []
    hook = hf.model.register_forward_pre_hook(lambda *a: calls.append(1))
    hook2 = hf.model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ok = torch.tensor([[0, 5, 6]])
    cases = [
        (dict(input_ids=torch.tensor([[0, V]])), "outside the vocabulary"),
        (dict(input_ids=torch.tensor([[0, -1]])), "outside the vocabulary"),
        (dict(input_ids=torch.tensor([[0.0, 5.0]])), "integer token ids"),
        (dict(input_ids=torch.tensor([0, 5])), "2-D"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.zeros(1, S + 1, dtype=torch.long)), "max_seq_len"),
        (dict(input_ids=ok, attention_mask=torch.ones(1, 2, dtype=torch.long)), "attention_mask must be 2-D"),
        (dict(input_ids=ok, output_attentions=True), "output_attentions"),
    ]
    try:
        for kw, msg in cases:
            with pytest.raises(ValueError, match=msg):
                hf(**kw)
        gen_cases = [
            (dict(inputs=torch.tensor([[0, V + 3]])), "outside the vocabulary"),
            (dict(inputs=torch.tensor([[0.5, 1.0]])), "integer token ids"),
            (dict(inputs=torch.tensor([0, 5])), "2-D"),
            (dict(inputs=torch.zeros(2, 0, dtype=torch.long)), "empty"),
            (dict(inputs=torch.zeros(1, S - 4, dtype=torch.long), max_new_tokens=10), "exceeds this model's max_seq_len"),
            (dict(inputs=ok, max_new_tokens=5, cache_implementation="static"), "cache_implementation='static' is not supported"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="speculative", cache_implementation="static"), "cache_implementation='static'"),
            (dict(inputs=ok, max_new_tokens=5, past_key_values=StaticCache(config=hf.config, max_cache_len=16)), "StaticCache is not supported"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="beam"), "unknown mode"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="stage=7"), "out of range"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="speculative", num_beams=2), "num_beams"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="wand", repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
            (dict(inputs=ok, max_new_tokens=5, poe_mode="route"), "needs tau"),
            (dict(inputs=ok, max_new_tokens=5, poe_m=2), "poe_m / poe_draft apply to"),
        ]
        for kw, msg in gen_cases:
            with pytest.raises(ValueError, match=msg) as e:
                hf.generate(**kw)
            assert "\n" not in str(e.value)
        right = tok(["Hello", "Hello world again"], padding=True, padding_side="right", return_tensors="pt")
        with pytest.raises(ValueError, match="left padding"):
            hf.generate(**right, max_new_tokens=3, poe_mode="speculative")
    finally:
        hook.remove()
        hook2.remove()
    assert calls == []  # nothing ran


def test_tokenizer_prepends_bos_both_ways(exported):
    hf_tok, tok = exported["hf_tok"], exported["tok"]
    text = "Hello world, the quick brown fox 42."
    want = tok.encode_doc(text)
    assert want[0] == tok.bos_id == hf_tok.bos_token_id
    assert hf_tok(text).input_ids == want
    assert hf_tok.encode(text) == want
    assert [hf_tok.bos_token_id] + hf_tok.encode(text, add_special_tokens=False) == want
    assert hf_tok.decode(want[1:]) == text
    assert hf_tok.decode(want, skip_special_tokens=True) == text
    # a literal "<|bos|>" in user text stays text, as in poelm's tokenizer
    forged = "a <|bos|> b"
    assert hf_tok.encode(forged, add_special_tokens=False) == tok.encode(forged)
    assert tok.bos_id not in tok.encode(forged)


def test_plain_tokenizer_class_loads_offline(exported):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast.from_pretrained(exported["out"])
    assert t.encode("Hello world") == exported["tok"].encode_doc("Hello world")


def test_checkpoint_load_model_reads_export(exported):
    model, tok, meta = checkpoint.load_model(exported["out"])
    ref = exported["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert meta["step"] == 100 and meta["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]


def test_reexport_of_an_export_is_identical_weights(exported, tmp_path):
    out = export_mod.export(exported["out"], tmp_path / "again")
    a = json.loads((exported["out"] / "poelm_manifest.json").read_text())
    b = json.loads((out / "poelm_manifest.json").read_text())
    assert a["files"]["model.safetensors"] == b["files"]["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]


def test_export_refusals(exported, tmp_path):
    ckpt = exported["root"] / "ckpt"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PoelmError, match="not an earlier poelm export"):
        export_mod.export(ckpt, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(PoelmError, match="2 finite non-negative"):
        export_mod.export(ckpt, tmp_path / "b", bounds=[1.0])
    with pytest.raises(CheckpointError, match="not found"):
        export_mod.export(tmp_path / "nope", tmp_path / "c")
    # a corrupted checkpoint is never exported
    bad = tmp_path / "bad"
    make_ckpt(bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="manifest"):
        export_mod.export(bad, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_reference_ops_travel_in_config_json_and_weights(exported_ref):
    """The reference's ops are in config.json (so the Hub model is the reference's model), the
    split core files ship, and the parameters no stage logit uses (backout_lambda) survive."""
    from safetensors.torch import load_file

    out, model, hf = exported_ref["out"], exported_ref["model"], exported_ref["hf"]
    cfg = json.loads((out / "config.json").read_text())
    for key, value in REF.items():
        assert cfg[key] == value and getattr(hf.model.config, key) == value, key
    assert {"arch.py", "cache.py", "layers.py"} <= {p.name for p in out.iterdir()}
    weights = load_file(str(out / "model.safetensors"))
    for key in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        assert torch.equal(weights["model." + key], model.state_dict()[key]), key
    assert hf.model.windows == [4, None, None]


def test_beam_search_with_cache_equals_without_reference_ops(exported_ref):
    """Beam search reorders the cache every step: the smear's embeddings (an extra cache layer)
    must follow the beams, so cached beams equal beams recomputed without a cache."""
    hf, tok = exported_ref["hf"], exported_ref["tok"]
    ids = prompt_ids(tok)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, early_stopping=False)
    assert torch.equal(hf.generate(ids, use_cache=True, **kw), hf.generate(ids, use_cache=False, **kw))
