"""``poelm measure`` end to end on tiny models: one-pass vs slow reference, determinism, deltas,
calibration write-back, the CLI, the probe and the speculative cross-check."""

import json
import math
import subprocess
import sys

import pytest
import torch

from poelm.train import checkpoint
from poelm.measure import run as measure
from poelm.core import poe
from poelm.measure import probe
from poelm.measure.calibrate import BOUNDS_KEY
from poelm.config import Config
from poelm.data.corpus import val_batches
from poelm.core.errors import PoelmError
from poelm.core.model import ModelConfig, PoEGPT
from poelm.data.tokenizer import train_tokenizer

TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "Gold is a chemical element with the symbol Au and atomic number 79.",
    "If today is Friday, then tomorrow is Saturday.",
    "The opposite of hot is cold, and the opposite of up is down.",
    "CYNIC, n. A blackguard whose faulty vision sees things as they are, not as they ought to be.",
    "BORE, n. A person who talks when you wish him to listen.",
    "hacker n. A person who enjoys exploring the details of programmable systems.",
    "Solve for x: 5x + 3 = 13, so 5x = 10 and x = 2.",
]
SPLIT, CALIB, T = 1500, 400, 48


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 4, 300)


def make_model(tok, seed, stage_layers=(1, 1, 1, 1)):
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=sum(stage_layers), n_embd=32, n_head=2, n_kv_head=1, intermediate=64,
                      max_seq_len=96, stage_layers=stage_layers)
    m = PoEGPT(cfg)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # leave the zero init so that stages differ and predict something
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return m.eval()


@pytest.fixture(scope="module")
def tokens(tok):
    ids = []
    for i in range(40):
        ids += tok.encode_doc(TEXTS[i % len(TEXTS)] + " " + TEXTS[(3 * i + 1) % len(TEXTS)])
    return torch.tensor(ids)


def run(model, tok, tokens, **kw):
    args = dict(tokens=tokens, split_tokens=SPLIT, calib_tokens=CALIB, batch_size=4, seq_len=T, probe_set=None,
                progress=False, block_tokens=128, samples=200)
    args.update(kw)
    return measure.measure(model, tok, {"step": 7}, **args)


@torch.no_grad()
def slow_reference(model, tok, tokens):
    """Independent path: a fresh forward per stage / prefix / alpha (model.forward), plain sums."""
    K = model.config.n_stages
    tb = tok.token_bytes()
    meas = tokens[: SPLIT + 1]
    heads = {f"single{k}": dict(stages=k) for k in range(K)}
    heads.update({f"prefix{j}": dict(stages=range(j)) for j in range(1, K)})
    heads.update({f"alpha{a}": dict(alpha=a) for a in measure.ALPHAS})
    nll = {h: 0.0 for h in heads}
    correct = {h: 0 for h in heads}
    nbytes = count = agree = 0
    for x, y in val_batches(meas, 4, T):
        b = tb[y]
        keep = b > 0
        nbytes += int(b.sum())
        count += int(keep.sum())
        argmax = {}
        for h, kw in heads.items():
            lp = model(x, **kw)
            nll[h] += float((poe.nll(lp, y) * keep).double().sum())
            argmax[h] = lp.argmax(-1)
            correct[h] += int(((argmax[h] == y) & keep).sum())
        agree += int(((argmax["single0"] == argmax["alpha0.0"]) & keep).sum())
    bpb = {h: v / (math.log(2) * nbytes) for h, v in nll.items()}
    acc = {h: v / count for h, v in correct.items()}
    return bpb, acc, agree / count


