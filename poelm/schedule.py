"""The learning-rate multiplier ``lrm(step)`` of one phase, anchored at the phase's start step.

A warmup-stable-decay (WSD) shape as in nanochat's ``get_lr_multiplier`` and torchtitan's WSD
schedule, with the card's knobs (SPEC "LR multiplier"): linear ``0 -> peak`` over ``warmup``
steps, constant ``peak``, then linear ``peak -> final`` over the last ``warmdown_ratio`` of the
phase. A continual phase is the same function of ``rel = step - start_step``.

Card values: original phase 83,923 steps, warmup 1000, peak 1.0, warmdown 0.65, final 0.05;
continual "B2" 50,800 steps, warmup 1000, peak 0.5, warmdown 0.55 (warmdown starts at rel
22,861), final 0.0. As in nanochat, the warmdown lasts ``W = round(steps * warmdown_ratio)``
steps, the multiplier stays at ``peak`` through ``rel = steps - W`` and decays as
``final + (peak - final) * (steps - rel) / W`` after it, so the first decayed step ("warmdown
starts") is ``steps - W + 1``: 50,800 - 27,940 + 1 = 22,861, the card's number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    steps: int
    warmup: int = 1000
    peak: float = 1.0
    warmdown_ratio: float = 0.65
    final: float = 0.05
    start_step: int = 0
    name: str = "base"

    @property
    def warmdown_steps(self) -> int:
        return int(round(self.steps * self.warmdown_ratio))

    @property
    def warmdown_start(self) -> int:
        """First relative step whose multiplier is below ``peak`` (the card's "warmdown starts")."""
        return self.steps - self.warmdown_steps + 1

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


def lrm(step: int, phase: "Phase | Cooldown") -> float:
    """LR multiplier at global ``step`` of ``phase`` (a pure function)."""
    rel = step - phase.start_step
    if rel < 0:
        raise ValueError(f"step {step} precedes the phase start {phase.start_step}")
    if isinstance(phase, Cooldown):
        return cooldown_lrm(rel, phase.steps, phase.from_lrm, phase.to_lrm, phase.shape)
    W = phase.warmdown_steps
    if rel >= phase.steps:
        return phase.final
    if phase.warmup > 0 and rel < phase.warmup:
        warm = phase.peak * rel / phase.warmup
        return warm if rel <= phase.steps - W else min(warm, _decay(rel, phase))
    if rel <= phase.steps - W:
        return phase.peak
    return _decay(rel, phase)


def _decay(rel: int, phase: Phase) -> float:
    progress = (phase.steps - rel) / max(1, phase.warmdown_steps)
    return phase.final + (phase.peak - phase.final) * progress


# ----------------------------------------------------------------------------- cooldown probes
# A cooldown probe answers "what would BPB be if we annealed here?": from a constant-LR checkpoint,
# decay the multiplier to ``to_lrm`` over a short ``N`` steps, measure, throw the branch away.
# Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
# arXiv:2405.18392) show such a cooldown recovers the loss of a full schedule; of their shapes,
# "1-sqrt" (lr(t) = lr0 * (1 - sqrt(t/N))) beats linear. Both are offered here.
COOLDOWN_SHAPES = ("linear", "1-sqrt")


def cooldown_lrm(t: int, steps: int, start: float, end: float = 0.0, shape: str = "linear") -> float:
    """LR multiplier ``t`` steps into an ``N = steps`` step cooldown from ``start`` to ``end``.

    linear: ``end + (start - end) * (1 - t/N)``; 1-sqrt: ``end + (start - end) * (1 - sqrt(t/N))``
    (Hägele et al. 2024). Same step convention as ``lrm``: the update taking step ``t`` to
    ``t + 1`` uses ``cooldown_lrm(t)``, so the first update runs at ``start`` and the save after
    the last one (``t = N``) records ``end``. ``t >= N`` stays at ``end``."""
    if steps <= 0:
        raise ValueError(f"a cooldown needs steps >= 1, got {steps}")
    if t < 0:
        raise ValueError(f"cooldown step {t} is negative")
    if shape not in COOLDOWN_SHAPES:
        raise ValueError(f"unknown cooldown shape {shape!r}: expected one of {', '.join(COOLDOWN_SHAPES)}")
    if t >= steps:
        return float(end)
    frac = t / steps
    weight = 1.0 - frac if shape == "linear" else 1.0 - math.sqrt(frac)
    return end + (start - end) * weight


@dataclass(frozen=True)
class Cooldown:
    """A cooldown probe as a phase: ``steps`` steps from ``start_step``, lrm ``from_lrm -> to_lrm``.

    It has the ``Phase`` attributes the training loop reads (``steps``, ``start_step``,
    ``end_step``, ``name``), and ``lrm(step, cooldown)`` dispatches to ``cooldown_lrm``, so one
    loop trains both. ``kind`` tells the two apart in a checkpoint's ``meta.json``."""

    steps: int
    start_step: int
    from_lrm: float
    to_lrm: float = 0.0
    shape: str = "linear"
    name: str = "cooldown"
    kind = "cooldown"  # a class constant, not a field

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "start_step": self.start_step, "steps": self.steps,
                "from_lrm": self.from_lrm, "to_lrm": self.to_lrm, "shape": self.shape}

    @classmethod
    def from_dict(cls, d: dict) -> "Cooldown":
        return cls(**{k: d[k] for k in ("steps", "start_step", "from_lrm", "to_lrm", "shape", "name") if k in d})


# Presets named by the card.
CARD_ORIGINAL = dict(steps=83_923, warmup=1000, peak=1.0, warmdown_ratio=0.65, final=0.05)
CARD_B2 = dict(steps=50_800, warmup=1000, peak=0.5, warmdown_ratio=0.55, final=0.0)
