"""The trajectory verdict: every metric's change vs the seed, its noise band, its trend, in words.

The card's question: does a re-warmed LR cycle make *several metrics diverge from the seed in a
coherent direction*, or do the rows stay within noise of the seed (a null result)? This module
answers it from the measurement records alone (schema: ``docs/record.md``); every sentence is
generated from the numbers.

Definitions (SPEC is silent on the statistics; these are ours):
- **seed**: the record whose step equals the phase's ``start_step`` (the resume checkpoint), else
  the first record. Every delta is ``value(newest) - value(seed)``.
- **noise band** of a delta, two tests, both applied when available:
  (a) the bootstrap interval: the record's ``against`` block gives the paired delta's 95% CI
  (outside noise iff it excludes 0); without it, when both records carry value CIs, the two value
  intervals must not overlap (a conservative stand-in);
  (b) the card's empirical floor: ``|value(first save) - value(seed)|`` where the first save after
  the seed still lies in the warmup (the card: "77 steps at warmup-near-zero LR cannot move the
  model meaningfully", so that difference is pure measurement noise). ``|delta|`` must exceed it.
  A wall-clock figure (a measured or implied speedup) is an estimate from timing rounds: its
  change is called real only when test (a) is available and passes (the two records' [min, max]
  intervals over the rounds do not overlap); without intervals its noise band is "not available".
- **segment** of the phase at relative step ``rel``: warmup ``rel < warmup``, peak
  ``warmup <= rel < warmdown_start`` (the first decayed step, ``poelm.schedule.Phase``), warmdown
  after. Trends are tested over the saves of the newest record's segment (excluding the seed), so
  the LR shock at the re-warmup does not masquerade as a trend inside the peak phase.
- **trend**: Mann–Kendall (Kendall's tau of value vs step; exact p for small n, scipy) at
  ``level`` (default 0.05), with Spearman's rho alongside. Not significant -> "oscillating within
  an envelope [min, max]" (or "drifting" when the series is monotone yet not significant).
  Across N metrics about ``N * level`` trends are expected by chance; the overall line compares
  the count with that (a one-sided binomial test, which ignores correlation between metrics).
- **LR shock**: the largest save-to-save change of a metric falls at the first save after warmup
  and exceeds the noise floor.
- **kinds** (issue 22): *quality* (BPB full / single / prefix, accuracy, probe) answers the card's
  question; *stage structure* (s0 = full agreement, WAND bounds, crossover gap) and *inference
  efficiency* (acceptance, mean accepted, speedups, routed fraction, exit depth) say how the
  stages agree and what that buys at decoding time, not how good the model is.
- **coherent divergence** (judged on quality only): at least 2 quality figures with a preferred
  direction are outside the noise band and at least ``COHERENT_SHARE`` of them moved the same way.
- A bare number's interval may sit beside it as ``<name>_ci`` (``crossover_gap_ci``,
  ``spec.acceptance_ci``); ``get`` reads both forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from scipy import stats

from poelm.measure.record import figure, lookup
from poelm.schedule import Phase

COHERENT_SHARE = 0.75


# ----------------------------------------------------------------------------- record access
def get(rec, key: str):
    """``(value, ci)`` at dotted ``key`` ("bpb.single.0", "spec.acceptance"); ``(None, None)`` if absent
    (``record.figure``, the one reader of a figure and its interval)."""
    return figure(rec, key)


def value(rec: dict, key: str):
    return get(rec, key)[0]


def branch_name(rec: dict) -> str:
    return rec.get("branch") or f"step-{int(rec['step']):05d}"


def sort_records(records) -> list[dict]:
    return sorted(records, key=lambda r: int(r["step"]))


def phase_of(records) -> Phase | None:
    """The phase of the newest record that has one (``Phase`` of ``poelm.schedule``)."""
    for rec in reversed(sort_records(records)):
        ph = rec.get("phase")
        if isinstance(ph, dict):
            fields = {k: ph[k] for k in ("steps", "warmup", "peak", "warmdown_ratio", "final", "start_step", "name") if k in ph}
            return Phase(**fields)
    return None


def seed_position(records: list[dict]) -> int:
    """Index (in step order) of the seed: the record at the phase's start step, else the first."""
    recs = sort_records(records)
    ph = phase_of(recs)
    if ph is not None:
        for i, r in enumerate(recs):
            if int(r["step"]) == ph.start_step:
                return i
    return 0


def rel_step(rec: dict, phase: Phase | None):
    if rec.get("rel_step") is not None:
        return int(rec["rel_step"])
    return None if phase is None else int(rec["step"]) - phase.start_step


def segment(rel, phase: Phase | None) -> str | None:
    """"warmup" | "peak" | "warmdown" | "after" | "before" for a relative step (None: no phase)."""
    if phase is None or rel is None:
        return None
    if rel < 0:
        return "before"
    if rel > phase.steps:
        return "after"
    if rel < phase.warmup:
        return "warmup"
    return "peak" if rel < phase.warmdown_start else "warmdown"


