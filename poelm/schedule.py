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


def lrm(step: int, phase: Phase) -> float:
    """LR multiplier at global ``step`` of ``phase`` (a pure function)."""
    rel = step - phase.start_step
    if rel < 0:
        raise ValueError(f"step {step} precedes the phase start {phase.start_step}")
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


# Presets named by the card.
CARD_ORIGINAL = dict(steps=83_923, warmup=1000, peak=1.0, warmdown_ratio=0.65, final=0.05)
CARD_B2 = dict(steps=50_800, warmup=1000, peak=0.5, warmdown_ratio=0.55, final=0.0)
