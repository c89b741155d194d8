"""Cooldown probes in the report: "BPB if annealed here (N-step cooldown)" for every probed branch.

A probe (``poelm cooldown``, branch ``cooldown-XXXXX-N``) is a short LR decay from step XXXXX
(Hägele et al. 2024, arXiv:2405.18392): its BPB estimates what the trajectory would reach if it
were annealed at that save, which a peak-phase save's own BPB (at lrm 0.5) cannot show. Its
measurement record is *not* a save of the trajectory: ``attach`` takes probe records out of the
record list and hangs them on the record of the step they start from (``rec["cooldown_probes"]``),
so the step trajectory, its seed and its verdict stay what they were.

What the report shows, per probed branch (``rows``): the branch's own full-K BPB and the probe's,
both with their 95% block-bootstrap intervals, and the probe's Δ vs the seed with the paired
interval of its ``against`` block (``poelm measure --against SEED``), else "CI n/a". The verdict
line (``verdict_lines``) says, per N, whether the annealed-here BPB is below the seed beyond that
interval (paired CI entirely below 0; without it, the two value intervals disjoint), and its trend
over the probed branches (``verdict.trend``: Mann–Kendall from 3 probes on; with 2, the change and
whether their value intervals overlap). ``plot_series`` is the line drawn in ``bpb_vs_step`` at
the probed steps; ``draw_intervals`` adds its error bars.
"""

from __future__ import annotations

import re

from poelm.report.cells import NM, ci_cell
from poelm.report.verdict import branch_name, delta_ci, fmt_num, fmt_signed, get, seed_position, sort_records, trend

FIELD = "cooldown_probes"
UNMATCHED = "cooldown_probes_unmatched"
PROBE_BRANCH = re.compile(r"cooldown-(\d{5,})-([1-9]\d*)")  # poelm.trajectory.publish.COOLDOWN_BRANCH


# ----------------------------------------------------------------------------- records
def is_probe(rec: dict) -> bool:
    """A record of a cooldown probe: its phase says so, or its branch is ``cooldown-XXXXX-N``."""
    ph = rec.get("phase")
    return (isinstance(ph, dict) and ph.get("kind") == "cooldown") or bool(PROBE_BRANCH.fullmatch(str(rec.get("branch") or "")))


def info(rec: dict) -> dict:
    """``source_step, steps, shape, from_lrm, to_lrm`` of a probe record (phase first, else its name)."""
    ph = rec.get("phase") if isinstance(rec.get("phase"), dict) else {}
    m = PROBE_BRANCH.fullmatch(str(rec.get("branch") or ""))
    src = ph.get("start_step", int(m.group(1)) if m else None)
    n = ph.get("steps", int(m.group(2)) if m else None)
    return {"source_step": None if src is None else int(src), "steps": None if n is None else int(n),
            "shape": ph.get("shape"), "from_lrm": ph.get("from_lrm"), "to_lrm": ph.get("to_lrm")}


def attach(records: list[dict]) -> list[dict]:
    """The step records (sorted) with every probe record on ``rec["cooldown_probes"]`` of the
    record at its source step (sorted by N). Probe records come from the list itself (record
    files) or already ride on a record (``publish.read_records`` puts a repository's there);
    probes whose source step has no record go to the seed's ``cooldown_probes_unmatched``."""
    probes = [r for r in records if is_probe(r)]
    recs = sort_records([r for r in records if not is_probe(r)])
    for r in recs:
        probes += r.pop(FIELD, None) or []
        probes += r.pop(UNMATCHED, None) or []
    if not probes or not recs:
        return recs
    by_step = {int(r["step"]): r for r in recs}
    for p in sorted(probes, key=lambda r: (info(r)["source_step"] or 0, info(r)["steps"] or 0)):
        host = by_step.get(info(p)["source_step"])
        if host is None:
            recs[seed_position(recs)].setdefault(UNMATCHED, []).append(p)
        else:
            host.setdefault(FIELD, []).append(p)
    return recs


