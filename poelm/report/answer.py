"""The answer on top of the report and of every model card (issue 22).

The card asks whether a re-warmed LR cycle moves the model away from its seed in a coherent
direction. A reader should get that answer in a few lines, before any table: every line here is
computed from the records and the verdict's tests (``verdict.judge`` / ``noise_test``), nothing is
typed by hand.

1. the answer word for the NEWEST save: ``better`` / ``worse`` when its full-K BPB is below /
   above the seed beyond the noise band (the paired 95% bootstrap interval, and the warmup floor),
   ``no change`` when it is inside, ``undetermined`` when no interval exists; with the count of
   quality figures that moved either way (the verdict's quality group);
2. the best save (lowest full-K BPB) under the same test;
3. where in the schedule (warmup / peak / warmdown) the saves beyond the interval lie, and the first;
4. what the cooldown probes say: would annealing end the cycle below the seed;
5. stage agreement (s0 = full agreement, speculative acceptance) and decoding speed (measured
   speedups), each called changed only when its interval says so;
6. a warning for any record measured on another corpus and written into its branch on request
   (``data_override``, ``poelm measure --data --write-branch``).

Then one compact headline table: seed, best and newest save side by side.
"""

from __future__ import annotations

from poelm.report import benchmarks
from poelm.report import cooldown as cooldown_report
from poelm.report.cells import NM, cell as _cell, esc as _esc, table as _table, times as _x  # local names kept
from poelm.report.judge import judge
from poelm.report.verdict import (branch_name, fmt_num, fmt_signed, get, noise_test, phase_of, rel_step, segment, seed_position,
                                  sort_records)

KEY = "bpb.full"


def _call(nt) -> str:
    """``better`` | ``worse`` | ``no change`` | ``undetermined`` of a BPB noise test (lower is better)."""
    if nt["delta"] is None or nt["outside"] is None:
        return "undetermined"
    if not nt["outside"]:
        return "no change"
    return "better" if nt["delta"] < 0 else "worse"


def _phrase(call: str) -> str:
    return {"better": "below the seed beyond the noise band", "worse": "above the seed beyond the noise band",
            "no change": "inside the noise band: no change", "undetermined": "no interval to call it"}[call]


def _where(rec, phase) -> str:
    rel = rel_step(rec, phase)
    seg = segment(rel, phase)
    if seg is None:
        return f"step {int(rec['step']):,}"
    lrm = "" if rec.get("lrm") is None else f", lrm {rec['lrm']:.3g}"
    return f"step {int(rec['step']):,}, {seg} rel_it {rel:,}{lrm}"


def _delta_text(nt) -> str:
    d6 = fmt_signed(6)
    ci = nt.get("ci")
    ci = f" [{d6(ci[0])}, {d6(ci[1])}]" if ci and None not in ci else " (no paired interval)"  # [None, None]: not measured paired
    return f"Δ {d6(nt['delta'])}{ci}" if nt.get("delta") is not None else "Δ not measured"


def best_index(recs, seed_i) -> int | None:
    """The save after the seed with the lowest full-K BPB (None: none measured)."""
    pts = [(v, i) for i, r in enumerate(recs) if i != seed_i and (v := get(r, KEY)[0]) is not None]
    return min(pts)[1] if pts else None


def answer(records, verdict_data: dict | None = None) -> dict:
    """``{"word", "lines", "table"}``: the answer word (module docstring), its lines (markdown)
    and the headline table. ``verdict_data``: ``verdict.judge(records)`` when the caller has it."""
    recs = sort_records(records)
    if not recs:
        return {"word": "undetermined", "lines": ["No measurement records: nothing to answer."], "table": ""}
    seed_i, phase = seed_position(recs), phase_of(recs)
    last_i = len(recs) - 1
    seed, last = recs[seed_i], recs[last_i]
    b6 = fmt_num(6)
    if last_i == seed_i:
        return {"word": "undetermined", "lines": [f"Only the seed (`{branch_name(seed)}`) is measured: nothing to compare yet."],
                "table": headline_table(recs, seed_i, None)}
    j = verdict_data or judge(recs)
    nt = noise_test(recs, seed_i, last_i, KEY, phase)
    word = _call(nt)
    v0, v1 = get(seed, KEY)[0], get(last, KEY)[0]
    lines = []
    if nt["delta"] is None:
        lines.append(f"**Answer: {word}.** Full-K BPB is not measured at both the seed and the newest save.")
    else:
        q = next((g["result"] for g in j["groups"] if g["kind"] == "quality"), None)
        counts = (f" Quality figures beyond their noise band: {len(q['better'])} better, {len(q['worse'])} worse, of "
                  f"{len(q['measured'])} measured." if q else "")
        lines.append(f"**Answer: {word}.** The newest save `{branch_name(last)}` ({_where(last, phase)}) has full-K BPB "
                     f"{b6(v1)} vs {b6(v0)} at the seed `{branch_name(seed)}`: {_delta_text(nt)}, {_phrase(word)}.{counts}")
    bi = best_index(recs, seed_i)
    if bi is not None and bi != last_i:
        bn = noise_test(recs, seed_i, bi, KEY, phase)
        lines.append(f"Best save `{branch_name(recs[bi])}` ({_where(recs[bi], phase)}): full-K BPB {b6(get(recs[bi], KEY)[0])}, "
                     f"{_delta_text(bn)}, {_phrase(_call(bn))}.")
    elif bi is not None:
        lines.append("The newest save is also the best one (lowest full-K BPB).")
    lines.append(_schedule_line(recs, seed_i, phase))
    lines.append(_cooldown_line(recs))
    lines.append(_efficiency_line(recs, seed_i, last_i, phase))
    odd = [r for r in recs if r.get("data_override")]
    if odd:
        lines.append("⚠ Measured on another corpus (`--data`, written by `--write-branch`), not comparable with the other "
                     "saves: " + ", ".join(f"`{branch_name(r)}` ({_esc(r.get('data'))})" for r in odd) + ".")
    return {"word": word, "lines": lines, "table": headline_table(recs, seed_i, bi)}


