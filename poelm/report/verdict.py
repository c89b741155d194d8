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

from poelm.schedule import Phase

COHERENT_SHARE = 0.75


# ----------------------------------------------------------------------------- record access
def get(rec: dict, key: str):
    """``(value, ci)`` at dotted ``key`` ("bpb.single.0", "spec.acceptance"); ``(None, None)`` if absent.

    List indices are integers in the path; a ``{"value", "ci"}`` leaf yields both, a bare number
    yields ``(number, None)``. Non-numeric leaves count as not measured."""
    node, parent, name = rec, None, None
    for part in key.split("."):
        parent, name = node, part
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None, None
        if node is None:
            return None, None
    ci = None
    if isinstance(node, dict):
        ci = node.get("ci")
        node = node.get("value")
    elif isinstance(parent, dict):  # a bare number may carry its interval beside it ("crossover_gap_ci", "acceptance_ci")
        ci = parent.get(f"{name}_ci")
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None, None
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci)):
        ci = None
    return float(node), (tuple(float(c) for c in ci) if ci else None)


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
    m = next((r["spec"].get("m") for r in reversed(sort_records(records)) if isinstance(r.get("spec"), dict)), None) or "m"
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


# ----------------------------------------------------------------------------- sentences
def _p(x):
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


UNDERPOWERED = "†"  # the legend says once what it means (no trend test can reach the level with so few saves)


def _trend_text(t: dict, m: Metric, where: str, steps) -> str:
    head = f"{where} ({t['n']} saves, steps {steps[0]:,}–{steps[-1]:,})" if t["n"] else where
    if t["kind"] == "too few":
        return f"{head}: too few saves for a trend test."
    if t["kind"] == "constant":
        return f"{head}: constant at {m.fmt(t['lo'])}."
    test = f"Mann–Kendall τ = {t['tau']:+.2f}, p = {_p(t['p'])}; Spearman ρ = {t['rho']:+.2f}, p = {_p(t['p_rho'])}"
    env = f"{m.fmt(t['lo'])}–{m.fmt(t['hi'])}, range {m.dfmt(t['hi'] - t['lo']).lstrip('+')}"
    if t["kind"] in ("rising", "falling"):
        return f"{head}: {t['kind']} ({test}) over {env}."
    if t.get("underpowered"):
        shape = t["kind"] if t["kind"] != "oscillating" else "not monotone"
        return f"{head}: {shape} ({test}), within {env}{UNDERPOWERED}."
    if t["kind"] == "oscillating":
        return f"{head}: no monotonic trend ({test}), oscillating within an envelope of {env}."
    return f"{head}: {t['kind']} but not significantly ({test}), within {env}."


def _direction(m: Metric, d: float) -> str:
    if d == 0:
        return "unchanged"
    if m.better is None:
        return "higher (no preferred direction)" if d > 0 else "lower (no preferred direction)"
    good = (d < 0) if m.better == "lower" else (d > 0)
    return "better than the seed" if good else "worse than the seed"


def _metric_sentence(m, recs, seed_i, last_i, phase, level, window):
    seed, last = recs[seed_i], recs[last_i]
    v0, v1 = value(seed, m.key), value(last, m.key)
    if v1 is None or v0 is None:
        where = "the newest save" if v1 is None else "the seed"
        return f"{m.label}: not measured at {where}; no comparison.", None, [m.label] + [NMV if v is None else m.fmt(v) for v in (v0, v1)] + ["—"] * 4
    nt = noise_test(recs, seed_i, last_i, m.key, phase, m.timing)
    d = nt["delta"]
    ci = f"95% CI [{m.dfmt(nt['ci'][0])}, {m.dfmt(nt['ci'][1])}]" if nt["ci"] else "95% interval not available"
    parts = []
    if nt["boot"] is not None:
        if m.timing:
            parts.append("intervals " + ("do not overlap" if nt["boot"] else "overlap"))
        else:
            parts.append("interval " + ("excludes" if nt["boot"] else "includes") + " no change")
    if nt["floor"] is not None:
        parts.append(f"warmup floor {m.dfmt(nt['floor']).lstrip('+')}")
    if nt["outside"] is None:
        band = "noise band not available" + (" (a timing figure needs both records' intervals)" if m.timing else "")
    else:
        band = ("outside" if nt["outside"] else "inside") + " the noise band (" + "; ".join(parts) + ")"
    s = f"{m.label}: {m.fmt(v1)} vs {m.fmt(v0)} at the seed: Δ {m.dfmt(d)} ({ci}), {band}"
    if nt["outside"]:
        s += f", {_direction(m, d)}"
    elif nt["outside"] is False:
        s += ", indistinguishable from the seed"
    shock = lr_shock(recs, seed_i, last_i, m.key, phase, nt["floor"])
    if shock and nt["outside"]:
        s += f"; LR shock: {m.dfmt(shock[1])} at step {shock[0]:,}, the first save after warmup"
    pts = [(int(r["step"]), value(r, m.key)) for r in window]
    pts = [p for p in pts if p[1] is not None]
    t = trend([p[0] for p in pts], [p[1] for p in pts], level)
    where = f"Within the {segment(rel_step(last, phase), phase)} phase" if phase else "Since the seed"
    call = {True: _direction(m, d).replace(" than the seed", "").replace(" (no preferred direction)", ""), False: "no change",
            None: "n/a"}[nt["outside"]]
    if nt["outside"] and shock:
        call += f" (LR shock at {shock[0]:,})"
    row = [m.label, m.fmt(v0), m.fmt(v1), f"{m.dfmt(d)}" + (f" [{m.dfmt(nt['ci'][0])}, {m.dfmt(nt['ci'][1])}]" if nt["ci"] else ""),
           "; ".join(parts) or "n/a", call, _trend_cell(t, m)]
    return s + ". " + _trend_text(t, m, where, [p[0] for p in pts]), {"metric": m, "noise": nt, "trend": t}, row


