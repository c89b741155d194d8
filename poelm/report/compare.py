"""The side-by-side report of ``poelm compare``: a table, a plot and a computed line on the gap.

Input: a ``poelm.measure.compare.Comparison`` (aligned saves of two or more runs measured on one
slice). The gap is taken the paper's way (PoE 0.720935 vs BP 0.676788 = +6.52 %): the FIRST run
minus each other run, absolute in BPB and relative to the other run, ``(A - B) / B``. Every
figure carries a paired 95 % interval from one block bootstrap over the slice's positions, the
same drawn blocks for every run and save (``Comparison.intervals``), so the change of a gap
between two saves has its own interval too.

The course of a gap (``course``): from the first to the last aligned save, "widening" when its
magnitude grows beyond the interval of the change, "narrowing" when it shrinks beyond it, else
"flat within its interval"; and where in the schedule it moved: the aligned saves are grouped by
the first run's schedule segment (``warmup`` / ``peak`` / ``warmdown`` of its phase, from
``poelm.schedule``), and each group's change (the gap at its last save minus the gap at the save
before it, with its interval) is given with its share of the whole change (the paper: 31 % of
the widening in the final warmdown).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from poelm.fsio import atomic_write_bytes, atomic_write_text
from poelm.report.cells import NM
from poelm.report.verdict import segment
from poelm.schedule import Phase
from poelm.schedule import lrm as schedule_lrm

PLOT = "compare.png"


# ----------------------------------------------------------------------------- statistics
def _bpb(r, p, what="out"):
    return lambda c, sums: c.bpb(sums, r, p, what)


def _gap(j, p, what="out"):
    return lambda c, sums: c.bpb(sums, 0, p, what) - c.bpb(sums, j, p, what)


def _rel(j, p):
    return lambda c, sums: (c.bpb(sums, 0, p) - c.bpb(sums, j, p)) / c.bpb(sums, j, p)


def _change(j, p0, p1, rel=False):
    f = _rel if rel else _gap
    return lambda c, sums: f(j, p1)(c, sums) - f(j, p0)(c, sums)


def shared_stages(comp) -> int:
    """K when every run has the same K > 1 stages (per-stage figures are comparable), else 0."""
    ks = {r.K for r in comp.runs}
    return ks.pop() if len(ks) == 1 and min(r.K for r in comp.runs) > 1 else 0


def _label(save) -> str | None:
    """``<phase name> <segment>`` of a save in its own phase (None without a phase)."""
    ph = save.phase
    if not isinstance(ph, dict) or ph.get("kind"):
        return None
    phase = Phase(**{k: ph[k] for k in ("name", "start_step", "steps", "warmup", "peak", "warmdown_ratio", "final") if k in ph})
    return f"{phase.name} {segment(save.step - phase.start_step, phase)}"


def groups(comp) -> list[tuple[str, int, int]]:
    """Consecutive aligned saves grouped by the first run's schedule segment: ``(label, p0, p1)``
    = the change from point p0 to point p1 happened in that segment (labelled by where it ends)."""
    out = []
    for p in range(1, len(comp.keys)):
        lab = _label(comp.saves[0][p]) or "schedule unknown"
        if out and out[-1][0] == lab:
            out[-1] = (lab, out[-1][1], p)
        else:
            out.append((lab, p - 1, p))
    return out


def build(comp, samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Every figure of the comparison with its paired interval, as a JSON-able dict."""
    R, P, K = len(comp.runs), len(comp.keys), shared_stages(comp)
    stats = [(f"bpb/{r}/{p}", _bpb(r, p)) for r in range(R) for p in range(P)]
    stats += [(f"stage/{r}/{p}/{k}", _bpb(r, p, k)) for r in range(R) for p in range(P) for k in range(K)]
    for j in range(1, R):
        stats += [(f"gap/{j}/{p}", _gap(j, p)) for p in range(P)] + [(f"rel/{j}/{p}", _rel(j, p)) for p in range(P)]
        stats += [(f"stagegap/{j}/{p}/{k}", _gap(j, p, k)) for p in range(P) for k in range(K)]
        if P > 1:
            stats += [(f"change/{j}", _change(j, 0, P - 1)), (f"relchange/{j}", _change(j, 0, P - 1, rel=True))]
            stats += [(f"seg/{j}/{g}", _change(j, p0, p1)) for g, (_, p0, p1) in enumerate(groups(comp))]
    iv = comp.intervals(stats, samples=samples, seed=seed, level=level)
    node = lambda name: {"value": _f(iv[name][0]), "ci": [_f(iv[name][1]), _f(iv[name][2])]}  # noqa: E731
    runs = [{"label": r.label, "source": r.source, "K": r.K, "stage_layers": list(r.model.get("stage_layers") or []),
             "objective": r.objective, "output": r.output, "params": r.params} for r in comp.runs]
    points = []
    for p, key in enumerate(comp.keys):
        pt = {comp.by: key, "runs": []}
        for r in range(R):
            s = comp.saves[r][p]
            pt["runs"].append({"target": s.target, "step": s.step, "tokens": s.tokens, "lrm": s.lrm, "bpb": node(f"bpb/{r}/{p}"),
                               "stages": [node(f"stage/{r}/{p}/{k}") for k in range(K)], "record_bpb": s.record_bpb,
                               "record_split_tokens": s.record_split})
        pt["gaps"] = [{"against": j, "abs": node(f"gap/{j}/{p}"), "rel": node(f"rel/{j}/{p}"),
                       "stages": [node(f"stagegap/{j}/{p}/{k}") for k in range(K)]} for j in range(1, R)]
        points.append(pt)
    courses = []
    for j in range(1, R):
        if P < 2:
            courses.append(None)
            continue
        segs = [{"segment": lab, "from": comp.keys[p0], "to": comp.keys[p1], "change": node(f"seg/{j}/{g}")}
                for g, (lab, p0, p1) in enumerate(groups(comp))]
        courses.append({"against": j, "change": node(f"change/{j}"), "rel_change": node(f"relchange/{j}"), "segments": segs})
    schedules = [[{"step": s.step, comp.by: r.key(s, comp.by), "lrm": s.lrm, "phase": s.phase} for s in r.saves] for r in comp.runs]
    return {"by": comp.by, "keys": list(comp.keys), "slice": comp.slice, "runs": runs, "points": points, "courses": courses,
            "schedules": schedules, "stages_compared": K,
            "bootstrap": {"samples": int(samples), "seed": int(seed), "level": level, "block_tokens": comp.slice["block_tokens"],
                          "blocks": comp.slice["n_blocks"], "paired": True,
                          "resampled": "blocks of consecutive target positions of the measurement slice, the same draw for every run and save"}}