# ----------------------------------------------------------------------------- metric catalogue
def fmt_num(d):
    """Formatter of a value with d decimals (tables and sentences share it)."""
    return lambda v: f"{v:.{d}f}"


def fmt_signed(d):
    return lambda v: f"{v:+.{d}f}"


def fmt_pct(v):
    return f"{100 * v:.2f}%"


def _dpct(v):
    return f"{100 * v:+.2f} pp"


@dataclass(frozen=True)
class Metric:
    key: str  # dotted path into the record (same keys as the record's "against" deltas)
    label: str
    family: str
    better: str | None  # "lower" | "higher" | None (no preferred direction)
    fmt: Callable[[float], str]
    dfmt: Callable[[float], str]
    timing: bool = False  # a wall-clock estimate: its change needs an interval to be called real
    kind: str = "quality"  # "quality" | "structure" | "efficiency": what the figure says about the model


KINDS = {"quality": "Quality", "structure": "Stage structure", "efficiency": "Inference efficiency"}


def metrics_for(records) -> list[Metric]:
    """The metrics the verdict speaks about; K and m come from the records."""
    K = max((int(r.get("K") or 0) for r in records), default=0)
    m = next((lookup(r, "spec.m") for r in reversed(sort_records(records)) if isinstance(r.get("spec"), dict)), None) or "m"
    b6, d6, b4, d4 = fmt_num(6), fmt_signed(6), fmt_num(4), fmt_signed(4)
    f2, s2 = fmt_num(2), fmt_signed(2)
    # quality: how good the model is (the card's question is asked of these)
    out = [Metric("train_val_bpb", "training-log val BPB", "BPB", "lower", b6, d6),
           Metric("bpb.full", f"full K={K} BPB", "BPB", "lower", b6, d6)]
    out += [Metric(f"bpb.single.{k}", f"single s{k} BPB", "BPB", "lower", b6, d6) for k in range(K)]
    # prefix K'=1 is stage 0 alone (single s0), K'=K the full aggregate: the ones in between
    out += [Metric(f"bpb.prefix.{j}", f"prefix K'={j + 1} BPB", "BPB", "lower", b6, d6) for j in range(1, K - 2)]
    out += [Metric("acc.full", "full accuracy", "accuracy", "higher", b4, d4),
            Metric("acc.single.0", "s0 accuracy", "accuracy", "higher", b4, d4),
            Metric("probe.passed", "probe prompts passed", "probe", "higher", fmt_num(0), fmt_signed(0)),
            Metric("probe.words_matched", "probe answer words matched", "probe", "higher", fmt_num(0), fmt_signed(0))]
    # stage structure: how the stages relate (neither good nor bad in itself)
    st = "structure"
    out += [Metric("routing.agreement_s0_full", "base s0=full agreement", "routing", None, b4, d4, kind=st)]
    out += [Metric(f"wand.bounds.{s}", f"WAND p99 bound {s} → {s + 1}", "WAND", None, b4, d4, kind=st) for s in range(K - 1)]
    out += [Metric("crossover_gap", "crossover gap", "alpha sweep", None, d6, d6, kind=st)]
    # inference efficiency: how much cheaper decoding gets from the stages' agreement
    ef = "efficiency"
    out += [Metric("spec.acceptance", "spec acceptance α", "spec decoding", "higher", b4, d4, kind=ef),
            Metric("spec.mean_accepted", f"spec mean accepted / {m}", "spec decoding", "higher", f2, s2, kind=ef),
            Metric("spec.speedup", "spec end-to-end speedup", "spec decoding", "higher", f2, s2, timing=True, kind=ef),
            Metric("spec.implied_speedup", "spec implied speedup", "spec decoding", "higher", f2, s2, timing=True, kind=ef),
            Metric("routing.fraction", "routing fraction to stage 0", "routing", "higher", fmt_pct, _dpct, kind=ef),
            Metric("routing.projected_speedup", "routing projected speedup", "routing", "higher", fmt_num(3), fmt_signed(3), kind=ef),
            Metric("routing.generation.speedup", "route measured speedup", "routing", "higher", f2, s2, timing=True, kind=ef),
            Metric("wand.generation.speedup", "WAND measured speedup", "WAND", "higher", f2, s2, timing=True, kind=ef),
            Metric("wand.generation.agreement", "WAND greedy agreement with full", "WAND", "higher", b4, d4, kind=ef),
            Metric("wand.generation.mean_depth", "WAND mean exit depth", "WAND", "lower", f2, s2, kind=ef)]
    return out


# ----------------------------------------------------------------------------- statistics
def delta_ci(rec: dict, seed: dict, key: str):
    """95% interval of ``value(rec) - value(seed)`` from the record's ``against`` block, if it is
    against the seed (its target names the seed's target or branch); else None."""
    ag = rec.get("against")
    if not isinstance(ag, dict) or not isinstance(ag.get("deltas"), dict):
        return None
    tgt = str(ag.get("target") or "")
    names = {str(seed.get("target") or ""), branch_name(seed)} - {""}
    if tgt and not any(tgt == n or tgt.endswith("@" + n) or tgt.endswith("/" + n) for n in names):
        return None
    deltas = ag["deltas"]  # flat dotted keys ("bpb.single.0") per the record schema; nested also read
    return get({"d": deltas[key]}, "d")[1] if key in deltas else get(deltas, key)[1]


