"""Weight averages in the report: "BPB of the average of the last N saves" beside each branch's own
BPB and its cooldown probe, and whether the two annealing estimates agree.

An average (``poelm average``, branch ``avg-XXXXX-N``: the fp32 mean of the weights of N saves
ending at step XXXXX) estimates what annealing at that save would reach, with no training (LAWA,
Kaddour 2022; Sanyal et al. 2023); a cooldown probe (``report.cooldown``) estimates the same thing
by training N steps of LR decay. Like a probe, an average's record is not a save of the
trajectory: ``attach`` hangs it on the record of its newest averaged step
(``rec["averages"]``; ``publish.read_records`` does the same for a repository).

Per averaged branch (``rows``): its own full-K BPB, the average's, the average's Δ vs the seed
with the paired interval of its ``against`` block (``poelm measure --against SEED``), and the
cooldown probe(s) of the same branch. The verdict (``verdict_lines``) says, per pair, whether the
two estimates agree: their paired Δ-vs-seed intervals overlap (both measured against the seed on
the same slice; else their value intervals), and whether both give the same answer to the card's
question (below the seed beyond the interval, above it, or within it).
"""

from __future__ import annotations

from poelm.report import cooldown as cooldown_report
from poelm.report.cells import NM, ci_cell
from poelm.trajectory.publish import average_of
from poelm.report.verdict import branch_name, delta_ci, fmt_num, fmt_signed, get, seed_position, sort_records

FIELD = "averages"
UNMATCHED = "averages_unmatched"


def of(rec: dict) -> tuple[int, int] | None:
    """``(newest averaged step, N)`` of an average's record (from its ``avg-XXXXX-N`` branch)."""
    return average_of(str(rec.get("branch") or ""))


def attach(records: list[dict]) -> list[dict]:
    """The other records (sorted) with every average's record on ``rec["averages"]`` of the
    record at its newest step (by N); averages of an unmeasured step go to the seed's
    ``averages_unmatched``. Cooldown probe records are left in place for ``cooldown.attach``."""
    avgs = [r for r in records if of(r)]
    recs = sort_records([r for r in records if not of(r)])
    for r in recs:
        avgs += r.pop(FIELD, None) or []
        avgs += r.pop(UNMATCHED, None) or []
    if not avgs or not recs:
        return recs
    hosts = [r for r in recs if not cooldown_report.is_probe(r)] or recs
    by_step = {int(r["step"]): r for r in hosts}
    for a in sorted(avgs, key=of):
        host = by_step.get(of(a)[0])
        (host or hosts[seed_position(hosts)]).setdefault(FIELD if host else UNMATCHED, []).append(a)
    return recs


def _answer(delta, dci) -> str | None:
    """The card's question for one estimate: below / above the seed beyond the interval, or within."""
    if delta is None or dci is None:
        return None
    return "below" if dci[1] < 0 else "above" if dci[0] > 0 else "within"


def _words(ans: str) -> str:
    return "not distinguishable from the seed (the interval holds 0)" if ans == "within" else f"{ans} the seed beyond the interval"


def rows(records) -> list[dict]:
    """One dict per (averaged branch, average): ``branch, step, lrm, own, own_ci, avg, avg_ci, n,
    delta, delta_ci, avg_branch, probes`` (each probe of the branch: ``branch, steps, bpb, ci,
    delta, delta_ci``)."""
    recs = sort_records(records)
    if not recs:
        return []
    seed = recs[seed_position(recs)]
    seed_v, _ = get(seed, "bpb.full")
    out = []
    for r in recs:
        own, own_ci = get(r, "bpb.full")
        probes = []
        for p in r.get(cooldown_report.FIELD) or []:
            v, ci = get(p, "bpb.full")
            probes.append({"branch": branch_name(p), "steps": cooldown_report.info(p)["steps"], "bpb": v, "ci": ci,
                           "delta": None if v is None or seed_v is None else v - seed_v, "delta_ci": delta_ci(p, seed, "bpb.full")})
        for a in r.get(FIELD) or []:
            v, ci = get(a, "bpb.full")
            out.append({"branch": branch_name(r), "step": int(r["step"]), "lrm": r.get("lrm"), "own": own, "own_ci": own_ci,
                        "avg": v, "avg_ci": ci, "n": of(a)[1], "avg_branch": branch_name(a),
                        "delta": None if v is None or seed_v is None else v - seed_v, "delta_ci": delta_ci(a, seed, "bpb.full"),
                        "probes": probes})
    return out