def test_one_pass_matches_slow_reference(tok, tokens):
    model = make_model(tok, 1)
    rec = run(model, tok, tokens)
    bpb, acc, agree = slow_reference(model, tok, tokens)
    K = 4
    assert rec["split_tokens"] == SPLIT and rec["calib_tokens"] == CALIB
    assert rec["bpb"]["full"]["value"] == pytest.approx(bpb["alpha0.0"], abs=1e-5)
    for k in range(K):
        assert rec["bpb"]["single"][k]["value"] == pytest.approx(bpb[f"single{k}"], abs=1e-5)
        assert rec["acc"]["single"][k]["value"] == pytest.approx(acc[f"single{k}"], abs=1e-9)
    for j in range(1, K):
        assert rec["bpb"]["prefix"][j - 1]["value"] == pytest.approx(bpb[f"prefix{j}"], abs=1e-5)
    for i, a in enumerate(measure.ALPHAS):
        assert rec["alpha_sweep"]["bpb"][i] == pytest.approx(bpb[f"alpha{a}"], abs=1e-5)
    assert rec["acc"]["full"]["value"] == pytest.approx(acc["alpha0.0"], abs=1e-9)
    assert rec["crossover_gap"] == pytest.approx(bpb["alpha0.0"] - bpb["single3"], abs=1e-5)
    assert rec["routing"]["agreement_s0_full"] == pytest.approx(agree, abs=1e-9)
    for node in [rec["bpb"]["full"], *rec["bpb"]["single"], rec["acc"]["full"]]:
        assert node["ci"][0] <= node["value"] <= node["ci"][1]
    w = rec["wand"]
    assert len(w["bounds"]) == K - 1 and w["bounds"] == w["p99"]
    assert all(a <= b <= c <= d for a, b, c, d in zip(w["p50"], w["p90"], w["p99"], w["max"]))
    r = rec["routing"]
    assert r["projected_speedup"] == pytest.approx(1 / (r["fraction"] * r["c0"] + 1 - r["fraction"]))
    assert r["c0"] == pytest.approx(model.flops_per_token(T)["per_stage"][0] / model.flops_per_token(T)["total"])
    assert r["value_calib"] <= r["cap"]
    assert sum(w["exit"]["fraction_per_stage"]) == pytest.approx(1.0)


def test_same_model_twice_gives_identical_numbers(tok, tokens):
    model = make_model(tok, 2)
    a = run(model, tok, tokens, probe_set="card", max_new_tokens=6)
    b = run(model, tok, tokens, probe_set="card", max_new_tokens=6)
    for rec in (a, b):
        rec.pop("elapsed_s")
        for k in ("speedup", "full_s", "spec_s"):
            rec["spec"].pop(k)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_against_reference_paired_deltas(tok, tokens):
    a, b = make_model(tok, 3), make_model(tok, 4)
    self_rec = run(a, tok, tokens, against=(a, tok, {}, "self"))
    d = self_rec["against"]["deltas"]
    assert self_rec["against"]["target"] == "self"
    assert d["bpb.full"] == {"value": 0.0, "ci": [0.0, 0.0], "inside_noise": True}
    assert d["acc.single.0"]["value"] == 0.0 and d["crossover_gap"]["ci"] == [0.0, 0.0]
    ra, rb = run(a, tok, tokens, against=b), run(b, tok, tokens)
    d = ra["against"]["deltas"]
    assert d["bpb.full"]["value"] == pytest.approx(ra["bpb"]["full"]["value"] - rb["bpb"]["full"]["value"], abs=1e-12)
    assert d["acc.single.2"]["value"] == pytest.approx(ra["acc"]["single"][2]["value"] - rb["acc"]["single"][2]["value"], abs=1e-12)
    assert d["routing.fraction"]["value"] == pytest.approx(ra["routing"]["fraction"] - rb["routing"]["fraction"], abs=1e-12)
    gap = (ra["crossover_gap"] - rb["crossover_gap"])
    assert d["crossover_gap"]["value"] == pytest.approx(gap, abs=1e-12)
    lo, hi = d["bpb.full"]["ci"]
    assert lo <= d["bpb.full"]["value"] <= hi and d["bpb.full"]["inside_noise"] == (lo <= 0 <= hi)
    with pytest.raises(PoelmError, match="same number of stages"):
        run(a, tok, tokens, against=make_model(tok, 5, stage_layers=(2, 2)))


def test_cut_slices_and_shrink():
    t = torch.arange(100)
    m, c = measure.cut_slices(t, 50, 20)
    assert m.tolist() == list(range(51)) and c.tolist() == list(range(51, 72))
    m, c = measure.cut_slices(t, 800, 200)  # too short: both shrink in proportion (80/20)
    assert m.numel() - 1 == 78 and c.numel() - 1 == 20 and c[0] == m[-1] + 1 and c[-1] == 99
    m, c = measure.cut_slices(t, 50, 0)
    assert c is None and m.numel() == 51


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    model = make_model(tok, 6)
    cfg = Config(model=model.config)
    path = checkpoint.save(root / "run", 120, model, cfg, tok, {"phase": {"name": "b2"}, "rel_step": 20, "lrm": 0.5})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXTS[i % 8] + " " + TEXTS[(i * 5) % 8]}) + "\n" for i in range(60)))
    return path, corpus


