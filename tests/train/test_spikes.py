"""``train.skip_spikes``: an injected loss spike and an injected gradient spike are skipped (no
update, the data position still advances, logged and counted), a resume of a run with a skipped
step stays exact, and the guard's own arithmetic."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from poelm.core.errors import ConfigError
from poelm.core.model import PoEGPT
from poelm.train import loop as train
from poelm.train.spikes import MIN_HISTORY, SpikeGuard
from test_train import tiny_cfg

STEPS, SPIKE = 26, 24  # the spike comes after MIN_HISTORY accepted steps


def _inject(monkeypatch, at: int, kind: str, start: int = 0):
    """From the call for step ``at`` (1-based; ``start`` steps already done) on that one step only:
    report a 10x loss (``kind = "loss"``) or leave gradients 1000x too large (``"grad"``)."""
    orig, calls = PoEGPT.backward_local, {"n": start}

    def wrapped(self, *a, **kw):
        loss, ces = orig(self, *a, **kw)
        calls["n"] += 1  # one micro-batch per step in the tiny config
        if calls["n"] == at:
            if kind == "loss":
                loss = loss * 10
            else:
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1000)
        return loss, ces

    monkeypatch.setattr(PoEGPT, "backward_local", wrapped)


def _log(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _cfg(*extra):
    return tiny_cfg(f"schedule.steps={STEPS}", "train.skip_spikes=4", "train.spike_window=30", *extra)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_injected_spike_is_skipped_and_the_data_still_advances(kind, tmp_path, monkeypatch):
    _inject(monkeypatch, SPIKE, kind)
    out = tmp_path / "run"
    train.train(_cfg("train.save_every=1"), out, progress=False)
    skips = _log(out, "skip")
    assert [s["step"] for s in skips] == [SPIKE] and ("loss" if kind == "loss" else "grad norm") in skips[0]["reason"]
    before, after = (out / f"step-{s:05d}" for s in (SPIKE - 1, SPIKE))
    for name in ("model.safetensors", "optim.safetensors"):  # the skipped step changed nothing
        a, b = load_file(str(before / name)), load_file(str(after / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ma, mb = (json.loads((d / "meta.json").read_text()) for d in (before, after))
    assert mb["loader_state"]["rows"] - ma["loader_state"]["rows"] == 4  # the spike's rows were consumed
    assert mb["tokens"] > ma["tokens"] and mb["spike_guard"]["skipped_steps"] == [SPIKE]
    final = json.loads((out / f"step-{STEPS:05d}" / "meta.json").read_text())
    assert final["spike_guard"]["skipped_steps"] == [SPIKE]
    assert _log(out, "train")[-1]["skipped"] == 1
    # the step after the skip updates again
    c = load_file(str((out / f"step-{SPIKE + 1:05d}") / "model.safetensors"))
    assert any(not torch.equal(load_file(str(after / "model.safetensors"))[k], c[k]) for k in c)


def test_resume_after_a_skipped_step_is_exact(tmp_path, monkeypatch):
    _inject(monkeypatch, SPIKE, "loss")
    straight = tmp_path / "straight"
    train.train(_cfg("train.save_every=22"), straight, progress=False)
    _inject(monkeypatch, SPIKE, "loss", start=22)
    train.train(_cfg(), tmp_path / "resumed", resume=straight / "step-00022", progress=False)
    a, b = (load_file(str(d / f"step-{STEPS:05d}" / "model.safetensors")) for d in (straight, tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(straight, "train")][22:] == [r["loss"] for r in _log(tmp_path / "resumed", "train")]
    assert [s["step"] for s in _log(tmp_path / "resumed", "skip")] == [SPIKE]


def test_guard_arithmetic_and_config():
    g = SpikeGuard(3, 50)
    for i in range(MIN_HISTORY - 1):
        assert g.judge_loss(5.0 + 0.01 * (i % 3)) is None
        g.done(i + 1, 5.0 + 0.01 * (i % 3), 1.0, None)
    assert g.judge_loss(50.0) is None  # too little history to judge by sigma
    assert g.judge_loss(math.nan) == "loss is nan"  # non-finite: always
    assert g.done(MIN_HISTORY, 5.0, 1.0, None) is None
    assert g.judge_loss(5.03) is None and g.judge_loss(5.2).startswith("loss 5.2 > mean")
    assert g.judge_norm(torch.tensor(float("inf"))) and not g.judge_norm(torch.tensor(1.0))
    for bad in ("train.skip_spikes=-1", "train.spike_window=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            tiny_cfg(bad)