def _schedule_line(recs, seed_i, phase) -> str:
    by_seg, first = {}, None
    for i in range(seed_i + 1, len(recs)):
        call = _call(noise_test(recs, seed_i, i, KEY, phase))
        seg = segment(rel_step(recs[i], phase), phase) or "trajectory"
        n = by_seg.setdefault(seg, [0, 0])
        n[1] += 1
        if call == "better":
            n[0] += 1
            first = first if first is not None else i
    parts = ", ".join(f"{seg} {a} of {b}" for seg, (a, b) in by_seg.items())
    head = f"Where in the schedule: saves below the seed beyond the noise band: {parts or 'none after the seed'}"
    if first is None:
        return head + "."
    return head + f"; the first is `{branch_name(recs[first])}` ({_where(recs[first], phase)})."


def _cooldown_line(recs) -> str:
    rows = [r for r in cooldown_report.rows(recs) if r["annealed"] is not None]
    if not rows:
        return "Cooldown probes: none measured (`poelm cooldown` answers \"what if we annealed here?\")."
    d6, b6 = fmt_signed(6), fmt_num(6)
    each = []
    for r in rows:
        below = cooldown_report.below_seed(r)
        what = "below the seed beyond the interval" if below else ("above it" if cooldown_report.above_seed(r) else
                                                                     "within the interval" if below is False else "no interval")
        ci = f" [{d6(r['delta_ci'][0])}, {d6(r['delta_ci'][1])}]" if r["delta_ci"] else ""
        each.append(f"annealed at step {r['step']:,} ({r['steps']} steps): {b6(r['annealed'])}, Δ {d6(r['delta'])}{ci}, {what}")
    n_below = sum(bool(cooldown_report.below_seed(r)) for r in rows)
    verdict_ = ("the cycle would end below the seed" if n_below == len(rows) else
                "no probe ends below the seed" if n_below == 0 else f"{n_below} of {len(rows)} probes end below the seed")
    return f"Cooldown probes: {verdict_} ({'; '.join(each)})."


def _moved(recs, seed_i, last_i, key, phase, fmt, timing=False) -> str | None:
    (v0, ci0), (v1, ci1) = get(recs[seed_i], key), get(recs[last_i], key)
    if v0 is None or v1 is None:
        return None
    nt = noise_test(recs, seed_i, last_i, key, phase, timing)
    cell = lambda v, ci: fmt(v) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")  # noqa: E731
    call = {True: "changed beyond the intervals", False: "no change (intervals overlap)" if timing else "no change",
            None: "no interval to call it"}[nt["outside"]]
    return f"{cell(v0, ci0)} → {cell(v1, ci1)}, {call}"


def _efficiency_line(recs, seed_i, last_i, phase) -> str:
    b4, x2 = fmt_num(4), _x(2)
    parts = []
    for key, label, fmt, timing in (("routing.agreement_s0_full", "s0=full agreement", b4, False),
                                    ("spec.acceptance", "speculative acceptance α", b4, False),
                                    ("spec.speedup", "speculative speedup", x2, True),
                                    ("wand.generation.speedup", "WAND speedup", x2, True),
                                    ("routing.generation.speedup", "route speedup", x2, True)):
        got = _moved(recs, seed_i, last_i, key, phase, fmt, timing)
        if got:
            parts.append(f"{label} {got}")
    if not parts:
        return "Stage agreement and decoding speed: not measured."
    return "Stage agreement and decoding speed (seed → newest): " + "; ".join(parts) + "."


