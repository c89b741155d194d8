"""``poelm continue --add-data PATH --replay R`` and ``poelm measure --slice``: the new mixture, its
record, the carried loader position, the two-slice answer, and the bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poelm.data.stdlib import write_corpus
from poelm.measure import domains
from poelm.report.answer import domain_answer_lines
from poelm.train import checkpoint as ckpt_mod
from poelm.train import loop


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_seed):
    root = tmp_path_factory.mktemp("domain")
    code = root / "code.jsonl"
    write_corpus(code, max_files=12)  # a handful of stdlib files, cut into ~2 kB documents
    return tiny_seed, code, root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "poelm", *map(str, args)], capture_output=True, text=True)


def test_add_data_mixture_record_and_loader(base, tmp_path):
    seed, code, _ = base
    loop.continue_phase(seed, tmp_path / "r25", steps=2, progress=False, overrides=["train.save_every=1"], add_data=str(code), replay=0.25)
    ck = ckpt_mod.load(ckpt_mod.latest(tmp_path / "r25"))
    assert ck.meta["added_data"] == {"path": str(code), "replay": 0.25, "mixture": {"embedded": 0.25, "added": 0.75}}
    assert [(s.name, s.weight) for s in ck.config.data.sources] == [("embedded", 0.25), ("added", 0.75)]
    old = ckpt_mod.load(seed).meta["loader_state"]
    st = ck.meta["loader_state"]
    assert st["rows"] > old["rows"]  # the row counter carried over and moved on
    emb = next(s for s in st["sources"] if s["name"] == "embedded")
    assert emb["rows"] >= old["sources"][0]["rows"]  # the old stream continues where it stopped
    assert sum(s["rows"] for s in st["sources"]) == st["rows"]
    # the seed save of the phase is the source, byte for byte
    seed0 = ckpt_mod.load(tmp_path / "r25" / "step-00002")
    assert seed0.meta["added_data"]["replay"] == 0.25
    loop.continue_phase(seed, tmp_path / "r0", steps=1, progress=False, add_data=str(code), replay=0.0)
    ck0 = ckpt_mod.load(ckpt_mod.latest(tmp_path / "r0"))
    assert [s.name for s in ck0.config.data.sources] == ["added"] and ck0.meta["loader_state"]["sources"][0]["rows"] > 0


def test_slices_gain_and_retention(base, tmp_path):
    seed, code, root = base
    out = tmp_path / "c"
    loop.continue_phase(seed, out, steps=3, progress=False, overrides=["train.save_every=3"], add_data=str(code), replay=0.25)
    res = domains.measure_targets([str(out)], {"old": "embedded", "new": str(code)}, against=str(seed), max_bytes=20_000,
                                  device="cpu", samples=200)
    (rec,) = res["records"]
    ref = res["reference"]
    for name in ("old", "new"):
        d = rec["slices"][name]["delta_bpb"]
        assert d["value"] == pytest.approx(rec["slices"][name]["bpb"] - ref["slices"][name]["bpb"], abs=1e-12)
        assert d["ci"][0] <= d["value"] <= d["ci"][1]
        assert 0.1 < rec["slices"][name]["tokens_per_byte"] < 1.0
    lines = domain_answer_lines(res, "new", "old")
    assert len(lines) == 1 and "gain on `new`" in lines[0] and "retention on `old`" in lines[0]
    g = -rec["slices"]["new"]["delta_bpb"]["value"]
    assert f"{g:+.4f}" in lines[0]


def test_paired_delta_by_hand():
    a = np.array([[10.0, 8.0, 4.0], [6.0, 4.0, 2.0]])
    b = np.array([[12.0, 8.0, 5.0], [6.0, 4.0, 3.0]])
    d = domains.paired_delta(a, b, samples=50)
    assert d["value"] == pytest.approx((16 - 18) / (np.log(2) * 12))
    with pytest.raises(domains.PoelmError):
        domains.paired_delta(a, b[:1])
    assert domains.figures(a)["tokens_per_byte"] == pytest.approx(0.5)


@pytest.mark.parametrize("extra,words", [(["--replay", "1"], "[0, 1)"), (["--replay", "-0.1"], "[0, 1)"), ([], "--replay goes with")])
def test_bad_replay_one_line_nothing_written(base, tmp_path, extra, words):
    seed, code, _ = base
    out = tmp_path / "out"
    args = ["continue", "--from", seed, "--out", out, "--steps", "1"] + (["--add-data", code] if extra else ["--replay", "0.5"]) + extra
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not out.exists()


def test_bad_slice_and_missing_corpus(base, tmp_path):
    seed, _, _ = base
    r = _cli("measure", seed, "--slice", "oops")
    assert r.returncode == 2 and "NAME=PATH" in r.stderr and r.stderr.count("\n") == 1
    out = tmp_path / "o"
    r = _cli("continue", "--from", seed, "--out", out, "--steps", "1", "--add-data", tmp_path / "nope.jsonl")
    assert r.returncode == 2 and "not found" in r.stderr and r.stderr.count("\n") == 1 and not out.exists(), r.stderr


def test_doc_sums_batching_changes_nothing(base):
    seed, code, _ = base
    model, tok, _ = ckpt_mod.load_model(seed)
    docs = domains.slice_docs(str(code), 0.1, 8000)
    a = domains.doc_sums(model, tok, docs, 32, batch_size=1)
    b = domains.doc_sums(model, tok, docs, 32, batch_size=16)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a[:, 1].sum() == sum(len(d.encode()) for d in docs)  # every byte of every document is a target byte


def test_mix_slice_is_the_training_mix_by_weight(base, tmp_path):
    seed, code, _ = base
    loop.continue_phase(seed, tmp_path / "m", steps=1, progress=False, add_data=str(code), replay=0.25)
    cfg = ckpt_mod.load(ckpt_mod.latest(tmp_path / "m")).config.to_dict()["data"]
    docs = domains.mix_docs(cfg, 40_000)
    emb = domains.slice_docs("embedded", cfg["val_fraction"], 10_000)
    new = domains.slice_docs(str(code), cfg["val_fraction"], 30_000)
    assert docs == emb + new  # each source's validation documents, its weight's share of the bytes
    assert domains.mix_docs(ckpt_mod.load(seed).config.to_dict()["data"], 10_000) == emb


def test_the_old_slice_defaults_to_the_training_mix(base, tmp_path):
    """``--slice new=PATH`` alone: an ``old`` slice of the training mix's own validation split is
    measured too, and the answer gives retention on it (issue 31: the default old slice)."""
    seed, code, _ = base
    out = tmp_path / "slices.json"
    r = _cli("measure", seed, "--slice", f"new={code}", "--against", seed, "--slice-bytes", "6000", "--samples", "50",
             "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (rec,) = res["records"]
    assert list(rec["slices"]) == ["old", "new"] and res["slices"]["old"] == domains.MIX
    assert rec["slices"]["old"]["delta_bpb"]["value"] == 0.0  # the seed against itself
    assert "retention on `old`" in r.stdout
