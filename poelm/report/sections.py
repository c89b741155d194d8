"""Table cells and the report sections beyond the card's own tables.

The card's tables (``tables.py``) keep the card's columns so that a poelm trajectory reads like the
card. What a reader needs to audit those numbers sits in the sections here, one function each,
returning ``(heading, description, markdown table)`` like the card's:

- routing calibration: the metric, tau, the metric's value at tau = 0 ("cap met with no
  threshold" when it is already within the cap), the routed fraction, the FLOP projection and the
  measured route speedup;
- WAND adaptive depth in generation: exit agreement on the slice, greedy agreement with full K on
  the probe prompts, measured speedup, mean exit depth and the exit-depth histogram;
- speculative decoding timing: the measured speedup with its interval, the speedup implied by
  the measured acceptance and stage costs, the acceptance histogram;
- probe grades per prompt: pass/fail of every prompt across branches.

Every description says on what its figures were measured (slice sizes, prompts, tokens, rounds).
An interval follows its value in brackets; a missing measurement renders "not measured".
"""

from __future__ import annotations

from poelm.measure.record import lookup
from poelm.report.cells import NM, NO_THRESHOLD, cell, esc, table, times, tokens
from poelm.report.verdict import branch_name, get

def save_rows(recs, seed_i, cols):
    """One row per record: branch, step, then ``cols`` (functions of the record)."""
    out = []
    for i, r in enumerate(recs):
        name = f"`{branch_name(r)}`" + (" (seed)" if i == seed_i else "")
        out.append([name, f"{int(r['step']):,}"] + [c(r) for c in cols])
    return out


def _key_rows(recs, seed_i, cols):
    """Rows of the seed, the best save (lowest full-K BPB) and the newest only: the audit sections'
    detail is in every record, the trajectory of the headline figures in the card's tables."""
    pts = [(v, i) for i, r in enumerate(recs) if i != seed_i and (v := get(r, "bpb.full")[0]) is not None]
    keep = {seed_i, len(recs) - 1} | ({min(pts)[1]} if pts else set())
    best = min(pts)[1] if pts else None
    out = []
    for i in sorted(keep):
        r = recs[i]
        role = " (seed)" if i == seed_i else " (best)" if i == best and i != len(recs) - 1 else ""
        out.append([f"`{branch_name(r)}`{role}", f"{int(r['step']):,}"] + [c(r) for c in cols])
    return out


KEY_ROWS = "Seed, best (lowest full-K BPB) and newest save; every record holds the same for each save. "


def newest(recs, path: str) -> dict:
    """The newest record's JSON object at dotted ``path`` (``{}`` when none has one)."""
    for r in reversed(recs):
        node = lookup(r, path)
        if isinstance(node, dict):
            return node
    return {}


def cap_met_at_tau0(rec) -> bool:
    return bool(lookup(rec, "routing.cap_met_at_tau0"))


def timing_words(recs) -> str:
    t = newest(recs, "timing")
    if not t:
        return "timing not measured"
    if "crossed" not in str(t.get("interval")):  # records before issue 22: the probe's first prompts, [min, max] over rounds
        return (f"{t.get('prompts', '?')} probe prompts × {t.get('new_tokens_per_prompt', '?')} new tokens, "
                f"median [min, max] of {t.get('repeats', '?')} rounds")
    return (f"{t.get('prompts', '?')} prompts of the generation set × {t.get('new_tokens_per_prompt', '?')} new tokens × "
            f"{t.get('repeats', '?')} interleaved rounds, 95% interval over rounds and prompts")


def gen_words(recs) -> str:
    """On what the untimed generation figures were measured."""
    g = newest(recs, "generation")
    if not g:
        return "the probe prompts"
    return (f"the generation set: {g.get('prompts', '?')} contexts of {g.get('context_tokens', '?')} tokens cut from the "
            f"measurement slice (seed {g.get('seed', '?')}) × {g.get('new_tokens_per_prompt', '?')} greedy new tokens, "
            f"95% interval over prompts")


def _hist(rec, key) -> str:
    node = lookup(rec, key)
    if not isinstance(node, list) or not node:
        return NM
    return " / ".join(str(int(x)) for x in node)


# ----------------------------------------------------------------------------- sections
def routing_calibration_section(recs, seed_i, split, calib):
    def tau(r):
        if cap_met_at_tau0(r):
            return f"0 ({NO_THRESHOLD})"
        return cell(r, "routing.tau", lambda v: f"{v:.4f}")

    def measured(r):
        if cap_met_at_tau0(r):
            return "not timed (no threshold)"
        return cell(r, "routing.generation.speedup", times(2))

    rt = newest(recs, "routing")
    cols = [tau, lambda r: cell(r, "routing.value_tau0_calib", lambda v: f"{v:.4f}"),
            lambda r: cell(r, "routing.value", lambda v: f"{v:.4f}"), measured,
            lambda r: cell(r, "routing.generation.agreement", lambda v: f"{v:.4f}")]
    desc = (f"Metric: {rt.get('metric', NM)} ≤ {rt.get('cap', '?')} ({rt.get('confidence', '?')} confidence). τ: the lowest threshold "
            f"within the cap on the {tokens(calib)} calibration slice; at τ = 0 the metric says whether a threshold was needed at "
            f"all; at τ it is held out, on the {tokens(split)} measurement slice. Measured: full-K / route wall time "
            f"({timing_words(recs)}), exact KV catch-up included. Agreement with full: on {gen_words(recs)}.")
    header = ["Branch", "Step", "τ", "metric at τ = 0 (calib)", "metric at τ (held out)", "measured route speedup", "route agreement with full"]
    return "Routing calibration and measured route speedup", KEY_ROWS + desc, table(header, _key_rows(recs, seed_i, cols))