def rows(records) -> list[dict]:
    """One dict per (probed branch, probe), in step order: ``branch, step, lrm, own, own_ci,
    annealed, annealed_ci, delta, delta_ci, probe`` (its branch), ``steps, shape, from_lrm, to_lrm``."""
    recs = sort_records(records)
    if not recs:
        return []
    seed = recs[seed_position(recs)]
    seed_v, seed_ci = get(seed, "bpb.full")
    out = []
    for r in recs:
        own, own_ci = get(r, "bpb.full")
        for p in r.get(FIELD) or []:
            v, ci = get(p, "bpb.full")
            d = None if v is None or seed_v is None else v - seed_v
            dci = delta_ci(p, seed, "bpb.full")
            out.append({"branch": branch_name(r), "step": int(r["step"]), "lrm": r.get("lrm"), "own": own, "own_ci": own_ci,
                        "annealed": v, "annealed_ci": ci, "delta": d, "delta_ci": dci, "seed_ci": seed_ci,
                        "probe": branch_name(p), **info(p)})
    return out


def below_seed(row) -> bool | None:
    """Is the annealed-here BPB below the seed beyond its interval? Paired CI first, else the
    two value intervals disjoint; None when neither interval is known."""
    if row["delta"] is None:
        return None
    if row["delta_ci"] is not None:
        return row["delta_ci"][1] < 0
    if row["annealed_ci"] is not None and row["seed_ci"] is not None:
        return row["annealed_ci"][1] < row["seed_ci"][0]
    return None


def above_seed(row) -> bool:
    if row["delta_ci"] is not None:
        return row["delta_ci"][0] > 0
    return row["annealed_ci"] is not None and row["seed_ci"] is not None and row["annealed_ci"][0] > row["seed_ci"][1]