def _f(x):
    return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------- the course line
def _beyond(ci) -> bool:
    return ci[0] is not None and (ci[0] > 0 or ci[1] < 0)


def course(result: dict, j: int = 1) -> str:
    """The computed sentence on the gap of run 0 against run ``j`` (module docstring)."""
    runs, pts, by = result["runs"], result["points"], result["by"]
    a, b = runs[0]["label"], runs[j]["label"]
    c = result["courses"][j - 1]
    first, last = pts[0]["gaps"][j - 1], pts[-1]["gaps"][j - 1]
    unit = lambda p: f"{by} {p[by]:,}"  # noqa: E731
    head = (f"Gap {a} − {b}: {_signed(first['abs'])} BPB ({_pct(first['rel'])}) at {unit(pts[0])}")
    if c is None:
        return head + "; one aligned save: no course yet."
    head += f" → {_signed(last['abs'])} BPB ({_pct(last['rel'])}) at {unit(pts[-1])}"
    d, dci = c["change"]["value"], c["change"]["ci"]
    sign = 1.0 if (last["abs"]["value"] or 0) >= 0 else -1.0
    if _beyond(dci):
        word = "widening" if d * sign > 0 else "narrowing"
    else:
        word = "flat within its interval"
    s = (f"{head}: {word} (change {_signed(c['change'])} BPB, relative {_pct(c['rel_change'], pp=True)}; paired 95 % intervals)")
    moves = [g for g in c["segments"] if g["change"]["value"] is not None]
    total = sum(g["change"]["value"] for g in moves)
    if len(moves) > 1 and total:
        parts = [f"{g['segment']} ({by} {g['from']:,}→{g['to']:,}): {_signed(g['change'])}"
                 + (f", {100 * g['change']['value'] / total:.0f} % of the change" if word != "flat within its interval" else "")
                 + ("" if _beyond(g["change"]["ci"]) else ", within its interval") for g in moves]
        s += "; by schedule segment: " + "; ".join(parts)
    elif moves:
        s += f"; all of it in {moves[0]['segment']}"
    return s + "."


