"""Bad inputs through the real CLI (``python -m poelm``): exit code 2, exactly one stderr line
``error: <the expected message>``, no traceback, and every file that existed before is
byte-identical after (``poelm selftest inputs`` is the same suite)."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from poelm.ops import badinputs
from poelm.train import checkpoint
from poelm.data import corpus as data
from poelm.ops import selftest
from poelm.train import loop as train


def test_bad_inputs_rejected_cleanly(fx, tmp_path):
    lines = []
    cases = badinputs.bad_inputs(workdir=tmp_path / "bad", fx=fx, out=lines.append)
    print("\n".join(lines))
    failed = [f"{c.name}: {c.problems}" for c in cases if not c.ok]
    assert not failed, "\n".join(failed)
    assert len(cases) >= 20
    assert lines[-1].startswith(f"{len(cases)}/{len(cases)} bad inputs rejected cleanly")


def test_a_bad_case_is_caught_by_the_harness(fx, tmp_path):
    """The suite's checks fail when they should: a wrong message, a zero exit, a changed file."""
    (tmp_path / "keep.txt").write_text("x")
    c = badinputs.run_case(badinputs.Case("wrong message", ["checkout", fx.seed_repo, "step 1", tmp_path / "o"], r"no such message"), [tmp_path])
    assert c.rc == 2 and not c.ok and "does not match" in c.problems[0]
    c = badinputs.run_case(badinputs.Case("not an error", ["branches", fx.seed_repo], r"."), [tmp_path])
    assert c.rc == 0 and any("exit code 0" in p for p in c.problems)
    before = badinputs._digest([tmp_path])
    (tmp_path / "keep.txt").write_text("y")
    c = badinputs.run_case(badinputs.Case("changed", ["checkout", fx.seed_repo, "step 1", tmp_path / "o"], r"invalid branch"), [tmp_path], before)
    assert c.changed == ["0:keep.txt"] and not c.ok


def _nan_run(fx, out):
    p = selftest.cli_run(["continue", "--from", fx.ref / "step-00004", "--set", "optim.scalar_lr=1e30", "--steps", "4",
                          "--save-every", "1", "--out", out, "--quiet"])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    m = re.search(r"at step (\d+);.*the last good checkpoint is (\S+) ", p.stderr)
    assert m, p.stderr
    return int(m.group(1)), m.group(2)


def test_nan_stop_names_a_checkpoint_that_is_good(fx, tmp_path):
    step, good = _nan_run(fx, tmp_path / "nan")
    meta = json.loads((tmp_path / "nan" / good.rsplit("/", 1)[-1] / "meta.json").read_text())
    assert math.isfinite(meta["train_val_bpb"]), f"'last good' {good} has val BPB {meta['train_val_bpb']} (NaN at step {step})"
    w = load_file(f"{tmp_path / 'nan' / good.rsplit('/', 1)[-1]}/model.safetensors")
    assert all(bool(torch.isfinite(v).all()) and v.abs().max() < 1e6 for v in w.values())


def test_logged_val_bpb_is_that_of_the_saved_weights(fx):
    """Regression: the merged-head cache once went stale during training (optimizer writes via
    ``.data`` do not bump ``_version``), so the logged/saved val BPB was not that of the weights."""
    cfg = checkpoint.load(fx.ref / "step-00004", with_optim=False).config
    model, tok, meta = checkpoint.load_model(fx.ref / "step-00004")
    val = data.val_tokens(cfg.data, tok, cfg.train.eval_tokens)
    res = train.evaluate_bpb(model, val, tok.token_bytes(), cfg.train.device_batch_size, cfg.seq_len)
    assert res["full"] == pytest.approx(meta["train_val_bpb"], rel=1e-6)