# ----------------------------------------------------------------------------- report pieces
def section(records):
    """``(heading, description, table)`` of the probes, or None when no record carries one."""
    rs = rows(records)
    if not rs:
        return None
    recs = sort_records(records)
    seed = recs[seed_position(recs)]
    b6, d6 = fmt_num(6), fmt_signed(6)
    table = ["| Branch | Step | lrm | own full-K BPB | BPB if annealed here (N-step cooldown) | Δ annealed − own | "
             "Δ annealed vs seed (95% CI) | probe |", "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lrm = NM if r["lrm"] is None else f"{r['lrm']:.4f}"
        d_own = NM if r["annealed"] is None or r["own"] is None else d6(r["annealed"] - r["own"])
        if r["delta"] is None:
            d_seed = NM
        else:
            d_seed = d6(r["delta"]) + (f" [{d6(r['delta_ci'][0])}, {d6(r['delta_ci'][1])}]" if r["delta_ci"] else " (CI n/a)")
        how = f"{r['steps']}-step {r['shape'] or '?'}, lrm {_lrm(r['from_lrm'])} → {_lrm(r['to_lrm'])}"
        table.append(f"| `{r['branch']}` | {r['step']:,} | {lrm} | {ci_cell(r['own'], r['own_ci'], b6)} | "
                     f"{ci_cell(r['annealed'], r['annealed_ci'], b6)} ({how}) | {d_own} | {d_seed} | `{r['probe']}` |")
    desc = ("A cooldown probe decays the LR multiplier from the branch's own lrm to the target over N steps on the same "
            "data stream (Hägele et al. 2024) and is measured on the same slice: its BPB is what the trajectory would "
            f"reach if annealed at that save. Seed: `{branch_name(seed)}`. Δ vs the seed carries the paired 95% bootstrap "
            "interval when the probe was measured `--against` the seed.")
    unmatched = seed.get(UNMATCHED) or []
    if unmatched:
        desc += " Probes whose source step has no record: " + ", ".join(f"`{branch_name(p)}`" for p in unmatched) + "."
    return "BPB if annealed here (cooldown probes)", desc, "\n".join(table)


def _lrm(x) -> str:
    return "?" if x is None else f"{x:g}"


def verdict_lines(records) -> list[str]:
    """One line per probe length N: below the seed beyond its interval or not, and the trend."""
    rs = rows(records)
    out = []
    for n in sorted({r["steps"] for r in rs if r["steps"] is not None}):
        pts = [r for r in rs if r["steps"] == n and r["annealed"] is not None]
        if not pts:
            continue
        b6, d6 = fmt_num(6), fmt_signed(6)
        below = [r for r in pts if below_seed(r)]
        above = [r for r in pts if above_seed(r)]
        unknown = [r for r in pts if below_seed(r) is None]
        each = "; ".join(f"step {r['step']:,}: {b6(r['annealed'])}, Δ {d6(r['delta'])}" + (
            f" [{d6(r['delta_ci'][0])}, {d6(r['delta_ci'][1])}]" if r["delta_ci"] else "") for r in pts if r["delta"] is not None)
        s = (f"BPB if annealed here ({n}-step cooldown), {len(pts)} probed branch(es) ({each or 'no seed value'}): "
             f"{len(below)} below the seed beyond the interval, {len(above)} above it, "
             f"{len(pts) - len(below) - len(above) - len(unknown)} within it"
             + (f", {len(unknown)} without an interval (measure it --against the seed)" if unknown else ""))
        s += " — annealing here would beat the seed" if below and not above and len(below) == len(pts) else (
            " — no probed save beats the seed once annealed" if not below else "")
        s += ". " + _trend_sentence(pts)
        out.append(s)
    return out


def _trend_sentence(pts) -> str:
    steps, vals = [r["step"] for r in pts], [r["annealed"] for r in pts]
    if len(pts) == 1:
        return "One probe: no trend yet."
    t = trend(steps, vals)
    if t["kind"] == "too few":  # two probes: the change, and whether their intervals overlap
        a, b = pts[0], pts[-1]
        # Both paired against the seed on the same slice: their Δ intervals are the sharper test
        # (slice-wide variation cancels); else the value intervals (conservative).
        paired = a["delta_ci"] is not None and b["delta_ci"] is not None
        ca, cb = (a["delta_ci"], b["delta_ci"]) if paired else (a["annealed_ci"], b["annealed_ci"])
        sep = None if ca is None or cb is None else (cb[1] < ca[0] or cb[0] > ca[1])
        what = "paired Δ-vs-seed intervals" if paired else "intervals"
        word = "falls" if b["annealed"] < a["annealed"] else "rises" if b["annealed"] > a["annealed"] else "stays"
        tail = "" if sep is None else (f" (their {what} are disjoint: a real change)" if sep else
                                       f" (their {what} overlap: within noise)")
        return (f"Trend over the probed branches: {word} from {a['annealed']:.6f} at step {a['step']:,} to "
                f"{b['annealed']:.6f} at step {b['step']:,} ({b['annealed'] - a['annealed']:+.6f}){tail}; too few probes for a trend test.")
    if t["kind"] == "constant":
        return f"Trend over the probed branches: constant at {t['lo']:.6f}."
    return (f"Trend over the probed branches ({t['n']} probes): {t['kind']} (Mann–Kendall τ = {t['tau']:+.2f}, p = {t['p']:.3f}), "
            f"range {t['lo']:.6f}–{t['hi']:.6f}" + ("; too few probes for a significant test" if t.get("underpowered") else "") + ".")


def plot_series(records) -> dict[str, tuple[list, list]]:
    """``{"BPB if annealed here (N-step cooldown)": (probed steps, probe BPBs)}`` per N."""
    out = {}
    for r in rows(records):
        if r["annealed"] is None or r["steps"] is None:
            continue
        xs, ys = out.setdefault(label(r["steps"]), ([], []))
        xs.append(r["step"])
        ys.append(r["annealed"])
    return out


def label(n: int) -> str:
    return f"BPB if annealed here ({n}-step cooldown)"


def draw_intervals(ax, records) -> None:
    """Error bars (95% CI) on the probe lines ``bpb_vs_step`` drew from ``plot_series``, which are
    restyled (dotted, star markers) so they do not read as one more stage."""
    colours = {}
    for ln in ax.get_lines():
        if str(ln.get_label()).startswith("BPB if annealed here"):
            ln.set_linestyle(":")
            ln.set_marker("*")
            ln.set_markersize(10)
        colours[ln.get_label()] = ln.get_color()
    for r in rows(records):
        if r["annealed"] is None or r["annealed_ci"] is None:
            continue
        lo, hi = r["annealed_ci"]
        ax.errorbar([r["step"]], [r["annealed"]], yerr=[[r["annealed"] - lo], [hi - r["annealed"]]], fmt="none",
                    ecolor=colours.get(label(r["steps"]), "black"), capsize=3, linewidth=1)
