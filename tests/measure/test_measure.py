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
from poelm.measure import probe, record, timing
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
    conf, disagree = [], []
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
        conf.append(model(x, stages=0).exp().amax(-1)[keep])
        disagree.append((argmax["single0"] != argmax["alpha0.0"])[keep])
    bpb = {h: v / (math.log(2) * nbytes) for h, v in nll.items()}
    acc = {h: v / count for h, v in correct.items()}
    return bpb, acc, agree / count, (torch.cat(conf), torch.cat(disagree))


def test_one_pass_matches_slow_reference(tok, tokens):
    model = make_model(tok, 1)
    rec = run(model, tok, tokens)
    bpb, acc, agree, (conf, disagree) = slow_reference(model, tok, tokens)
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
    assert r["c0"] == pytest.approx(model.flops_per_token(seq_len=T)["per_stage"][0] / model.flops_per_token(seq_len=T)["total"])
    # held-out routing at the calibrated tau, recomputed from per-position stage-0 max probabilities
    assert r["metric"] == "agreement" and r["confidence"] == "maxprob"
    routed = (conf.double() * 10000).floor() >= round(r["tau"] * 10000)
    assert r["fraction"] == pytest.approx(routed.double().mean().item(), abs=1e-12)
    assert r["value"] == pytest.approx(disagree[routed].double().mean().item() if routed.any() else 0.0, abs=1e-12)
    assert r["value_tau0"] == pytest.approx(disagree.double().mean().item(), abs=1e-12) and r["value_tau0"] == pytest.approx(1 - agree)
    assert sum(w["exit"]["fraction_per_stage"]) == pytest.approx(1.0)


def test_same_model_twice_gives_identical_numbers(tok, tokens):
    model = make_model(tok, 2)
    kw = dict(probe_set="card", max_new_tokens=6, timing_prompts=3, timing_tokens=6, timing_repeats=1)
    a, b = run(model, tok, tokens, **kw), run(model, tok, tokens, **kw)
    for rec in (a, b):
        rec.pop("elapsed_s")
        rec.pop("timing")
        for k in ("speedup", "implied_speedup", "c0_time"):
            rec["spec"].pop(k)
        rec["wand"]["generation"].pop("speedup")
        rec["routing"].get("generation", {}).pop("speedup", None)
    assert a["spec"]["mode"] == "engine" and "agreement" in a["wand"]["generation"]
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