NMV = "not measured"


def _trend_cell(t: dict, m: Metric) -> str:
    if t["kind"] in ("too few", "constant"):
        return t["kind"]
    kind = "not monotone" if t["kind"] == "oscillating" and t.get("underpowered") else t["kind"]
    return (f"{kind}, τ {t['tau']:+.2f} p {_p(t['p'])}{UNDERPOWERED if t.get('underpowered') else ''}; "
            f"{m.fmt(t['lo'])}–{m.fmt(t['hi'])}")


def _fam(rs) -> str:
    counts = {}
    for r in rs:
        counts[r["metric"].family] = counts.get(r["metric"].family, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in counts.items()) or "none"


def kind_summary(kind: str, results) -> dict:
    """Counts of one kind's figures vs the seed: ``measured, outside, better, worse, neutral``
    (lists of results) and ``direction``: "better" | "worse" when at least 2 directional figures
    moved beyond the noise band and ``COHERENT_SHARE`` of them agree, else None."""
    measured = [r for r in results if r is not None and r["metric"].kind == kind]
    out = [r for r in measured if r["noise"]["outside"]]
    worse = [r for r in out if r["metric"].better and "worse" in _direction(r["metric"], r["noise"]["delta"])]
    better = [r for r in out if r["metric"].better and "better" in _direction(r["metric"], r["noise"]["delta"])]
    neutral = [r for r in out if r["metric"].better is None]
    n = len(worse) + len(better)
    direction = None
    if n >= 2 and max(len(worse), len(better)) >= COHERENT_SHARE * n:
        direction = "worse" if len(worse) > len(better) else "better"
    return {"measured": measured, "outside": out, "better": better, "worse": worse, "neutral": neutral, "direction": direction}


def _kind_line(kind: str, res: dict, last) -> str:
    head = (f"{KINDS[kind]} (step {int(last['step']):,} vs the seed): {len(res['outside'])} of {len(res['measured'])} figures "
            f"outside the noise band")
    if not res["measured"]:
        return f"{KINDS[kind]}: not measured."
    parts = []
    if res["better"] or res["worse"]:
        parts.append(f"{len(res['better'])} the better way ({_fam(res['better'])}), {len(res['worse'])} the worse way ({_fam(res['worse'])})")
    if res["neutral"]:
        parts.append(f"{len(res['neutral'])} without a preferred direction ({_fam(res['neutral'])})")
    head += (": " + "; ".join(parts)) if parts else ""
    if kind == "quality":
        if res["direction"] == "better":
            head += ". Coherent divergence from the seed in the better direction: a continual-learning gain."
        elif res["direction"] == "worse":
            head += ". Coherent divergence from the seed in the worse direction: no continual-learning gain."
        else:
            head += ". No coherent divergence from the seed: the moved quality figures do not agree in direction or are too few."
    elif kind == "structure":
        head += ". These say how the stages relate, not how good the model is."
    else:
        head += ". These say how much cheaper decoding gets from the stages' agreement, not how good the model is."
    return head


def _trend_line(results, last, phase, level, window) -> str | None:
    measured = [r for r in results if r is not None]
    testable = [r for r in measured if r["trend"]["kind"] not in ("too few", "constant")]
    tested = [r for r in testable if not r["trend"].get("underpowered")]
    trending = [r for r in tested if r["trend"]["kind"] in ("rising", "falling")]
    where = f"the {segment(rel_step(last, phase), phase)} phase" if phase else "the trajectory"
    if not tested and testable:
        drifting = [r for r in testable if r["trend"]["kind"].startswith("drifting")]
        return (f"Trends within {where} ({len(window)} saves): no trend test can reach p < {level:g} yet{UNDERPOWERED}; "
                f"{len(drifting)} of {len(testable)} figures moved monotonically.")
    if not tested:
        return f"Trends: within {where} there are too few saves ({len(window)}) for a trend test."
    chance = stats.binomtest(len(trending), len(tested), level, alternative="greater").pvalue
    names = "; ".join(f"{r['metric'].label} {r['trend']['kind']}, p = {_p(r['trend']['p'])}" for r in trending)
    s = (f"Trends within {where} ({len(window)} saves): {len(trending)} of {len(tested)} figures "
         f"{'shows' if len(trending) == 1 else 'show'} a monotonic trend at p < {level:g}" + (f" ({names})" if names else "") +
         f", against {level * len(tested):.2f} expected by chance (binomial p = {_p(chance)}): ")
    return s + (f"{where} is a phase of monotonic change." if chance < level else f"{where} is an oscillation regime, not monotonic improvement.")


