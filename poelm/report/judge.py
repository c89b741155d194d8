"""The verdict in words: every figure's change vs the seed, grouped by kind, and the legend.

The statistics (noise band, trend test, LR shock) and the metric catalogue are ``verdict.py``'s;
this module turns them into the report's words (issue 22): per kind of figure (quality, stage
structure, inference efficiency) one summary line and one row / sentence per figure, a trend line,
and a legend that says once what the words mean. "Coherent divergence from the seed" is judged on
the quality figures only: structure and efficiency figures say how the stages agree and what that
buys at decoding time, not how good the model is.
"""

from __future__ import annotations

import math

from scipy import stats

from poelm.report.cells import NM
from poelm.report.verdict import (COHERENT_SHARE, KINDS, Metric, branch_name, lr_shock, metrics_for, noise_test, phase_of,
                                  rel_step, seed_position, segment, sort_records, trend, value)


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
        return f"{m.label}: not measured at {where}; no comparison.", None, [m.label] + [NM if v is None else m.fmt(v) for v in (v0, v1)] + ["—"] * 3
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
           call, _trend_cell(t, m)]
    return s + ". " + _trend_text(t, m, where, [p[0] for p in pts]), {"metric": m, "noise": nt, "trend": t}, row



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
    out["row_header"] = ["figure", "seed", "newest", "Δ [95% CI]", "call", f"trend within the {seg_name} ({len(window)} saves)"]
    out["trend"] = _trend_line(out["results"], last, phase, level, window)
    out["legend"] = legend(recs, window, level)
    return out


def legend(recs, window, level: float = 0.05) -> list[str]:
    """The verdict's words, explained once."""
    n = len(window)
    out = ["Δ = newest − seed; call: better / worse (higher / lower without a preferred direction) when Δ is outside the "
           "noise band, else no change. Noise band: the paired 95% interval of Δ (else the two value intervals) excludes 0, and "
           "|Δ| exceeds the warmup floor (seed → first save still in the warmup: measurement noise); a timed figure needs its "
           "interval.",
           f"Quality decides the answer; coherent divergence = at least 2 quality figures beyond the noise band, "
           f"{COHERENT_SHARE:.0%} of them the same way. Stage structure and inference efficiency are reported for what they are.",
           "Trend: Mann–Kendall τ and p over the saves of the newest save's phase segment, with its range; LR shock: the largest "
           "save-to-save change, at the first save after warmup."]
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