def _signed(node) -> str:
    v, ci = node["value"], node["ci"]
    if v is None:
        return NM
    return f"{v:+.6f}" + (f" [{ci[0]:+.6f}, {ci[1]:+.6f}]" if ci[0] is not None else "")


def _pct(node, pp: bool = False) -> str:
    v, ci = node["value"], node["ci"]
    if v is None:
        return "n/a"
    u = " pp" if pp else " %"
    return f"{100 * v:+.2f}{u}" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci[0] is not None else "")


# ----------------------------------------------------------------------------- table and plot
def _cell(node, d=6) -> str:
    v, ci = node["value"], node["ci"]
    if v is None:
        return NM
    return f"{v:.{d}f}" + (f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci[0] is not None else "")


def markdown(result: dict, plot: str | None = PLOT) -> str:
    runs, by, sl = result["runs"], result["by"], result["slice"]
    L = ["# Runs side by side", ""]
    for i, r in enumerate(runs):
        p = r["params"]
        heads = p.get("lm_head", 0) + p.get("stage_heads", 0)
        L.append(f"- **{r['label']}** (`{r['source']}`): objective {r['objective']}, K={r['K']} {tuple(r['stage_layers'])}, "
                 f"{p.get('total', 0):,} parameters ({p.get('total', 0) - heads:,} trunk + embeddings, {heads:,} in heads); "
                 f"model BPB = {_output_words(r)}")
    L += ["", f"Every aligned save ({by}) measured on the same slice: the first {sl['split_tokens']:,} validation tokens "
          f"(`poelm measure`'s measurement slice), rows of {sl['seq_len']}, batches of {sl['batch_size']}. Gap = "
          f"{runs[0]['label']} − other, relative to the other (the paper's PoE − BP over BP). Intervals: 95 %, paired block "
          f"bootstrap ({result['bootstrap']['samples']} resamples of {sl['n_blocks']} blocks of {sl['block_tokens']} consecutive "
          f"target positions; the same draw for every run and save, so shared difficulty cancels from gaps and their changes).", ""]
    other = "tokens" if by == "step" else "step"
    differ = [pt for pt in result["points"] if len({x[other] for x in pt["runs"]}) > 1]
    if differ:
        L += [f"Note: at {by} {differ[0][by]:,} the runs' {other} differ ({', '.join(str(x[other]) for x in differ[0]['runs'])}): "
              f"aligned by {by}, they have not seen the same {'data' if other == 'tokens' else 'number of updates'}; "
              f"`--by {other}` aligns the other way.", ""]
    head = [by.capitalize()] + [f"{r['label']} BPB" for r in runs] + [f"lrm {r['label']}" for r in runs]
    for j in range(1, len(runs)):
        head += [f"gap vs {runs[j]['label']} (BPB)", f"gap vs {runs[j]['label']} (relative)"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pt in result["points"]:
        row = [f"{pt[by]:,}"] + [_cell(x["bpb"]) for x in pt["runs"]] + ["-" if x["lrm"] is None else f"{x['lrm']:.4f}" for x in pt["runs"]]
        for g in pt["gaps"]:
            row += [_signed(g["abs"]), _pct(g["rel"])]
        L.append("| " + " | ".join(row) + " |")
    K = result["stages_compared"]
    if K:
        L += ["", f"Per stage (every run has K={K}): gap {runs[0]['label']} − other at each stage, BPB.", "",
              "| " + " | ".join([by.capitalize()] + [f"s{k} vs {runs[j]['label']}" for j in range(1, len(runs)) for k in range(K)]) + " |",
              "|" + "---|" * (1 + K * (len(runs) - 1))]
        for pt in result["points"]:
            L.append("| " + " | ".join([f"{pt[by]:,}"] + [_signed(g["stages"][k]) for g in pt["gaps"] for k in range(K)]) + " |")
    else:
        L += ["", "Per-stage figures: not compared (the runs do not all have the same K > 1 stages)."]
    L += ["", "## Course of the gap", ""] + [f"- {course(result, j)}" for j in range(1, len(runs))]
    unmeasured = [x["target"] for pt in result["points"] for x in pt["runs"] if x["record_bpb"] is None]
    if unmeasured:
        L += ["", "Saves without a measurement record of their own (the figures above are measured here; for the card's other "
              "figures run `poelm measure` on them): " + ", ".join(f"`poelm measure {t}`" for t in unmeasured) + "."]
    if plot:
        L += ["", f"![BPB, gap and LR schedules]({plot})"]
    return "\n".join(L) + "\n"


def _output_words(run: dict) -> str:
    if run["K"] == 1:
        return "its one stage (K=1: a plain decoder with one head)"
    return "full-K PoE" if run["output"] == "full" else "its last stage (a bp run: earlier stages are not trained to predict)"


def figure(result: dict):
    """Three panels sharing the x axis: each run's BPB (95 % intervals), the gap(s) with their
    paired intervals, the runs' LR schedules (the saves' lrm and their phases' curves)."""
    from matplotlib.figure import Figure

    by, pts, runs = result["by"], result["points"], result["runs"]
    xs = [p[by] for p in pts]
    fig = Figure(figsize=(10, 9), dpi=110)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    for r, run in enumerate(runs):
        ys = [p["runs"][r]["bpb"] for p in pts]
        ax1.errorbar(xs, [y["value"] for y in ys], yerr=_yerr(ys), marker="o", capsize=3, label=f"{run['label']} ({run['objective']}, K={run['K']})")
    ax1.set_ylabel("BPB (lower is better)")
    ax1.legend(fontsize=8)
    ax1.set_title("Runs side by side on one slice (95 % paired intervals)")
    for j in range(1, len(runs)):
        gs = [p["gaps"][j - 1]["abs"] for p in pts]
        ax2.errorbar(xs, [g["value"] for g in gs], yerr=_yerr(gs), marker="o", capsize=3, label=f"{runs[0]['label']} − {runs[j]['label']}")
    ax2.axhline(0, color="grey", linewidth=1)
    ax2.set_ylabel("gap (BPB)")
    ax2.legend(fontsize=8)
    for r, (run, sched) in enumerate(zip(runs, result["schedules"])):
        curve = _schedule_curve(sched, by)
        if curve[0]:
            ax3.plot(*curve, linewidth=1, alpha=0.6, color=f"C{r}")
        pts_l = [(s[by], s["lrm"]) for s in sched if s["lrm"] is not None and s[by] is not None]
        ax3.plot([p[0] for p in pts_l], [p[1] for p in pts_l], linestyle="none", marker="s", markersize=4, color=f"C{r}",
                 label=f"{run['label']} lrm")
    ax3.set_ylabel("LR multiplier")
    ax3.set_xlabel(by)
    ax3.set_ylim(bottom=0)
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _yerr(nodes):
    lo = [0 if n["ci"][0] is None else n["value"] - n["ci"][0] for n in nodes]
    hi = [0 if n["ci"][1] is None else n["ci"][1] - n["value"] for n in nodes]
    return [lo, hi]


def _schedule_curve(sched, by):
    """The lrm curve of each phase over the saves it spans (steps; tokens by linear interpolation)."""
    xs, ys = [], []
    saves = [s for s in sched if isinstance(s.get("phase"), dict) and not s["phase"].get("kind")]
    for a, b in zip(saves, saves[1:]):
        ph = b["phase"]
        phase = Phase(**{k: ph[k] for k in ("name", "start_step", "steps", "warmup", "peak", "warmdown_ratio", "final") if k in ph})
        lo = max(a["step"], phase.start_step)
        for i in range(21):
            st = lo + (b["step"] - lo) * i / 20
            x = st if by == "step" else (a[by] + (b[by] - a[by]) * (st - a["step"]) / max(1, b["step"] - a["step"]))
            xs.append(x)
            ys.append(schedule_lrm(int(round(st)), phase))
    return xs, ys


def write(result: dict, out_dir) -> dict:
    """``compare.md``, ``compare.json`` and ``compare.png`` in ``out_dir`` (each written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_dir)
    fig = figure(result)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out / PLOT, buf.getvalue())
    atomic_write_text(out / "compare.md", markdown(result))
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    return {"report": out / "compare.md", "json": out / "compare.json", "plot": out / PLOT}