def judge(records, seed_index: int | None = None, level: float = 0.05) -> dict:
    """The verdict as data: ``head`` (context line), ``groups`` (per kind: ``kind, title, summary``
    line, ``lines`` one per figure, ``result`` of ``kind_summary``), ``trend`` line, ``legend``
    (what the lines' words mean, said once), and ``seed_i, last_i, phase, results``."""
    recs = sort_records(records)
    if not recs:
        return {"head": "No measurement records: nothing to judge.", "groups": [], "trend": None, "legend": [], "results": []}
    seed_i = seed_position(recs) if seed_index is None else seed_index
    last_i = len(recs) - 1
    phase = phase_of(recs)
    seed, last = recs[seed_i], recs[last_i]
    seg = segment(rel_step(last, phase), phase)
    window = [r for r in recs[seed_i + 1:] if phase is None or segment(rel_step(r, phase), phase) == seg]
    head = f"Seed {branch_name(seed)} (step {int(seed['step']):,}); newest {branch_name(last)} (step {int(last['step']):,})"
    if phase is not None:
        head += (f"; phase {phase.name}: warmup ends at step {phase.start_step + phase.warmup:,}, warmdown starts "
                 f"at step {phase.start_step + phase.warmdown_start:,}; the newest save is in the {seg} phase")
    out = {"head": head + ".", "groups": [], "trend": None, "legend": [], "results": [], "seed_i": seed_i, "last_i": last_i,
           "phase": phase}
    if last_i == seed_i:
        out["head"] += " Only the seed is measured: no deltas and no trends yet."
        return out
    by_kind = {k: ([], []) for k in KINDS}
    for m in metrics_for(recs):
        line, res, row = _metric_sentence(m, recs, seed_i, last_i, phase, level, window)
        by_kind[m.kind][0].append(line)
        by_kind[m.kind][1].append(row)
        out["results"].append(res)
    for kind, (lines, rows) in by_kind.items():
        res = kind_summary(kind, out["results"])
        out["groups"].append({"kind": kind, "title": KINDS[kind], "summary": _kind_line(kind, res, last), "lines": lines,
                              "rows": rows, "result": res})
    seg_name = seg or "trajectory"
    out["row_header"] = ["figure", "seed", "newest", "Δ [95% CI]", "noise tests", "call", f"trend within the {seg_name} ({len(window)} saves)"]
    out["trend"] = _trend_line(out["results"], last, phase, level, window)
    out["legend"] = legend(recs, window, level)
    return out


def legend(recs, window, level: float = 0.05) -> list[str]:
    """The verdict's words, explained once."""
    n = len(window)
    out = ["Δ = newest − seed. Noise band: the paired 95% bootstrap interval of Δ (record `against`; without it, the two "
           "value intervals must not overlap) must exclude 0, and |Δ| must exceed the warmup floor (seed → first save while "
           "the LR is still warming up: pure measurement noise). A timed figure (speedups) is called changed only when its "
           "interval decides it.",
           "Quality decides the answer; stage structure (agreement, WAND bounds, crossover gap) and inference efficiency "
           "(acceptance, speedups, routing, exit depth) are reported for what they are. Coherent divergence: at least 2 "
           f"quality figures beyond the noise band, {COHERENT_SHARE:.0%} of them the same way.",
           "Trends: Mann–Kendall (Kendall's τ vs step) with Spearman's ρ over the saves of the newest save's phase segment; "
           "an LR shock is the largest save-to-save change falling at the first save after warmup."]
    if n >= 3:  # below 3 saves no test is run at all ("too few")
        mp = 2.0 / math.factorial(n)
        if mp >= level:
            out.append(f"{UNDERPOWERED} With {n} saves the smallest attainable p is {_p(mp)} (≥ {level:g}), so no trend test "
                       f"can be significant yet.")
    return out


def verdict(records, seed_index: int | None = None, level: float = 0.05) -> list[str]:
    """The verdict as lines: the context line, per kind (quality, stage structure, inference
    efficiency) its summary then one sentence per figure, the trend line and the legend.

    ``seed_index`` indexes the records in step order; None (default) picks the seed by rule
    (the record at the phase's start step, else the first)."""
    j = judge(records, seed_index, level)
    lines = [j["head"]]
    for g in j["groups"]:
        lines += [g["summary"]] + g["lines"]
    if j["trend"]:
        lines.append(j["trend"])
    return lines + j["legend"]
