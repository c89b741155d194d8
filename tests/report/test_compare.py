"""poelm compare: runs side by side on one slice, the gap and its course with paired intervals;
bad inputs are one error line, nothing written."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from poelm import cli
from poelm.measure import compare as cmp
from poelm.report import compare as R
from poelm.train import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trajectory"))
from test_export import PHASE, make_ckpt  # noqa: E402

LN2 = math.log(2)


# ----------------------------------------------------------------------------- hand-built blocks
def _save(step, lrm=0.5):
    return cmp.Save(f"x@step-{step:05d}", step, 1000 * step, lrm, dict(PHASE), None, None)


def _comparison(nll, nbytes, steps=(100, 600)):
    """Two runs x len(steps) saves; ``nll[r][p]`` per-block NLL lists, ``nbytes`` per block."""
    runs = [cmp.Run(name, name, [_save(s) for s in steps], {"model": {"stage_layers": [1], "objective": "poe"}}, "fp")
            for name in ("A", "B")]
    cols, arr = {}, []
    for r in range(2):
        for p in range(len(steps)):
            cols[(r, p, "out")], cols[(r, p, "bytes")] = len(arr), len(arr) + 1
            arr += [nll[r][p], nbytes]
    sl = {"split_tokens": 4 * 64, "seq_len": 64, "block_tokens": 64, "n_blocks": len(nbytes), "batch_size": 8}
    return cmp.Comparison(runs, "step", list(steps), np.array(arr, dtype=np.float64).T, cols, sl, [r.saves for r in runs])


def test_gap_and_course_match_a_hand_computation():
    nbytes = [100.0, 200.0, 300.0, 400.0]
    # every block of a run at a save has the same NLL per byte, so every resample gives the point value:
    # BPB = c / ln 2, and the intervals collapse onto it
    per_byte = {(0, 0): 1.0, (0, 1): 0.9, (1, 0): 0.95, (1, 1): 0.8}
    nll = [[[per_byte[(r, p)] * b for b in nbytes] for p in range(2)] for r in range(2)]
    res = R.build(_comparison(nll, nbytes), samples=200)
    a0, b0, a1, b1 = (per_byte[k] / LN2 for k in [(0, 0), (1, 0), (0, 1), (1, 1)])
    p0, p1 = res["points"]
    assert p0["runs"][0]["bpb"]["value"] == pytest.approx(a0, rel=1e-12)
    assert p0["gaps"][0]["abs"]["value"] == pytest.approx(a0 - b0, rel=1e-9)
    assert p1["gaps"][0]["rel"]["value"] == pytest.approx((a1 - b1) / b1, rel=1e-9)
    assert p1["gaps"][0]["abs"]["ci"] == pytest.approx([a1 - b1] * 2, rel=1e-9)
    c = res["courses"][0]
    assert c["change"]["value"] == pytest.approx((a1 - b1) - (a0 - b0), rel=1e-9)
    line = R.course(res)
    assert "widening" in line and "+0.072135" in line and "+12.50 %" in line and "+5.26 %" in line  # (0.9 - 0.8) / 0.8, (1 - 0.95) / 0.95
    # the one schedule segment the saves span (PHASE: warmup 10, warmdown from rel 450: step 600 is in the warmdown)
    assert [s["segment"] for s in c["segments"]] == ["b2 warmdown"]


def test_course_flat_within_interval_and_narrowing():
    nbytes = [100.0, 100.0, 100.0, 100.0]
    a = [1.0, 1.2, 0.8, 1.0]  # run A's NLL per block at both saves
    b0 = [0.9, 1.1, 0.7, 0.9]
    b1 = [0.95, 1.02, 0.78, 0.93]  # the gap moves by less than its noise
    res = R.build(_comparison([[a, a], [b0, b1]], nbytes), samples=300)
    assert "flat within its interval" in R.course(res)
    b1 = [0.99, 1.19, 0.79, 0.99]  # the gap all but closes, block by block
    res = R.build(_comparison([[a, a], [b0, b1]], nbytes), samples=300)
    assert "narrowing" in R.course(res)
    ci = res["courses"][0]["change"]["ci"]
    assert ci[1] < 0


# ----------------------------------------------------------------------------- two tiny runs, end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    for name, seed in (("a", 0), ("b", 5)):
        for i, step in enumerate((100, 200)):
            make_ckpt(root / name / f"step-{step:05d}", step=step, tokens=1000 * (i + 1), seed=seed + i)
    return root


def _hand_bpb(ckpt: Path, split: int) -> float:
    """Full-K PoE BPB of a checkpoint on poelm measure's slice, computed here from the model's stage log-probs."""
    from poelm.core.poe import aggregate
    from poelm.measure.run import DEFAULT_CALIB_TOKENS, validation_slices

    model, tok, meta = checkpoint.load_model(ckpt)
    meas, _ = validation_slices(meta, tok, split, DEFAULT_CALIB_TOKENS)
    tb = tok.token_bytes()
    nll = nbytes = 0.0
    for a in range(0, meas.numel() - 1, 64):  # rows of 64 targets, as val_batches cuts them
        x, y = meas[a:a + 64][None], meas[a + 1:a + 65][None]
        x = x[:, :y.shape[1]]
        with torch.no_grad():
            logp = aggregate(model.stage_log_probs(x), 0.0)
        counted = tb[y] > 0  # SPEC: BOS targets carry 0 bytes and are left out
        nll += float(-logp.gather(-1, y[..., None])[..., 0][counted].sum())
        nbytes += float(tb[y].sum())
    return nll / (LN2 * nbytes)


def test_compare_two_tiny_runs_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["compare", str(runs / "a"), str(runs / "b"), "--labels", "A,B", "--out", str(out), "--split-tokens", "512",
                   "--seq-len", "64", "--block-tokens", "64", "--samples", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Gap A − B" in text
    res = json.loads((out / "compare.json").read_text())
    assert res["keys"] == [100, 200] and res["slice"]["split_tokens"] == 512 and res["slice"]["n_blocks"] == 8
    for p, step in enumerate((100, 200)):
        a, b = (_hand_bpb(runs / n / f"step-{step:05d}", 512) for n in "ab")
        pt = res["points"][p]
        assert pt["runs"][0]["bpb"]["value"] == pytest.approx(a, rel=1e-5)
        assert pt["runs"][1]["bpb"]["value"] == pytest.approx(b, rel=1e-5)
        assert pt["gaps"][0]["abs"]["value"] == pytest.approx(a - b, rel=1e-4, abs=1e-7)
        lo, hi = pt["gaps"][0]["abs"]["ci"]
        assert lo <= pt["gaps"][0]["abs"]["value"] <= hi
    assert res["stages_compared"] == 3 and len(res["points"][0]["gaps"][0]["stages"]) == 3
    assert (out / "compare.png").stat().st_size > 1000 and "## Course of the gap" in (out / "compare.md").read_text()
    assert "poelm measure" in (out / "compare.md").read_text()  # the saves have no record of their own: named
    # run A as a published trajectory, aligned by tokens: the same saves, the same figures
    from poelm.trajectory import publish

    repo = tmp_path / "repo"
    for step in (100, 200):
        publish.publish(runs / "a" / f"step-{step:05d}", repo)
    rc = cli.main(["compare", str(repo), str(runs / "b"), "--by", "tokens", "--out", str(tmp_path / "out2"), "--split-tokens", "512",
                   "--seq-len", "64", "--block-tokens", "64", "--samples", "200"])
    assert rc == 0
    res2 = json.loads((tmp_path / "out2" / "compare.json").read_text())
    assert res2["keys"] == [1000, 2000] and res2["by"] == "tokens"
    for p in range(2):
        assert res2["points"][p]["gaps"][0]["abs"] == res["points"][p]["gaps"][0]["abs"]


def _refuses(argv, capsys, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_bad_inputs_one_line_nothing_written(runs, tmp_path, capsys):
    out = tmp_path / "out"
    # another tokenizer
    other = tmp_path / "tok"
    shutil.copytree(runs / "b", other)
    from poelm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["completely different words here"] * 40 + ["zebra quartz vexing jumps"] * 40, 300)
    for d in other.iterdir():
        tok.save(d)
        checkpoint.write_manifest(d)
    _refuses(["compare", str(runs / "a"), str(other), "--out", str(out)], capsys, "different tokenizers")
    # other validation data
    data = tmp_path / "data"
    shutil.copytree(runs / "b", data)
    for d in data.iterdir():
        cfg = json.loads((d / "config.json").read_text())
        cfg["data"] = {"val_fraction": 0.2}
        (d / "config.json").write_text(json.dumps(cfg))
        checkpoint.write_manifest(d)
    _refuses(["compare", str(runs / "a"), str(data), "--out", str(out)], capsys, "different validation data (data.val_fraction")
    # no common step; a missing TARGET; one run; labels that do not fit
    _refuses(["compare", str(runs / "a" / "step-00100"), str(runs / "b" / "step-00200"), "--out", str(out)], capsys, "no step is saved by every run")
    _refuses(["compare", str(runs / "a"), str(tmp_path / "nope"), "--out", str(out)], capsys, "not found")
    _refuses(["compare", str(runs / "a"), "--out", str(out)], capsys, "two or more runs")
    _refuses(["compare", str(runs / "a"), str(runs / "b"), "--labels", "A", "--out", str(out)], capsys, "--labels needs 2")
    _refuses(["compare", str(runs / "a"), str(runs / "a"), "--out", str(out)], capsys, f"TARGET {runs / 'a'} is given twice")
    assert not out.exists()