def test_bounds_land_in_checkpoint_and_export(ckpt, tmp_path):
    from poelm.trajectory import export

    path, corpus = ckpt
    kw = dict(data=str(corpus), split_tokens=SPLIT, calib_tokens=CALIB, probe_set=None, progress=False, samples=50, seq_len=T)
    rec = measure.measure_target(str(path), **kw)  # --data: calibration not written by default
    assert rec["calibration_written"] == [] and not (path / "calibration.json").exists()
    assert rec["step"] == 120 and rec["rel_step"] == 20 and rec["lrm"] == 0.5 and rec["data"] == str(corpus)
    assert json.loads((path / measure.RECORD_NAME).read_text())["bpb"] == rec["bpb"]
    rec = measure.measure_target(str(path), write_calibration=True, **kw)
    assert rec["calibration_written"] == ["calibration.json", "manifest.json"]
    cal = json.loads((path / "calibration.json").read_text())
    assert cal[BOUNDS_KEY] == rec["wand"]["bounds"] and cal["poe_routing"]["tau"] == rec["routing"]["tau"]
    checkpoint.verify(path)  # the manifest lists the new file with its hash
    assert checkpoint.load_model(path)[2][BOUNDS_KEY] == rec["wand"]["bounds"]

    out = export.export(path, tmp_path / "exported")
    rec2 = measure.measure_target(str(out), write_calibration=True, out=str(tmp_path / "rec.json"), **kw)
    hf = json.loads((out / "config.json").read_text())
    assert hf[BOUNDS_KEY] == rec2["wand"]["bounds"] and hf["model_type"] == "poelm"
    assert rec2["bpb"]["full"]["value"] == pytest.approx(rec["bpb"]["full"]["value"], abs=1e-9)  # same weights, same slice
    man = json.loads((out / "poelm_manifest.json").read_text())
    from poelm.fsio import sha256_file

    assert man["files"]["config.json"]["sha256"] == sha256_file(out / "config.json")
    assert json.loads((tmp_path / "rec.json").read_text())["schema"] == 1