def disagreeing_model(tok, tokens, target=0.05):
    """K=2: stage 1 adds nothing to the residual stream (h_1 = h_0) and its own head is stage 0's
    plus eps * a random matrix, so full K differs from stage 0 only where the random head overturns stage 0's
    top-1, which happens where stage 0 is unsure. eps is bisected until about ``target`` of the
    measurement positions disagree."""
    model = make_model(tok, 21, stage_layers=(1, 1))
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        b = model.blocks[1]
        b.attn.c_proj.weight.zero_()
        b.mlp.c_proj.weight.zero_()
        model.resid_lambdas[1] = 1.0
        model.x0_lambdas[1] = 0.0
        direction = torch.randn(model.stage_heads[1].weight.shape, generator=g)
        head0 = model.stage_heads[0].weight.clone()
    x = tokens[: SPLIT + 1][None, :-1][:, : (SPLIT // T) * T].reshape(-1, T)

    def rate(eps):
        with torch.no_grad():
            model.stage_heads[1].weight.copy_(head0 + direction * eps)
            z = model.stage_log_probs(x)
            return (z[0].argmax(-1) != poe.aggregate(z).argmax(-1)).double().mean().item()

    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) < target else (lo, mid)
    got = rate(hi)
    assert abs(got - target) < 0.02, got
    return model


def test_default_routing_selects_on_a_model_whose_stage0_disagrees_on_5_percent(tok, tokens):
    model = disagreeing_model(tok, tokens)
    rec = run(model, tok, tokens)
    r = rec["routing"]
    assert r["metric"] == "agreement" and r["cap"] == 0.02
    assert 0.03 < 1 - r["agreement_s0_full"] < 0.07 and r["value_tau0_calib"] > r["cap"]  # tau = 0 does not meet the cap
    assert not r["cap_met_at_tau0"] and r["tau"] > 0
    assert 0.0 < r["fraction"] < 1.0 and 0.0 < r["fraction_calib"] < 1.0
    assert r["value"] < r["value_tau0"]  # held out, routing the confident positions regresses less than routing all
    # the label-based rule (the old default) is met at tau = 0 on this model: it would route 100% and select nothing
    assert run(model, tok, tokens, routing_metric="target")["routing"]["cap_met_at_tau0"]


def test_cut_slices_and_shrink():
    t = torch.arange(100)
    m, c = measure.cut_slices(t, 50, 20)
    assert m.tolist() == list(range(51)) and c.tolist() == list(range(51, 72))
    for calib in (20, 200):  # too short: the measurement slice takes 8/9 of it, whatever the calibration size
        m, c = measure.cut_slices(t, 800, calib)
        assert m.tolist() == list(range(88)) and c.tolist() == list(range(88, 100))
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
    with pytest.raises(PoelmError, match="--write-branch"):  # --data alone: the record would go nowhere
        measure.measure_target(str(path), **kw)
    rec = measure.measure_target(str(path), write_branch=True, **kw)  # --data: calibration not written by default
    assert rec["calibration_written"] == [] and not (path / "calibration.json").exists()
    assert rec["step"] == 120 and rec["rel_step"] == 20 and rec["lrm"] == 0.5 and rec["data"] == str(corpus)
    assert rec["data_override"] is True and rec["record_written"] is True
    assert json.loads((path / measure.RECORD_NAME).read_text())["bpb"] == rec["bpb"]
    # `poelm eval` scores in the record survive a re-measurement (measure does not compute them)
    scored = json.loads((path / measure.RECORD_NAME).read_text())
    scored["benchmarks"] = [{"task": "poelm_devils_cloze", "metric": "acc", "value": 0.5}]
    (path / measure.RECORD_NAME).write_text(json.dumps(scored))
    rec = measure.measure_target(str(path), write_calibration=True, write_branch=True, **kw)
    assert rec["benchmarks"] == scored["benchmarks"]
    assert json.loads((path / measure.RECORD_NAME).read_text())["benchmarks"] == scored["benchmarks"]
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
    kw = dict(probe_set="embedded", max_new_tokens=8, m=3, gen_prompts=12, gen_tokens=8, timing_prompts=3, timing_tokens=8,
              timing_repeats=2, cap=0.7)
    rec = run(model, tok, tokens, **kw)
    s, g = rec["spec"], rec["generation"]
    assert g["prompts"] == 12 and g["new_tokens_per_prompt"] == 8 and g["seed"] == 0 and len(g["starts"]) == 12
    assert s["mode"] == "engine" and s["prompts"] == 12 and s["new_tokens"] == 96 and s["timed_prompts"] == 3
    assert s["identical_outputs"] == 3 and s["full_consistency_mismatches"] == 0
    assert s["engine_check"]["acceptance"] == s["engine_check"]["teacher_forced"]  # the engine's rounds are the exact ones
    assert s["acceptance"] == pytest.approx(s["accepted"] / s["proposed"])
    assert s["acceptance_ci"][0] <= s["acceptance"] <= s["acceptance_ci"][1] and s["acceptance_ci"][0] < s["acceptance_ci"][1]
    assert len(s["speedup"]["repeats"]) == 2 and s["speedup"]["ci"][0] <= s["speedup"]["value"] <= s["speedup"]["ci"][1]
    assert rec["timing"]["prompts"] == 3 and rec["timing"]["new_tokens"] == 24 and rec["timing"]["repeats"] == 2
    assert "bootstrap over rounds and prompts" in rec["timing"]["interval"]
    typed = record.load(rec)  # written through the typed record: loading it back is the identity, every key typed
    assert typed.to_dict() == rec and record.untyped_keys(typed) == []
    w = rec["wand"]["generation"]
    assert sum(w["depth_hist"]) == 96 and 1 <= w["mean_depth"] <= 4 and 0 <= w["agreement"] <= 1 and w["prompts"] == 12
    assert w["mean_depth_ci"][0] <= w["mean_depth"] <= w["mean_depth_ci"][1]
    monkeypatch.setattr(timing, "get_engine", lambda model: None)
    tf = run(model, tok, tokens, **kw)
    assert tf["spec"]["mode"] == "teacher_forced" and tf["spec"]["speedup"] is None
    assert tf["spec"]["acceptance"] == s["acceptance"] and tf["spec"]["acceptance_ci"] == s["acceptance_ci"]
    assert tf["probe"]["generator"] == "builtin"
    assert [r["continuation"] for r in tf["probe"]["results"]] == [r["continuation"] for r in rec["probe"]["results"]]


def test_generation_set_is_cut_from_the_slice_deterministically(tok, tokens):
    from poelm.measure.genset import cut_prompts

    meas = tokens[:1500]
    a, sa = cut_prompts(meas, tok.bos_id, 10, 40, seed=3)
    b, sb = cut_prompts(meas, tok.bos_id, 10, 40, seed=3)
    c, sc = cut_prompts(meas, tok.bos_id, 10, 40, seed=4)
    assert a == b and sa == sb and sa != sc and len(a) == 10
    ids = meas.tolist()
    for p, s in zip(a, sa):
        assert p[0] == tok.bos_id and tok.bos_id not in p[1:] and 2 <= len(p) <= 41
        assert s // 150 == sa.index(s)  # one context per stratum of 1500 / 10 positions
        win = ids[s:s + 40]
        assert any(p[1:] == win[k:k + len(p) - 1] for k in range(41 - len(p) + 1))  # a run of the slice itself
    assert cut_prompts(meas[:3], tok.bos_id, 10, 40)[0] != []  # a short slice gives fewer prompts, not an error


def test_crossed_bootstrap_by_hand():
    from scipy import stats

    from poelm.measure.bootstrap import crossed_bootstrap, expanded_tail

    # Hesterberg's expanded percentile tail: t with n-1 dof and the sqrt(n/(n-1)) correction; z = 1.96 as n grows
    assert expanded_tail(8) == pytest.approx(stats.norm.cdf(-math.sqrt(8 / 7) * 2.364624), rel=1e-4)
    assert expanded_tail(10**6) == pytest.approx(0.025, abs=1e-4) and expanded_tail(8) < expanded_tail(32) < 0.025

    num = [[2.0, 4.0], [2.0, 4.0]]
    den = [[1.0, 2.0], [1.0, 2.0]]  # every cell's ratio is 2: every resample gives 2
    p, lo, hi = crossed_bootstrap([num, den], lambda S: (S[:, 0] / S[:, 1])[:, None], samples=200, seed=1)
    assert p[0] == pytest.approx(2.0) and lo[0] == pytest.approx(2.0) and hi[0] == pytest.approx(2.0)
    den = [[1.0, 4.0], [1.0, 4.0]]  # prompt 0 ratio 2, prompt 1 ratio 1: the interval spans the prompts' spread
    p, lo, hi = crossed_bootstrap([num, den], lambda S: (S[:, 0] / S[:, 1])[:, None], samples=400, seed=1)
    assert p[0] == pytest.approx(6 / 5) and lo[0] == pytest.approx(1.0) and hi[0] == pytest.approx(2.0)


def test_second_prompt_seed_lands_inside_the_first_intervals(tok, tokens):
    """Issue 22: generation figures with intervals over prompts survive a fresh draw of prompts
    (the untimed ones here; the timed speedups are checked on the demo model, see the report)."""
    model = make_model(tok, 8)
    kw = dict(probe_set="embedded", max_new_tokens=4, m=3, gen_prompts=24, gen_tokens=12, timing_prompts=2, timing_tokens=4,
              timing_repeats=1, cap=0.7)
    one, two = (run(model, tok, tokens, gen_seed=s, **kw) for s in (0, 1))
    assert one["generation"]["starts"] != two["generation"]["starts"]
    for key in ("acceptance", "mean_accepted"):
        lo, hi = one["spec"][f"{key}_ci"]
        assert lo <= two["spec"][key] <= hi, key
    for key in ("agreement", "mean_depth"):
        lo, hi = one["wand"]["generation"][f"{key}_ci"]
        assert lo <= two["wand"]["generation"][key] <= hi, key


def test_prompt_sets_and_grading_on_the_start(tmp_path):
    label, card = probe.load_prompt_set("card")
    assert label == "card" and [p["name"] for p in card] == ["france", "gold", "friday", "opposite_hot", "planets", "favorite_color", "algebra"]
    emb = probe.load_prompt_set("embedded")[1]
    assert len(emb) == 12 and all(p["answer"] for p in emb)

    def passes(text, p, tokens=None):
        return probe.grade(probe.graded_window(text, p["sentence"]), p)["pass"]

    france, gold, algebra, color = card[0], card[1], card[6], card[5]
    assert passes(" Paris, on the Seine.", france)
    assert not passes(" a city. Paris is its capital.", france)  # the answer is not at the start: first sentence only
    assert passes(" Au, atomic number 79.", gold) and not passes(" Au, atomic number 80.", gold)
    assert passes(" 5x = 10, so x = 2.", algebra)
    assert not passes(" x = 2.5", algebra) and not passes(" x = 25", algebra)
    assert passes(" blue.", color) and not passes(" a person whose whole of the blue", color)
    absurdity = next(p for p in emb if p["name"] == "devil:ABSURDITY")
    assert absurdity == {"name": "devil:ABSURDITY", "prompt": "ABSURDITY, n.", "answer": "A statement or belief", "expect": [],
                         "window": probe.WINDOW_TOKENS, "sentence": True}
    g = probe.grade(probe.graded_window(" A statement or belief manifestly inconsistent."), absurdity)
    assert g == {"pass": True, "matched_words": 4, "answer_words": 4}
    g = probe.grade(probe.graded_window(" A statement of the ment of the ment"), absurdity)
    assert g == {"pass": False, "matched_words": 2, "answer_words": 4}
    assert probe.grade(probe.graded_window(" person whole.\nA statement or belief"), absurdity)["matched_words"] == 0
    bad = tmp_path / "bad.jsonl"
    for body, msg in (('{"name": "a", "prompt": "x", "expect": ["("]}', "bad regex"), ("not json", "bad.jsonl:1"),
                      ('{"name": "a", "prompt": "x", "expect": []}', "cannot fail"), ('{"prompt": "x", "answer": "!"}', "at least one word")):
        bad.write_text(body + "\n")
        with pytest.raises(PoelmError, match=msg):
            probe.load_prompt_set(str(bad))
    with pytest.raises(PoelmError, match="not found"):
        probe.load_prompt_set(str(tmp_path / "missing.jsonl"))


def test_embedded_retention_set_is_built_from_the_training_split():
    import gzip

    from tokenizers import Regex, pre_tokenizers

    from poelm.data.corpus import EMBEDDED, is_val
    from poelm.data.tokenizer import SPLIT_PATTERN
    from poelm.measure import retention

    built = retention.build_retention_set()
    lines = (probe.PROMPT_DIR / "embedded.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == built  # the committed set is the builder's output
    texts = [json.loads(x)["text"] for x in gzip.open(EMBEDDED, "rt", encoding="utf-8")]
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False)
    for p in built:
        entry = [t for t in texts if t.startswith(p["prompt"]) and p["answer"] in t]
        assert len(entry) >= 1, p["name"]
        text = entry[0]
        assert not is_val(text, retention.GUARD_FRACTION) and not is_val(text, 0.1)  # training split
        rest = text[len(p["prompt"]):]
        assert rest.lstrip().startswith(p["answer"]) and len(probe.words(p["answer"])) == retention.ANSWER_WORDS
        cuts = {end for _, (_, end) in split.pre_tokenize_str(text)}
        assert len(p["prompt"]) in cuts, p["name"]  # the prompt's tokens are a prefix of the entry's


def test_branch_target_gets_bounds_and_record(ckpt, tmp_path):
    from poelm.trajectory import publish

    path, corpus = ckpt
    repo = tmp_path / "traj"
    branch = publish.publish(path, str(repo))
    rec = measure.measure_target(f"{repo}@{branch}", data=str(corpus), write_calibration=True, split_tokens=SPLIT, calib_tokens=CALIB,
                                 probe_set=None, progress=False, samples=50, seq_len=T, against=f"{repo}@{branch}", write_branch=True)
    assert rec["data_override"] is True
    assert rec["branch"] == branch and rec["target"] == f"{repo}@{branch}" and rec["calibration_written"] == ["config.json"]
    assert rec["against"]["deltas"]["bpb.full"]["value"] == 0.0
    stored = publish.read_records(str(repo))
    assert len(stored) == 1 and stored[0]["bpb"] == rec["bpb"]
    out = publish.checkout(str(repo), branch, tmp_path / "co")  # checks every file against the manifest
    assert json.loads((out / "config.json").read_text())[BOUNDS_KEY] == rec["wand"]["bounds"]


def test_short_validation_split_is_fitted(tok, tmp_path):
    from poelm.config import DataConfig
    from poelm.data.corpus import MEAS_SHARE, val_tokens

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{TEXTS[i % 8]} ({i})"}) + "\n" for i in range(30)))
    model = make_model(tok, 9)
    cfg = Config(model=model.config, data=DataConfig(path=str(corpus), val_fraction=0.5))
    whole = val_tokens(cfg.data, tok, 10**6, allow_fewer=True)
    for calib in (10**5, 10**4):  # the measurement slice does not depend on the calibration size
        meas, cal = measure.validation_slices({"config": cfg.to_dict()}, tok, 10**6, calib)
        assert torch.equal(meas, whole[: int(whole.numel() * MEAS_SHARE)]) and torch.equal(cal, whole[meas.numel():])
    rec = measure.measure(model, tok, {"config": cfg.to_dict(), "step": 1}, split_tokens=10**6, calib_tokens=10**5, probe_set=None,
                          progress=False, samples=20, seq_len=T)
    assert rec["data"] == "val split" and rec["split_tokens"] + rec["calib_tokens"] == whole.numel() - 2
    assert rec["split_tokens_requested"] == 10**6 and rec["split_tokens"] == int(whole.numel() * MEAS_SHARE) - 1


def test_probe_row_without_room_is_a_failed_row(tok):
    model = make_model(tok, 10)
    long = {"name": "long", "prompt": " ".join(TEXTS) * 2, "expect": ["x"]}
    ok = probe._prompt({"name": "ok", "prompt": "The capital", "expect": [".?"]}, "test", 1)
    pr = probe.run_probe(model, tok, [probe._prompt(long, "test", 0), ok], "custom", 5)
    assert pr["results"][0]["pass"] is False and "max_seq_len" in pr["results"][0]["error"]
    assert pr["results"][1]["pass"] is True and pr["passed"] == 1 and pr["total"] == 2


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
    rec = run(model, tok, tokens, routing_metric="target_regression", confidence="margin", cap=0.5)
    assert rec["routing"]["metric"] == "target" and rec["routing"]["confidence"] == "margin"  # the old name is an alias


def _snapshot(repo):
    """Every ref's SHA and every work-tree file's bytes of a trajectory repository."""
    refs = subprocess.run(["git", "-C", str(repo), "for-each-ref", "--format=%(refname) %(objectname)"], capture_output=True,
                          text=True, check=True).stdout
    files = {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file() and ".git" not in p.parts}
    return refs, files


def test_out_no_write_and_data_leave_the_trajectory_alone(ckpt, tmp_path):
    """--out writes only FILE, --no-write nothing, --data nothing into the branch unless --write-branch
    (issue 22: a --data --out measurement used to replace the branch's val-split record)."""
    from poelm.trajectory import publish

    path, corpus = ckpt
    repo = tmp_path / "traj"
    branch = publish.publish(path, str(repo))
    kw = dict(split_tokens=SPLIT, calib_tokens=CALIB, probe_set=None, progress=False, samples=50, seq_len=T)
    first = measure.measure_target(f"{repo}@{branch}", **kw)  # the branch's own record: val split
    assert first["record_written"] and first["calibration_written"] == ["config.json"]
    before = _snapshot(repo)
    assert f"refs/heads/{branch}" in before[0] and "refs/heads/main" in before[0]
    flags = ["--split-tokens", str(SPLIT), "--calib-tokens", str(CALIB), "--probe", "none", "--samples", "50", "--seq-len", str(T), "--quiet"]
    target = f"{repo}@{branch}"
    for extra, out in ((["--out", str(tmp_path / "a.json")], tmp_path / "a.json"),
                       (["--no-write"], None),
                       (["--data", str(corpus), "--out", str(tmp_path / "b.json")], tmp_path / "b.json")):
        r = subprocess.run([sys.executable, "-m", "poelm", "measure", target, *flags, *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "model cards refreshed" not in r.stdout
        assert _snapshot(repo) == before, extra
        if out is not None:
            assert json.loads(out.read_text())["bpb"]["full"]["value"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["data"] == str(corpus)
    r = subprocess.run([sys.executable, "-m", "poelm", "measure", target, *flags, "--data", str(corpus)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--write-branch" in r.stderr
    assert _snapshot(repo) == before
    stored = publish.read_records(str(repo))
    assert stored[0]["data"] == "val split" and stored[0]["bpb"] == first["bpb"] and "data_override" not in stored[0]
    rec = measure.measure_target(target, data=str(corpus), write_branch=True, **kw)  # asked for: written, marked
    stored = publish.read_records(str(repo))
    assert stored[0]["data"] == str(corpus) and stored[0]["data_override"] is True and stored[0]["bpb"] == rec["bpb"]
    assert _snapshot(repo)[0] != before[0]
