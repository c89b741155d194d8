"""The report's "Benchmarks vs step" table and plot, from the records' ``benchmarks`` entries.

``poelm eval`` (``poelm/measure/evals.py``) writes one entry per task, metric and stage
selection into each branch's record: ``{"task", "metric", "value", "stderr", "n", "limit",
"stages", "num_fewshot", "chance", "lm_eval", ...}``. A *series* is one (task, metric, stages)
triple followed over the branches; the table has a column per series (``value ± stderr``, the
standard error lm-eval reports) and the plot a line per series with ±1 stderr bars and, dashed in
the same colour, the task's chance level (random guessing) where it is known. A record without
the series shows "not measured". Records that hold no entry at all produce no section and no plot,
so a report of a trajectory never evaluated is unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from poelm.fsio import atomic_write_bytes
from poelm.report.cells import NM
from poelm.report.verdict import branch_name, seed_position, sort_records

KEY = "benchmarks"
PLOT = "benchmarks_vs_step"
CAPTION = "Benchmark scores (lm-evaluation-harness) vs step"


def _entries(rec) -> list[dict]:
    out = rec.get(KEY)
    if not isinstance(out, list):
        return []
    return [e for e in out if isinstance(e, dict) and isinstance(e.get("value"), (int, float)) and not isinstance(e.get("value"), bool)]


def series_keys(records) -> list[tuple[str, str, str]]:
    """Every (task, metric, stages) triple in the records, in first-seen order, full K first."""
    keys = []
    for r in sort_records(records):
        for e in _entries(r):
            k = (str(e.get("task")), str(e.get("metric")), str(e.get("stages") or "full"))
            if k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k[2] != "full", k[2], k[0], k[1]))


def find(rec, key) -> dict | None:
    for e in _entries(rec):
        if (str(e.get("task")), str(e.get("metric")), str(e.get("stages") or "full")) == key:
            return e
    return None


def label(key) -> str:
    task, metric, stages = key
    return f"{task} {metric}" + ("" if stages == "full" else f" ({stages})")


def series(records) -> dict[str, tuple[list[int], list[float], list[float | None]]]:
    """``{label: (steps, values, stderrs)}``: exactly what the plot draws."""
    recs = sort_records(records)
    out = {}
    for key in series_keys(recs):
        pts = [(int(r["step"]), e) for r in recs if (e := find(r, key)) is not None]
        out[label(key)] = ([p[0] for p in pts], [float(p[1]["value"]) for p in pts],
                           [p[1].get("stderr") if isinstance(p[1].get("stderr"), (int, float)) else None for p in pts])
    return out


def score_cell(e) -> str:
    if e is None:
        return NM
    se = e.get("stderr")
    return f"{e['value']:.4f}" + (f" ± {se:.4f}" if isinstance(se, (int, float)) else "")


def _about(recs, keys) -> str:
    """One clause per task: documents scored, shots, chance level, lm-eval version."""
    parts, seen = [], set()
    for task, metric, stages in keys:
        if task in seen:
            continue
        seen.add(task)
        es = [e for r in recs for e in _entries(r) if e.get("task") == task]
        # per field the newest value given (an entry may lack one, e.g. a stage run without chance)
        new = {f: next((e[f] for e in reversed(es) if e.get(f) is not None), None) for f in ("limit", "num_fewshot", "chance", "lm_eval")}
        ns = sorted({e.get("n") for e in es if e.get("n") is not None})
        n = f"{ns[0]:,}" if len(ns) == 1 else ("/".join(f"{x:,}" for x in ns) if ns else "?")
        bits = [f"{n} documents" + (f" (--limit {new['limit']})" if new.get("limit") else "")]
        if new.get("num_fewshot") is not None:
            bits.append(f"{new['num_fewshot']}-shot")
        if isinstance(new.get("chance"), (int, float)):
            bits.append(f"chance {new['chance']:.4f}")
        if new.get("lm_eval"):
            bits.append(f"lm-eval {new['lm_eval']}")
        parts.append(f"`{task}`: " + ", ".join(bits))
    return "; ".join(parts)


def sections(records) -> list[tuple[str, str, str]]:
    """``[(heading, description, markdown table)]``: the benchmarks section, or ``[]`` when no
    record holds a benchmark entry."""
    recs = sort_records(records)
    keys = series_keys(recs)
    if not keys:
        return []
    seed_i = seed_position(recs)
    header = ["Branch", "Step"] + [label(k) for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(recs):
        name = f"`{branch_name(r)}`" + (" (seed)" if i == seed_i else "")
        lines.append("| " + " | ".join([name, f"{int(r['step']):,}"] + [score_cell(find(r, k)) for k in keys]) + " |")
    desc = ("Scores from lm-evaluation-harness (`poelm eval`) on each branch's exported model, value ± its standard "
            "error; acc = the choice with the highest log-likelihood, acc_norm = per byte; a stage selection in "
            f"brackets (stage=k: stage k alone, prefix=K': stages 0..K'-1), else full K. {_about(recs, keys)}.")
    return [("Benchmarks vs step", desc, "\n".join(lines))]


def figure(records) -> Figure | None:
    data = series(records)
    if not any(x for x, _, _ in data.values()):
        return None
    recs = sort_records(records)
    fig = Figure(figsize=(10, 5), dpi=110)
    ax = fig.add_subplot()
    for key in series_keys(recs):
        x, y, se = data[label(key)]
        if not x:
            continue
        err = [s if s is not None else 0.0 for s in se]
        line = ax.errorbar(x, y, yerr=err if any(se) else None, marker="o", markersize=4, capsize=3, label=label(key))
        chance = next((e.get("chance") for r in reversed(recs) if (e := find(r, key)) is not None
                       and isinstance(e.get("chance"), (int, float))), None)
        if chance is not None:
            ax.axhline(chance, color=line[0].get_color(), linestyle=":", linewidth=1, label=f"chance ({label(key)}) {chance:.3f}")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.set_xlabel("step")
    ax.set_ylabel("score (± stderr)")
    ax.grid(True, alpha=0.3)
    ax.set_title("Benchmarks vs step")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def make_plots(records, out_dir) -> list[Path]:
    """Write ``benchmarks_vs_step.png`` into ``out_dir`` when any record has benchmarks."""
    fig = figure(records)
    if fig is None:
        return []
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(out_dir) / f"{PLOT}.png"
    atomic_write_bytes(path, buf.getvalue())
    return [path]
