"""Trajectory plots (PNG) from measurement records.

Four figures, each readable at a glance:
- ``bpb_vs_step``: full-K and single-stage BPB vs step, the LR multiplier on a second axis (the
  records' ``lrm`` as markers plus the phase's schedule curve from ``poelm.schedule.lrm``), and the
  phase boundaries (warmup end, warmdown start) marked where they fall inside the plotted steps;
- ``spec_routing_vs_step``: self-speculative acceptance and the routed-to-stage-0 fraction;
- ``wand_vs_step``: the K-1 WAND p99 bounds;
- ``alpha_sweep``: renormalised BPB vs alpha for the seed and the newest record.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` (Agg canvas), never
pyplot, so no global state or GUI backend is involved; each PNG is rendered into memory and
written atomically. ``series(records)`` is the exact data each figure draws (a missing
measurement drops that point), so tests and callers can check it.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from poelm.fsio import atomic_write_bytes
from poelm.schedule import lrm as schedule_lrm
from poelm.report.verdict import branch_name, phase_of, seed_position, sort_records, value
from poelm.report import averages as averages_report
from poelm.report import cooldown as cooldown_report

PLOTS = ("bpb_vs_step", "spec_routing_vs_step", "wand_vs_step", "alpha_sweep")


def _xy(recs, key):
    pts = [(int(r["step"]), value(r, key)) for r in recs]
    pts = [(x, y) for x, y in pts if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def series(records) -> dict[str, dict[str, tuple[list, list]]]:
    """``{figure: {series label: (x, y)}}`` of every plotted line (phase markers excluded)."""
    recs = sort_records(records)
    K = max((int(r.get("K") or 0) for r in recs), default=0)
    bpb = {f"full K={K}": _xy(recs, "bpb.full")}
    bpb.update({f"single s{k}": _xy(recs, f"bpb.single.{k}") for k in range(K)})
    bpb["lrm"] = _xy(recs, "lrm")
    bpb.update(cooldown_report.plot_series(recs))  # "BPB if annealed here (N-step cooldown)" at the probed steps
    bpb.update(averages_report.plot_series(recs))  # "BPB of the average of the last N saves" at the averaged steps
    out = {
        "bpb_vs_step": bpb,
        "spec_routing_vs_step": {"spec acceptance α": _xy(recs, "spec.acceptance"),
                                 "routed to stage 0": _xy(recs, "routing.fraction")},
        "wand_vs_step": {f"bound {s} → {s + 1}": _xy(recs, f"wand.bounds.{s}") for s in range(K - 1)},
        "alpha_sweep": {},
    }
    if recs:
        seed_i = seed_position(recs)
        for i, tag in ((seed_i, "seed"), (len(recs) - 1, "newest")):
            sw = recs[i].get("alpha_sweep") or {}
            pts = [(a, b) for a, b in zip(sw.get("alphas") or [], sw.get("bpb") or []) if a is not None and b is not None]
            if pts:
                out["alpha_sweep"][f"{branch_name(recs[i])} ({tag})"] = ([p[0] for p in pts], [p[1] for p in pts])
            if i == len(recs) - 1 == seed_i:
                break
    return out


def _steps_axis(ax):
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def _boundaries(ax, recs):
    """Vertical lines at warmup end / warmdown start inside the plotted step range."""
    ph = phase_of(recs)
    if ph is None or not recs:
        return
    lo, hi = int(recs[0]["step"]), int(recs[-1]["step"])
    for step, name, style in ((ph.start_step + ph.warmup, "warmup end", ":"),
                              (ph.start_step + ph.warmdown_start, "warmdown start", "--")):
        if lo <= step <= hi:
            ax.axvline(step, color="grey", linestyle=style, linewidth=1.2, label=f"{name} (step {step:,})")


def _bpb_figure(recs, data) -> Figure:
    fig = Figure(figsize=(10, 5.5), dpi=110)
    ax = fig.add_subplot()
    for label, (x, y) in data.items():
        if label != "lrm" and x:
            full = label.startswith("full")  # drawn on top, black dashed: it nearly overlaps the last stage
            ax.plot(x, y, marker="o", markersize=4, label=label, linewidth=2.0 if full else 1.0,
                    color="black" if full else None, linestyle="--" if full else "-", zorder=3 if full else 2)
    ax.set_ylabel("BPB (lower is better)")
    _steps_axis(ax)
    _boundaries(ax, recs)
    cooldown_report.draw_intervals(ax, recs)
    ax2 = ax.twinx()
    ph = phase_of(recs)
    if ph is not None and recs:
        lo, hi = max(int(recs[0]["step"]), ph.start_step), int(recs[-1]["step"])
        if hi > lo:
            n = 200
            xs = [lo + (hi - lo) * i / n for i in range(n + 1)]
            ax2.plot(xs, [schedule_lrm(int(round(s)), ph) for s in xs], color="black", alpha=0.25, linewidth=1,
                     label="lrm (schedule)")
    x, y = data["lrm"]
    if x:
        ax2.plot(x, y, color="black", marker="s", markersize=4, linestyle="none", label="lrm")
    ax2.set_ylabel("LR multiplier")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title("Per-stage BPB vs step, with the LR multiplier")
    fig.tight_layout()
    return fig


def _lines_figure(recs, data, title, ylabel, percent=False, xlabel=None) -> Figure:
    fig = Figure(figsize=(10, 5), dpi=110)
    ax = fig.add_subplot()
    for label, (x, y) in data.items():
        if x:
            ax.plot(x, y, marker="o", markersize=4, label=label)
    if xlabel is None:
        _steps_axis(ax)
        _boundaries(ax, recs)
    else:
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def figures(records) -> dict[str, Figure]:
    """The figures that have data (a figure whose every series is empty is left out)."""
    recs = sort_records(records)
    data = series(recs)
    out = {}
    if any(x for k, (x, _) in data["bpb_vs_step"].items() if k != "lrm"):
        out["bpb_vs_step"] = _bpb_figure(recs, data["bpb_vs_step"])
    if any(x for x, _ in data["spec_routing_vs_step"].values()):
        out["spec_routing_vs_step"] = _lines_figure(recs, data["spec_routing_vs_step"],
                                                    "Self-speculative acceptance and routing fraction vs step",
                                                    "fraction", percent=True)
    if any(x for x, _ in data["wand_vs_step"].values()):
        out["wand_vs_step"] = _lines_figure(recs, data["wand_vs_step"], "WAND p99 bounds vs step",
                                            "p99 of range(delta) (nats)")
    if data["alpha_sweep"]:
        out["alpha_sweep"] = _lines_figure(recs, data["alpha_sweep"], "Bayesian PoE alpha sweep (renormalised BPB)",
                                           "BPB", xlabel="alpha (0 = geometric mean, 1 = sum)")
    return out


def make_plots(records, out_dir) -> list[Path]:
    """Write ``<name>.png`` for every figure with data into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    paths = []
    for name, fig in figures(records).items():
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        path = out_dir / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