def section(records):
    """``(heading, description, table)`` of the averages, or None when no record carries one."""
    rs = rows(records)
    if not rs:
        return None
    recs = sort_records(records)
    b6, d6 = fmt_num(6), fmt_signed(6)
    table = ["| Branch | Step | lrm | own full-K BPB | BPB of the average of the last N saves | Δ average vs seed (95% CI) | "
             "BPB if annealed here (cooldown probe) | Δ average − probe | average |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        probes = "; ".join(f"{ci_cell(p['bpb'], p['ci'], b6)} ({p['steps']}-step)" for p in r["probes"]) or "no probe"
        d_probe = "; ".join(d6(r["avg"] - p["bpb"]) for p in r["probes"] if p["bpb"] is not None and r["avg"] is not None) or "-"
        d_seed = NM if r["delta"] is None else d6(r["delta"]) + (f" [{d6(r['delta_ci'][0])}, {d6(r['delta_ci'][1])}]" if r["delta_ci"] else " (CI n/a)")
        lrm = NM if r["lrm"] is None else f"{r['lrm']:.4f}"
        table.append(f"| `{r['branch']}` | {r['step']:,} | {lrm} | "
                     f"{ci_cell(r['own'], r['own_ci'], b6)} | {ci_cell(r['avg'], r['avg_ci'], b6)} (N = {r['n']}) | {d_seed} | {probes} | "
                     f"{d_probe} | `{r['avg_branch']}` |")
    desc = ("`poelm average` takes the arithmetic mean of the weights of the last N saves ending at the branch (accumulated "
            "in fp32), a training-free estimate of what annealing there would reach (LAWA: Kaddour 2022; Sanyal et al. 2023), "
            "measured on the same slice as every branch; beside it the branch's cooldown probe, the other estimate. Seed: "
            f"`{branch_name(recs[seed_position(recs)])}`; Δ vs the seed carries the paired 95% bootstrap interval when the "
            "average was measured `--against` the seed.")
    return "BPB of the average of the last N saves (weight averaging)", desc, "\n".join(table)


def verdict_lines(records) -> list[str]:
    """One line per average: its Δ vs the seed and, where the branch has a cooldown probe, whether
    the two estimates agree (module docstring)."""
    out, pairs = [], []
    b6, d6 = fmt_num(6), fmt_signed(6)
    for r in rows(records):
        if r["avg"] is None:
            continue
        ci = f" [{d6(r['delta_ci'][0])}, {d6(r['delta_ci'][1])}]" if r["delta_ci"] else ""
        ans = _answer(r["delta"], r["delta_ci"])
        s = (f"BPB of the average of the last {r['n']} saves at step {r['step']:,}: {b6(r['avg'])} (own {b6(r['own']) if r['own'] is not None else NM}), "
             + (f"Δ vs the seed {d6(r['delta'])}{ci}" + (f", {_words(ans)}" if ans else
                                                          " (measure it --against the seed for an interval)") if r["delta"] is not None else "no seed value"))
        for p in r["probes"]:
            if p["bpb"] is None:
                continue
            paired = r["delta_ci"] is not None and p["delta_ci"] is not None
            ca, cb = (r["delta_ci"], p["delta_ci"]) if paired else (r["avg_ci"], p["ci"])
            overlap = None if ca is None or cb is None else not (ca[1] < cb[0] or cb[1] < ca[0])
            pans = _answer(p["delta"], p["delta_ci"])
            if ans is None or pans is None or overlap is None:
                same = ""
            elif ans == pans:
                same = f" {'and' if overlap else 'but'} give the same answer to the card's question ({_words(ans)})"
            else:
                same = f" {'but' if overlap else 'and'} answer the card's question differently (average: {ans}, probe: {pans})"
            word = ("intervals unknown" if overlap is None else
                    f"agree ({'paired Δ-vs-seed' if paired else 'value'} intervals overlap)" if overlap else
                    f"disagree ({'paired Δ-vs-seed' if paired else 'value'} intervals disjoint)")
            s += (f"; vs the {p['steps']}-step cooldown probe {b6(p['bpb'])}: average − probe {d6(r['avg'] - p['bpb'])}, the two estimates "
                  f"{word}{same}")
            pairs.append((overlap, ans is not None and ans == pans, r["avg"] - p["bpb"]))
        out.append(s + ".")
    if len(pairs) > 1:
        d = [x[2] for x in pairs]
        side = ("below" if max(d) < 0 else "above" if min(d) > 0 else "on both sides of")
        out.append(f"Averages vs cooldown probes over {len(pairs)} pairs: {sum(1 for x in pairs if x[0])} agree within their intervals, "
                   f"{sum(1 for x in pairs if x[1])} give the same answer to the card's question; the averages sit {side} the probes "
                   f"(average − probe {d6(min(d))} to {d6(max(d))}).")
    return out


def plot_series(records) -> dict[str, tuple[list, list]]:
    """``{"BPB of the average of the last N saves": (steps, BPBs)}`` per N, for ``bpb_vs_step``."""
    out = {}
    for r in rows(records):
        if r["avg"] is not None:
            xs, ys = out.setdefault(f"BPB of the average of the last {r['n']} saves", ([], []))
            xs.append(r["step"])
            ys.append(r["avg"])
    return out