def wand_generation_section(recs, seed_i, K, split):
    cols = [lambda r: cell(r, "wand.exit.agreement", lambda v: f"{v:.4f}"),
            lambda r: cell(r, "wand.generation.agreement", lambda v: f"{v:.4f}"),
            lambda r: _identical(r, "wand.generation"),
            lambda r: cell(r, "wand.generation.speedup", times(2)),
            lambda r: cell(r, "wand.generation.mean_depth", lambda v: f"{v:.2f}"),
            lambda r: _hist(r, "wand.generation.depth_hist")]
    desc = (f"Adaptive depth with each branch's own p99 bounds. Exit agreement: teacher-forced on the {tokens(split)} measurement "
            f"slice. Greedy agreement, identical continuations, mean exit depth (1..{K}) and the depth histogram: WAND vs full-K "
            f"greedy on {gen_words(recs)}. Measured speedup: {timing_words(recs)}.")
    header = ["Branch", "Step", "exit agreement (slice)", "greedy agreement with full", "identical continuations",
              "measured speedup", "mean exit depth", f"exit-depth histogram (1 … {K})"]
    return "WAND adaptive depth in generation", KEY_ROWS + desc, table(header, _key_rows(recs, seed_i, cols))


def _identical(rec, key) -> str:
    node = lookup(rec, key)
    if not isinstance(node, dict) or node.get("identical") is None:
        return NM
    return f"{node['identical']}/{node.get('prompts', '?')}"


def spec_timing_section(recs, seed_i):
    m = newest(recs, "spec").get("m", "m")
    cols = [lambda r: cell(r, "spec.implied_speedup", times(2)),
            lambda r: cell(r, "spec.c0_time", lambda v: f"{v:.3f}"), lambda r: _hist(r, "spec.accept_hist"),
            lambda r: cell(r, "timing.ms_per_token.full", lambda v: f"{v:.2f}"),
            lambda r: _identical({"s": {"identical": lookup(r, "spec.identical_outputs"), "prompts": lookup(r, "spec.prompts")}}, "s")]
    desc = (f"Measured speedup: the card's table above ({timing_words(recs)}). Implied speedup = N / (P + (proposed + "
            f"rounds)·c + rounds·(1 − c)) from the exact acceptance and the measured stage-0 time share c. Acceptance histogram: "
            f"rounds of the timed prompts that accepted 0 / 1 / ... / {m} drafts. Identical: speculative output equal to full-K greedy.")
    header = ["Branch", "Step", "implied speedup", "stage-0 time share c", f"acceptance histogram (0 … {m})",
              "full K ms / token", "identical to full"]
    return "Speculative decoding timing and acceptance", KEY_ROWS + desc, table(header, _key_rows(recs, seed_i, cols))


def probe_grid_section(recs, seed_i):
    names, expected = [], {}
    for r in recs:
        for res in lookup(r, "probe.results", []):
            n = res.get("name")
            if n not in names:
                names.append(n)
                expected[n] = res.get("answer") or " · ".join(res.get("expect") or [])
    header = ["Prompt", "expected start"] + [f"`{branch_name(r)}`" + (" (seed)" if i == seed_i else "") for i, r in enumerate(recs)]

    def grade(r, n):
        p = r.get("probe")
        if not isinstance(p, dict):
            return NM
        by = {res.get("name"): res for res in p.get("results") or []}
        if n not in by:
            return NM
        res = by[n]
        mark = "✓" if res.get("pass") else "✗"
        return mark + (f" {res['matched_words']}/{res['answer_words']} words" if res.get("answer_words") else "")

    rows = [[esc(n), esc(expected[n])] + [grade(r, n) for r in recs] for n in names]

    def total(r):
        p = r.get("probe")
        if not isinstance(p, dict):
            return NM
        words = f"; {p['words_matched']}/{p['words_total']} words" if p.get("words_total") else ""
        return f"{p.get('passed', '?')}/{p.get('total', '?')} passed{words}"

    rows.append(["**total**", ""] + [total(r) for r in recs])
    p0 = newest(recs, "probe")
    desc = ("Per-prompt grade across branches. " + (p0.get("grading") or "A prompt passes when its continuation meets its rubric.")
            + "; k/n words: the continuation's first words that equal the expected answer's. "
            + f"Greedy full K, {p0.get('max_new_tokens', '?')} new tokens per prompt, prompt set '{p0.get('set', NM)}'.")
    return "Probe grades per prompt", desc, table(header, rows)