def headline_table(recs, seed_i, best_i) -> str:
    """Seed / best / newest side by side (one row when they coincide)."""
    last_i = len(recs) - 1
    roles = {}
    for role, i in (("seed", seed_i), ("best", best_i), ("newest", last_i)):
        if i is not None:
            roles.setdefault(i, []).append(role)
    bkeys = benchmarks.series_keys(recs)[:2]
    header = ["", "Branch", "Step", "full-K BPB [95% CI]", "Δ vs seed [95% CI]", "full accuracy"]
    header += [benchmarks.label(k) for k in bkeys] + ["spec acceptance α", "spec speedup", "WAND speedup"]
    rows = []
    for i, role in sorted(roles.items()):
        r = recs[i]
        if i == seed_i:
            d = "—"
        else:
            nt = noise_test(recs, seed_i, i, KEY, phase_of(recs))
            d = NM if nt["delta"] is None else _delta_text(nt).removeprefix("Δ ")
        rows.append([" / ".join(role), f"`{branch_name(r)}`", f"{int(r['step']):,}", _cell(r, KEY, fmt_num(6)), d,
                     _cell(r, "acc.full", fmt_num(4))]
                    + [benchmarks.score_cell(benchmarks.find(r, k)) for k in bkeys]
                    + [_cell(r, "spec.acceptance", fmt_num(4)), _cell(r, "spec.speedup", _x(2)),
                       _cell(r, "wand.generation.speedup", _x(2))])
    return _table(header, rows)


# ----------------------------------------------------------------------------- markdown
def answer_markdown(records, verdict_data: dict | None = None) -> str:
    """The ``## Answer`` section: the computed lines, then the headline table."""
    a = answer(records, verdict_data)
    return "## Answer\n\n" + "\n\n".join(a["lines"]) + ("\n\n" + a["table"] if a["table"] else "") + "\n"


def verdict_markdown(j: dict, extra: list[str] = ()) -> str:
    """The ``## Verdict`` section from ``verdict.judge``: per kind its summary and one bullet per
    figure, the trend line, ``extra`` lines (cooldown), then the legend (said once)."""
    out = ["## Verdict\n", j["head"] + "\n"]
    for g in j["groups"]:
        rows = [r for r in g["rows"] if r[1] != NM or r[2] != NM]
        out.append(f"### {g['title']}\n\n{g['summary']}\n" + (f"\n{_table(j['row_header'], rows, keep=len(rows[0]))}\n" if rows else ""))
    tail = ([j["trend"]] if j.get("trend") else []) + list(extra)
    if tail:
        out.append("\n".join(f"- {ln}" for ln in tail) + "\n")
    if j.get("legend"):
        out.append("**Legend.** " + " ".join(j["legend"]) + "\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- two domains (issue 31)
def _domain_call(d: dict) -> str:
    lo, hi = d["ci"]
    if lo is None or hi is None:
        return "no paired interval"
    return "real: the interval excludes 0" if hi < 0 or lo > 0 else "within noise: the interval holds 0"


def domain_answer_lines(result: dict, new: str, old: str) -> list[str]:
    """One line per measured model of a ``measure.domains.measure_targets`` result: the gain on the
    ``new`` slice (BPB(seed) - BPB(model), positive = better) and the retention on the ``old``
    slice (BPB(model) - BPB(seed), positive = forgetting), each with its paired 95% document-bootstrap
    interval and whether the change exceeds it (SPEC "Timings and intervals": real only beyond it)."""
    lines = []
    for r in result["records"]:
        sl = r["slices"]
        if new not in sl or old not in sl or "delta_bpb" not in sl[new]:
            continue
        g, k = sl[new]["delta_bpb"], sl[old]["delta_bpb"]
        neg = lambda ci: [None if c is None else -c for c in reversed(ci)]  # noqa: E731
        gain = {"value": -g["value"], "ci": neg(g["ci"])}
        f = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
        lines.append(f"- **{r['target']}**: gain on `{new}` {f(gain['value'])} BPB [{f(gain['ci'][0])}, {f(gain['ci'][1])}] "
                     f"({_domain_call(g)}); retention on `{old}` {f(k['value'])} BPB [{f(k['ci'][0])}, {f(k['ci'][1])}] "
                     f"({_domain_call(k)}; positive = forgetting)")
    return lines


def domain_markdown(result: dict, new: str, old: str) -> str:
    """``## Answer`` for a domain-adaptive trajectory, then the per-slice table (BPB, tokens/byte)."""
    ref = result.get("reference")
    head = ["## Answer", "", f"Against the seed `{ref['target']}` (paired over the same documents):" if ref else "No reference (--against): no deltas.", ""]
    head += domain_answer_lines(result, new, old)
    names = list(result["slices"])
    cols = ["model", "vocab"] + [f"{n} BPB" for n in names] + [f"{n} tokens/byte" for n in names]
    rows = []
    for r in ([ref] if ref else []) + result["records"]:
        sl = r["slices"]
        rows.append([r["target"], str(r.get("vocab_size", ""))] + [f"{sl[n]['bpb']:.4f}" for n in names]
                    + [f"{sl[n]['tokens_per_byte']:.4f}" for n in names])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(x) + " |" for x in rows]
    return "\n".join(head + ["", *table, ""])