def noise_test(recs: list[dict], seed_i: int, last_i: int, key: str, phase: Phase | None, timing: bool = False) -> dict:
    """Is ``value(last) - value(seed)`` outside the noise band? See the module docstring
    (``timing``: a wall-clock figure, which needs test (a) to be called outside)."""
    seed, last = recs[seed_i], recs[last_i]
    (v0, ci0), (v1, ci1) = get(seed, key), get(last, key)
    out = {"delta": None if v0 is None or v1 is None else v1 - v0, "ci": None, "floor": None, "outside": None,
           "boot": None, "floor_step": None}
    if out["delta"] is None:
        return out
    d = out["delta"]
    dci = delta_ci(last, seed, key) if last_i != seed_i else None
    out["ci"] = dci
    if dci is not None:
        out["boot"] = not (dci[0] <= 0.0 <= dci[1])
    elif ci0 is not None and ci1 is not None and last_i != seed_i:
        out["boot"] = ci1[0] > ci0[1] or ci1[1] < ci0[0]
    first_i = seed_i + 1
    if first_i < last_i:
        fr = rel_step(recs[first_i], phase)
        fv = value(recs[first_i], key)
        if fv is not None and phase is not None and fr is not None and fr < phase.warmup:
            out["floor"], out["floor_step"] = abs(fv - v0), int(recs[first_i]["step"])
    tests = [t for t in (out["boot"], None if out["floor"] is None else abs(d) > out["floor"]) if t is not None]
    out["outside"] = all(tests) if tests and (out["boot"] is not None or not timing) else None
    return out


def _spearman_exact_p(steps, values, rho: float) -> float:
    """Two-sided exact permutation p-value of Spearman's rho (all n! orderings; n <= 8).

    scipy's t approximation returns p = 0 for a perfectly monotone short series (|rho| = 1),
    which overstates the evidence of a handful of saves; the exact value is 2/n! there."""
    import itertools

    import numpy as np

    ry = stats.rankdata(values)
    rx = stats.rankdata(steps)
    denom = math.sqrt(((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
    if denom == 0:
        return 1.0
    rxc = rx - rx.mean()
    perms = np.array(list(itertools.permutations(ry - ry.mean())))
    rhos = perms @ rxc / denom
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def trend(steps, values, level: float = 0.05) -> dict:
    """Mann–Kendall (Kendall's tau vs step) and Spearman over one series; ``kind`` in
    rising | falling | drifting up | drifting down | oscillating | constant | too few."""
    n = len(values)
    out = {"n": n, "tau": None, "p": None, "rho": None, "p_rho": None,
           "lo": min(values) if values else None, "hi": max(values) if values else None}
    if n < 3:
        return {**out, "kind": "too few"}
    if max(values) == min(values):
        return {**out, "kind": "constant"}
    kt = stats.kendalltau(steps, values)
    sp = stats.spearmanr(steps, values)
    p_rho = _spearman_exact_p(steps, values, float(sp.statistic)) if n <= 8 else float(sp.pvalue)
    out.update(tau=float(kt.statistic), p=float(kt.pvalue), rho=float(sp.statistic), p_rho=p_rho)
    # With n saves the smallest two-sided Mann–Kendall p is 2/n! (a perfectly monotone series):
    # n <= 4 can never reach p < 0.05, so such a series is "underpowered", not "oscillating".
    out["min_p"] = 2.0 / math.factorial(n)
    out["underpowered"] = out["min_p"] >= level
    if out["p"] < level:
        kind = "rising" if out["tau"] > 0 else "falling"
    else:
        diffs = [b - a for a, b in zip(values, values[1:]) if b != a]
        monotone = all(x > 0 for x in diffs) or all(x < 0 for x in diffs)
        kind = ("drifting up" if diffs[0] > 0 else "drifting down") if monotone else "oscillating"
    return {**out, "kind": kind}


def lr_shock(recs, seed_i, last_i, key, phase, floor):
    """``(step, change)`` when the largest save-to-save change from the seed on lies at the first
    save after warmup and exceeds the noise floor; else None."""
    if phase is None:
        return None
    pts = [(int(r["step"]), value(r, key), rel_step(r, phase)) for r in recs[seed_i:last_i + 1]]
    pts = [p for p in pts if p[1] is not None]
    if len(pts) < 2:
        return None
    jumps = [(abs(b[1] - a[1]), b[1] - a[1], b[0], a[2], b[2]) for a, b in zip(pts, pts[1:])]
    size, change, step, rel_a, rel_b = max(jumps)
    crosses = rel_a is not None and rel_b is not None and rel_a < phase.warmup <= rel_b
    if crosses and (floor is None or size > floor) and size > 0:
        return step, change
    return None