def test_cli_measure(ckpt, tmp_path):
    path, corpus = ckpt
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "poelm", "measure", str(path), "--data", str(corpus), "--split-tokens", "600", "--calib-tokens", "200",
           "--probe", "none", "--samples", "50", "--seq-len", str(T), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "BPB full K" in r.stdout and "WAND p99" in r.stdout
    assert json.loads(out.read_text())["split_tokens"] == 600
    r = subprocess.run([sys.executable, "-m", "poelm", "measure", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_spec_teacher_forced_matches_engine(tok, tokens, monkeypatch):
    model = make_model(tok, 8)
    rec = run(model, tok, tokens, probe_set="embedded", max_new_tokens=10, m=3)
    s = rec["spec"]
    assert s["mode"] == "engine" and s["identical_outputs"] == s["prompts"] == 8
    assert s["acceptance"] == s["teacher_forced"]["acceptance"]
    assert s["mean_accepted"] == pytest.approx(s["teacher_forced"]["mean_accepted"])
    assert s["speedup"] > 0 and s["full_consistency_mismatches"] == 0
    monkeypatch.setattr(measure, "get_engine", lambda model: None)
    tf = run(model, tok, tokens, probe_set="embedded", max_new_tokens=10, m=3)
    assert tf["spec"]["mode"] == "teacher_forced" and tf["spec"]["speedup"] is None
    assert tf["spec"]["acceptance"] == s["acceptance"]
    assert tf["probe"]["generator"] == "builtin"
    assert [r["continuation"] for r in tf["probe"]["results"]] == [r["continuation"] for r in rec["probe"]["results"]]


def test_prompt_sets_and_rubric(tmp_path):
    label, card = probe.load_prompt_set("card")
    assert label == "card" and [p["name"] for p in card] == ["france", "gold", "friday", "opposite_hot", "planets", "favorite_color", "algebra"]
    assert len(probe.load_prompt_set("embedded")[1]) == 8
    gold = card[1]
    assert probe.score(" Au, atomic number 79.", gold["expect"]) and not probe.score(" Au, atomic number 80.", gold["expect"])
    assert probe.score(" so x = 2.", card[6]["expect"]) and not probe.score(" x = 25", card[6]["expect"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a", "prompt": "x", "expect": ["("]}\n')
    with pytest.raises(PoelmError, match="bad regex"):
        probe.load_prompt_set(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(PoelmError, match="bad.jsonl:1"):
        probe.load_prompt_set(str(bad))
    with pytest.raises(PoelmError, match="not found"):
        probe.load_prompt_set(str(tmp_path / "missing.jsonl"))


def test_branch_target_gets_bounds_and_record(ckpt, tmp_path):
    from poelm.trajectory import publish

    path, corpus = ckpt
    repo = tmp_path / "traj"
    branch = publish.publish(path, str(repo))
    rec = measure.measure_target(f"{repo}@{branch}", data=str(corpus), write_calibration=True, split_tokens=SPLIT, calib_tokens=CALIB,
                                 probe_set=None, progress=False, samples=50, seq_len=T, against=f"{repo}@{branch}")
    assert rec["branch"] == branch and rec["target"] == f"{repo}@{branch}" and rec["calibration_written"] == ["config.json"]
    assert rec["against"]["deltas"]["bpb.full"]["value"] == 0.0
    stored = publish.read_records(str(repo))
    assert len(stored) == 1 and stored[0]["bpb"] == rec["bpb"]
    out = publish.checkout(str(repo), branch, tmp_path / "co")  # checks every file against the manifest
    assert json.loads((out / "config.json").read_text())[BOUNDS_KEY] == rec["wand"]["bounds"]


def test_short_validation_split_is_used_whole(tok, tmp_path):
    from poelm.config import DataConfig
    from poelm.data.corpus import val_tokens

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{TEXTS[i % 8]} ({i})"}) + "\n" for i in range(30)))
    model = make_model(tok, 9)
    cfg = Config(model=model.config, data=DataConfig(path=str(corpus), val_fraction=0.5))
    got = measure.validation_tokens({"config": cfg.to_dict()}, tok, 10**6)
    assert 100 < got.numel() < 10**6 and torch.equal(got, val_tokens(cfg.data, tok, got.numel()))
    rec = measure.measure(model, tok, {"config": cfg.to_dict(), "step": 1}, split_tokens=10**6, calib_tokens=10**5, probe_set=None,
                          progress=False, samples=20, seq_len=T)
    assert rec["data"] == "val split" and rec["split_tokens"] + rec["calib_tokens"] == got.numel() - 2
    assert rec["split_tokens_requested"] == 10**6


def test_probe_row_without_room_is_a_failed_row(tok):
    model = make_model(tok, 10)
    long = {"name": "long", "prompt": " ".join(TEXTS) * 2, "expect": ["x"]}
    pr = probe.run_probe(model, tok, [long, {"name": "ok", "prompt": "The capital", "expect": []}], "custom", 5)
    assert pr["results"][0]["pass"] is False and "max_seq_len" in pr["results"][0]["error"]
    assert pr["results"][1]["pass"] is True and pr["passed"] == 1 and pr["total"] == 2
    assert probe.run_spec(model, pr, 4, engine=None)["prompts"] == 1


def test_single_stage_model(tok, tokens):
    model = make_model(tok, 11, stage_layers=(2,))  # K=1: a plain GPT
    rec = run(model, tok, tokens, probe_set="card", max_new_tokens=4)
    assert rec["K"] == 1 and rec["bpb"]["prefix"] == [] and rec["calib_tokens"] == 0
    assert rec["wand"] is None and rec["routing"] is None and rec["spec"] is None and rec["probe"]["total"] == 7
    assert rec["bpb"]["full"]["value"] == pytest.approx(rec["bpb"]["single"][0]["value"], abs=1e-6)
    assert rec["alpha_sweep"]["bpb"] == pytest.approx([rec["bpb"]["full"]["value"]] * 5, abs=1e-6)
    assert rec["crossover_gap"] == pytest.approx(0.0, abs=1e-6)


def test_bf16_autocast_and_bad_options(tok, tokens):
    model = make_model(tok, 12)
    a, b = run(model, tok, tokens), run(model, tok, tokens, dtype="bf16")
    assert a["dtype"] == "fp32" and b["dtype"] == "bf16"
    assert b["bpb"]["full"]["value"] == pytest.approx(a["bpb"]["full"]["value"], rel=0.02)
    with pytest.raises(PoelmError, match="routing metric"):
        run(model, tok, tokens, routing_metric="speed")
    with pytest.raises(PoelmError, match="split_tokens"):
        run(model, tok, tokens, split_tokens=0)
    rec = run(model, tok, tokens, routing_metric="agreement", confidence="margin", cap=0.5)
    assert rec["routing"]["metric"] == "agreement" and rec["routing"]["confidence"] == "margin"
    assert rec["routing"]["value_calib"] <= 0.5
