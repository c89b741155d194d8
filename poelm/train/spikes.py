"""``train.skip_spikes``: skip the optimizer update of a step whose loss or gradient norm spikes.

The guard for the re-warm shock (the card's continual phase: BPB +0.097 at step-86000 when the
LR came back up) follows OLMo-core's skip-step optimizers (``SkipStepAdamW``: an update is
dropped when the loss or the grad norm exceeds ``sigma_factor`` standard deviations of a rolling
window, default 6; non-finite values always). Here a step is judged twice: its rank-averaged loss
before the optimizer runs, then its global grad norm inside ``ShardedOptimizer.step`` after the
reduce-scatter and before any parameter or state is touched (the ``skip`` predicate), so a
skipped step changes neither the weights nor the optimizer state. The step still counts: the
loader has handed out its rows, the schedule and the token counters move on, so a resume of a
run with skipped steps consumes the same data as the run did, and the guard's window is saved
with every checkpoint (``state_dict``) for the same reason.

Only accepted steps enter the window (a spike must not widen the band that judges the next one),
and nothing is judged before ``min(window, MIN_HISTORY)`` accepted steps (the first steps of a
run fall fast; a band from three of them would skip ordinary steps).
"""

from __future__ import annotations

import math
from collections import deque

MIN_HISTORY = 20


class SpikeGuard:
    def __init__(self, k: float, window: int):
        self.k, self.window = float(k), int(window)
        self.losses: deque = deque(maxlen=self.window)
        self.norms: deque = deque(maxlen=self.window)
        self.skipped: list[int] = []  # steps (the update from step s to s + 1 is "step s + 1") skipped so far
        self.reason: str | None = None

    def _spike(self, hist: deque, x: float, what: str) -> str | None:
        if not math.isfinite(x):
            return f"{what} is {x}"
        if len(hist) < min(self.window, MIN_HISTORY):
            return None
        mean = sum(hist) / len(hist)
        std = math.sqrt(sum((v - mean) ** 2 for v in hist) / (len(hist) - 1))
        if x > mean + self.k * std:
            return f"{what} {x:.4g} > mean {mean:.4g} + {self.k:g} x std {std:.3g} of the last {len(hist)} steps"
        return None

    def judge_loss(self, loss: float) -> str | None:
        """Why the step with this loss must not update (None: go on to the optimizer)."""
        self.reason = self._spike(self.losses, loss, "loss")
        return self.reason

    def judge_norm(self, norm) -> bool:
        """The optimizer's ``skip`` predicate: True drops the update (``reason`` says why). The norm
        is the all-reduced one, the same on every rank, so every rank decides alike."""
        self.reason = self._spike(self.norms, float(norm), "grad norm")
        return self.reason is not None

    def done(self, step: int, loss: float, norm: float, reason: str | None) -> dict | None:
        """After step ``step`` (1-based: the update just judged); the log record of a skip."""
        if reason is None:
            self.losses.append(float(loss))
            self.norms.append(float(norm))
            return None
        self.skipped.append(int(step))
        return {"kind": "skip", "step": int(step), "loss": loss, "grad_norm": norm, "reason": reason, "skipped": len(self.skipped)}

    def state_dict(self) -> dict:
        return {"k": self.k, "window": self.window, "losses": list(self.losses), "norms": list(self.norms),
                "skipped_steps": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(float(v) for v in state.get("losses", []))
        self.norms.extend(float(v) for v in state.get("norms", []))
        self.skipped = [int(s) for s in state.get("skipped_steps", [])]


def make(train_cfg, saved: dict | None) -> SpikeGuard | None:
    """The guard of ``train.skip_spikes`` (None when 0), continuing a checkpoint's ``saved`` window."""
    if not train_cfg.skip_spikes:
        return None
    guard = SpikeGuard(train_cfg.skip_spikes, train_cfg.spike_window)
    if saved:
        guard.load_state_dict(saved)
    return guard
