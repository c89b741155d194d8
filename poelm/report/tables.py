"""The trajectory report: the card's tables, the verdict and the plots, from measurement records.

Input: one measurement record per checkpoint/branch (``poelm measure``; schema in
``docs/record.md``). Output: markdown that opens with the answer to the card's question and a
seed / best / newest table (``answer.py``), then the verdict grouped by kind of figure
(``judge.py``), then the reference card's table layout and column names
(branches, per-checkpoint val BPB, per-stage BPB, per-stage accuracy, self-speculative decoding,
confidence-aware routing, WAND p99 bounds, alpha sweep with crossover gap, sample-mode probe),
a table of deltas vs the seed with their 95% intervals, the verdict (``poelm.verdict``) and the
plots (``poelm.plots``). The same markdown is the model card README of every step branch and of
``main`` (``render_card``).

K, m, the routing metric and cap, the alphas and the probe prompts all come from the records. A
value's bootstrap interval, when the record has one, follows it in brackets; a missing
measurement renders "not measured". Number formats follow the card: BPB 6 decimals, accuracy
and acceptance 4, routing fraction as a percentage, speedups with "x".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from poelm.core.errors import PoelmError
from poelm.fsio import atomic_write_text
from poelm.trajectory import publish
from poelm.report.plots import make_plots
from poelm.report import benchmarks
from poelm.report import averages as averages_report
from poelm.report import cooldown as cooldown_report
from poelm.report import sections as S
from poelm.measure import record
from poelm.report.cells import NM, NO_THRESHOLD, cell, esc, table, times, tokens
from poelm.report.sections import cap_met_at_tau0, save_rows
from poelm.report.verdict import fmt_num, fmt_pct, fmt_signed
from poelm.report.judge import judge
from poelm.report.verdict import branch_name, delta_ci, get, phase_of, rel_step, seed_position, segment, sort_records, value
from poelm.report.answer import answer, answer_markdown, verdict_markdown
from poelm.report import judge as judge_mod


# ----------------------------------------------------------------------------- loading
def _records_in(path: Path, obj) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("records"), list):
        obj = obj["records"]
    items = obj if isinstance(obj, list) else [obj]
    for r in items:
        if not (isinstance(r, dict) and "schema" in r and isinstance(r.get("step"), int)):
            raise PoelmError(f"{path} is not a poelm measurement record (needs 'schema' and an integer 'step'); "
                             f"write it with `poelm measure`")
    return items


def _read_json(path: Path) -> list[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoelmError(f"cannot read measurement record {path}: {e}") from None
    return _records_in(path, obj)


def _is_git_repo(path: Path) -> bool:
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "refs").is_dir())


def load_records(source) -> list[dict]:
    """Measurement records, sorted by step, from ``source``:

    - a list/tuple of JSON files;
    - a JSON file (one record, a list of records, or ``{"records": [...]}``);
    - a git repository / ``hf://`` address (a trajectory repo): ``poelm.trajectory.publish.read_records``
      reads ``poelm_measure.json`` of every step branch;
    - a directory of ``*.json`` records, or of ``*/poelm_measure.json`` (a run directory).
    Two records for one step are an error (which one is meant is ambiguous)."""
    if isinstance(source, (list, tuple)):
        recs = [r for p in source for r in _read_json(Path(p))]
    else:
        path = Path(source)
        if path.is_file():
            recs = _read_json(path)
        elif path.is_dir():
            if _is_git_repo(path):
                recs = publish.read_records(source)
            else:
                files = sorted(path.glob("*.json")) or sorted(path.glob(f"*/{publish.MEASURE}"))
                if not files:
                    raise PoelmError(f"no measurement records (*.json or */{publish.MEASURE}) in {path}; run `poelm measure` first")
                recs = [r for p in files for r in _read_json(p)]
        elif "://" in str(source) or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(source)):
            # an address (hf://org/name) or a hub repo id "org/name" that is not a local path
            recs = publish.read_records(source)
        else:
            raise PoelmError(f"{source} does not exist; pass a directory of records, record files, or a trajectory repo")
    recs = record.canonical(recs)  # old spellings read as today's (record.LEGACY), missing keys null
    recs = averages_report.attach(recs)  # weight averages: a field of their newest averaged save
    recs = cooldown_report.attach(recs)  # probe records: a field of the save they start from
    steps = [int(r["step"]) for r in recs]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        raise PoelmError(f"two measurement records for step {dup[0]}; keep one per step")
    if not recs:
        raise PoelmError(f"no measurement records in {source}")
    return recs


# ----------------------------------------------------------------------------- cells
def _k(recs) -> int:
    return max((int(r.get("K") or 0) for r in recs), default=0)


def _alpha_label(a: float) -> str:
    s = "0" if a == 0 else (f"{a:.1f}" if float(a).is_integer() else f"{a:g}")
    extra = {0: " (geom-mean)", 0.5: " (Bayesian √K)", 1: " (pure sum / Log-OP)"}.get(a, "")
    return f"α={s}{extra}"


# ----------------------------------------------------------------------------- tables
def _position(rec, phase, is_seed) -> str:
    rel = rel_step(rec, phase)
    if rel is None:
        return "n/a"
    seg = segment(rel, phase)
    head = f"{'continual phase ' if is_seed else ''}rel_it = {rel:,}"
    if is_seed or seg is None:
        return head
    detail = {"warmup": "warmup", "peak": f"peak +{rel - phase.warmup:,}",
              "warmdown": f"warmdown +{rel - phase.warmdown_start:,}", "after": "after the phase end",
              "before": "before the phase"}[seg]
    return f"{head} ({detail})"


def _note(recs, i, seed_i, phase) -> str:
    rec, seed = recs[i], recs[seed_i]
    if i == seed_i:
        return "seed: the phase's start checkpoint; every delta is taken against it"
    parts = []
    if phase is not None and i > 0:
        prev_seg = segment(rel_step(recs[i - 1], phase), phase)
        seg = segment(rel_step(rec, phase), phase)
        if seg != prev_seg and seg in ("peak", "warmdown"):
            parts.append(f"first save {'after warmup' if seg == 'peak' else 'in the warmdown'}")
    ds = []
    for key, name, fmt in (("bpb.full", "BPB", fmt_signed(6)), ("acc.full", "acc", None), ("spec.acceptance", "α", None)):
        v, v0 = value(rec, key), value(seed, key)
        if v is not None and v0 is not None:
            ci = delta_ci(rec, seed, key) if key == "bpb.full" else None  # the paired interval vs the seed
            ds.append((f"{name} {fmt(v - v0)}" + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")) if fmt
                      else f"{name} {100 * (v - v0):+.2f}pp")
    if ds:
        parts.append("vs seed: " + " / ".join(ds))
    return "; ".join(parts) or "no shared measurement with the seed"


def _per_source(r: dict) -> str:
    """``alpha 1.2M · beta 0.8M``: tokens seen per mixture source up to this save."""
    return " · ".join(f"{esc(n)} {tokens(t)}" for n, t in (r.get("tokens_by_source") or {}).items()) or NM


def _sections(recs, main=False) -> list[tuple[str, str, str]]:
    """``(heading, description, table)`` for every card table."""
    seed_i, phase, K = seed_position(recs), phase_of(recs), _k(recs)
    keyed = lambda key, fmt: (lambda r: cell(r, key, fmt))  # noqa: E731
    split = _newest_value(recs, "split_tokens")
    out = []

    per_source = any(r.get("tokens_by_source") for r in recs)  # the branch manifests' provenance (train/provenance.py)
    rows = [[f"`{branch_name(r)}`", f"{int(r['step']):,}", _position(r, phase, i == seed_i),
             NM if r.get("lrm") is None else f"{r['lrm']:.4f}"] + ([_per_source(r)] if per_source else []) + [esc(_note(recs, i, seed_i, phase))]
            for i, r in enumerate(recs)]
    if main:
        rows.append(["main", "latest", "tracks newest published step", ""] + ([""] if per_source else []) + [f"currently `{branch_name(recs[-1])}`"])
    desc = "Every save is a `step-XXXXX` branch; `main` tracks the newest."
    if phase is not None:
        desc += (f" Phase {phase.name}: {phase.steps:,} steps from step {phase.start_step:,}, warmup {phase.warmup:,} "
                 f"(lrm 0 → {phase.peak:g}), peak until rel_it {phase.warmdown_start:,}, then warmdown to "
                 f"{phase.final:g} (warmdown_ratio {phase.warmdown_ratio:g}).")
    head = ["Branch", "Step", "Phase position", "lrm"] + (["Tokens per source"] if per_source else []) + ["Notes"]
    out.append(("Branches", desc, table(head, rows)))

    rel = lambda r: NM if rel_step(r, phase) is None else f"{rel_step(r, phase):,}"  # noqa: E731
    out.append(("Per-checkpoint val BPB",
                f"Same local val slice for every checkpoint ({tokens(split)}); full K={K} PoE aggregation.",
                table(["Branch", "Step", "Phase rel_it", "Training-log val BPB", f"Local-slice full K={K} BPB ({tokens(split)})"],
                       save_rows(recs, seed_i, [rel, keyed("train_val_bpb", fmt_num(6)), keyed("bpb.full", fmt_num(6))]))))
    out += [sec for sec in [cooldown_report.section(recs)] if sec]  # "BPB if annealed here", when probed
    out += [sec for sec in [averages_report.section(recs)] if sec]  # "BPB of the average of the last N saves"

    # Per-stage tables: values only, their 95% intervals summarised once (a width per table), so the
    # card's columns stay readable; every record holds each interval, the verdict the paired deltas.
    plain = lambda key, fmt: (lambda r: NM if value(r, key) is None else fmt(value(r, key)))  # noqa: E731
    keys = ["bpb.full"] + [f"bpb.single.{k}" for k in range(K)] + [f"bpb.prefix.{j}" for j in range(K - 1)]
    header = ["Branch", "Step", f"full K={K}"] + [f"single s{k}" for k in range(K)] + [f"prefix K'={j}" for j in range(1, K)]
    out.append(("Per-stage BPB", f"Training-objective BPB at each PoE stage boundary, on the same local val slice ({tokens(split)})"
                + _widths(recs, keys, 6) + ".", table(header, save_rows(recs, seed_i, [plain(k, fmt_num(6)) for k in keys]))))

    keys = [f"acc.single.{k}" for k in range(K)] + ["acc.full"]
    out.append(("Per-stage standalone target accuracy",
                f"Top-1 accuracy of each stage's standalone prediction vs the target token, same val slice ({tokens(split)})"
                + _widths(recs, keys, 4) + ".",
                table(["Branch", "Step"] + [f"s{k}" for k in range(K)] + ["full"], save_rows(recs, seed_i, [plain(k, fmt_num(4)) for k in keys]))))

    spec = S.newest(recs, "spec")
    m = spec.get("m", "m")
    cols = [keyed("spec.acceptance", fmt_num(4)), keyed("spec.mean_accepted", fmt_num(2)), keyed("spec.speedup", times(2))]
    out.append((f"Self-speculative decoding (m={m} stage-0 draft, full K={K} verify)",
                f"Greedy, mode {spec.get('mode', NM)}; acceptance α = accepted / proposed drafts, on {S.gen_words(recs)}; "
                f"speedup: full-K / speculative wall time ({S.timing_words(recs)}).",
                table(["Branch", "Step", "acceptance α", f"mean accepted / {m}", "end-to-end speedup"],
                       save_rows(recs, seed_i, cols))))

    routes = [r["routing"] for r in recs if isinstance(r.get("routing"), dict)]
    kinds = sorted({(str(x.get("metric")), x.get("cap")) for x in routes}, key=str)
    label = " / ".join(f"{mt} cap = {cap:.3f}" if isinstance(cap, (int, float)) else f"{mt} cap = ?" for mt, cap in kinds)
    conf = sorted({str(x.get("confidence")) for x in routes})
    cols = [lambda r: NO_THRESHOLD if cap_met_at_tau0(r) else cell(r, "routing.fraction", fmt_pct),
            lambda r: "—" if cap_met_at_tau0(r) else cell(r, "routing.projected_speedup", times(3)),
            keyed("routing.agreement_s0_full", fmt_num(4))]
    out.append((f"Confidence-aware routing ({label or NM})",
                f"A position goes to stage 0 alone when its stage-0 confidence ({', '.join(conf) or NM}) ≥ τ (\"Routing "
                f"calibration\" below); fraction routed on the {tokens(split)} measurement slice; projected speedup: a FLOP "
                f"projection; s0=full agreement: positions where argmax(stage 0) = argmax(full K).",
                table(["Branch", "Step", "fraction routed to stage 0", "projected speedup", "base s0=full agreement"],
                       save_rows(recs, seed_i, cols))))

    calib = S.newest(recs, "wand").get("calib_tokens")
    cols = [keyed(f"wand.bounds.{s}", fmt_num(4)) for s in range(K - 1)]
    out.append(("WAND p99 bounds (cumulative-PoE delta range, constant-shift invariant)",
                f"Calibrated on a {tokens(calib)} val slice using range(delta) = max(delta) − min(delta); each "
                f"branch's config.json carries its own bounds in poe_wand_p99_bounds_per_stage_head.",
                table(["Branch", "Step"] + [f"bound {s} → {s + 1}" for s in range(K - 1)], save_rows(recs, seed_i, cols))))

    alphas = list(S.newest(recs, "alpha_sweep").get("alphas") or [])
    cols = [(lambda a: lambda r: _sweep_cell(r, a))(a) for a in alphas] + [keyed("crossover_gap", fmt_signed(6))]
    out.append(("Bayesian PoE α-sweep (renormed BPB)",
                "α=0 is the geometric-mean PoE aggregate; α=1 the pure sum (log opinion pool). Crossover gap = "
                f"BPB(full K, α=0) − BPB(single s{K - 1}); on the same local val slice ({tokens(split)}).",
                table(["Branch", "Step"] + [_alpha_label(a) for a in alphas] + [f"crossover gap (α=0 vs single s{K - 1})"],
                       save_rows(recs, seed_i, cols))))

    out.append(S.routing_calibration_section(recs, seed_i, split, _newest_value(recs, "calib_tokens")))
    out.append(S.wand_generation_section(recs, seed_i, K, split))
    out.append(S.spec_timing_section(recs, seed_i))
    out += _probe_sections(recs, seed_i, K)
    out += benchmarks.sections(recs)  # poelm eval's scores; none when no record has them
    return [sec for sec in out if sec[2] is not None]  # a table with nothing measured is left out


def _widths(recs, keys, d: int) -> str:
    """"; 95% intervals ±a–b" over every value interval of ``keys`` in ``recs`` (half widths)."""
    hw = [(ci[1] - ci[0]) / 2 for r in recs for k in keys if (ci := get(r, k)[1]) is not None]
    if not hw:
        return ""
    lo, hi = min(hw), max(hw)
    return f"; 95% block-bootstrap intervals ±{lo:.{d}f}" + (f"–{hi:.{d}f}" if f"{hi:.{d}f}" != f"{lo:.{d}f}" else "") + " (in each record)"


def _newest_value(recs, key):
    for r in reversed(recs):
        if r.get(key) is not None:
            return r[key]
    return None


def _sweep_cell(rec, a) -> str:
    sw = rec.get("alpha_sweep")
    if not isinstance(sw, dict):
        return NM
    for x, b in zip(sw.get("alphas") or [], sw.get("bpb") or []):
        if x == a and isinstance(b, (int, float)):
            return f"{b:.6f}"
    return NM


APPENDIX = "Appendix: "


def _probe_sections(recs, seed_i, K) -> list[tuple[str, str, str]]:
    """The probe tables; while no save passes any prompt, one line instead (the per-prompt
    continuations stay in each record's ``probe.results``)."""
    probes = [(r, r["probe"]) for r in recs if isinstance(r.get("probe"), dict)]
    if not probes:
        return []
    if any(p.get("passed") for _, p in probes):
        return [_probe_section(recs, seed_i, K), S.probe_grid_section(recs, seed_i)]
    p0 = probes[-1][1]
    words = [f"`{branch_name(r)}` {p['words_matched']}/{p['words_total']}" for r, p in probes if p.get("words_total")]
    line = (f"No save passes any of the {p0.get('total', '?')} prompts of set '{p0.get('set', NM)}' (greedy full K, "
            f"{p0.get('max_new_tokens', '?')} new tokens, graded on the start of the continuation)"
            + (f"; answer words matched: {', '.join(words)}" if words else "")
            + ". The continuations are in each record's `probe.results`.")
    return [("Sample-mode probe", line, "")]


def _probe_section(recs, seed_i, K):
    probes = [r["probe"] for r in recs if isinstance(r.get("probe"), dict)]
    names = []
    for p in probes:
        for res in p.get("results") or []:
            if res.get("name") not in names:
                names.append(res.get("name"))
    p0 = probes[-1] if probes else {}

    def cols_for(r):
        p = r.get("probe")
        if not isinstance(p, dict):
            return [NM] * len(names) + [NM]
        by = {x.get("name"): x for x in p.get("results") or []}
        cells = [NM if n not in by else f"{'✓' if by[n].get('pass') else '✗'} {esc(by[n].get('graded', by[n].get('continuation', '')))}"
                 for n in names]
        words = f"; {p['words_matched']}/{p['words_total']} answer words" if p.get("words_total") else ""
        return cells + [f"{p.get('passed', NM)}/{p.get('total', NM)} passed{words}"]

    rows = [[f"`{branch_name(r)}`" + (" (seed)" if i == seed_i else ""), f"{int(r['step']):,}"] + cols_for(r)
            for i, r in enumerate(recs)]
    total = p0.get("total", len(names))
    head = (f"Sample-mode probe (full K={K}, greedy, {p0.get('max_new_tokens', '?')} tokens, {total}-prompt set "
            f"'{p0.get('set', NM)}')")
    desc = "✓ / ✗: the graded start of the continuation gives / does not give the prompt's expected answer."
    return head, desc, table(["Branch", "Step"] + [esc(n) for n in names] + ["Note"], rows)


def verdict(records) -> list[str]:
    """What ``poelm report`` prints: the answer's lines first, then the verdict's
    (``judge.verdict``: per kind, its summary and one sentence per figure)."""
    recs = sort_records(records)
    j = judge(recs)
    return [ln.replace("**", "") for ln in answer(recs, j)["lines"]] + judge_mod.verdict(recs)


def build_tables(records) -> str:
    """All card tables (and the deltas table) as markdown, one ``###`` section each."""
    recs = sort_records(records)
    if not recs:
        return "_No measurement records._\n"
    return "\n\n".join(f"### {h}\n\n{d}" + (f"\n\n{t}" if t else "") for h, d, t in _sections(recs)) + "\n"


# ----------------------------------------------------------------------------- card / report
def update_cards(repo, branches=None) -> list[str]:
    """Make the report the model card (README.md) of trajectory branches: each branch gets the
    tables and verdict over the records up to its own step, the newest (``main``) the whole
    trajectory. ``branches`` None = every measured branch; the newest is always refreshed, since
    a newly measured earlier branch changes its tables. Returns the branches updated."""
    records = sort_records(record.canonical(publish.read_records(repo)))
    if not records:
        return []
    newest = records[-1].get("branch")
    wanted = set(branches) if branches is not None else {r.get("branch") for r in records}
    wanted.add(newest)
    done = []
    for rec in records:
        b = rec.get("branch")
        if b not in wanted:
            continue
        card = render_card(records, upto_step=int(rec["step"]), main=b == newest)
        publish.update_branch_files(repo, b, {"README.md": card.encode("utf-8")})
        done.append(b)
    return done


def render_card(records, *, title: str | None = None, repo_id: str | None = None, upto_step: int | None = None,
                main: bool = False, plots: dict | None = None, front_matter: bool = True) -> str:
    """The model card README (markdown) of a branch: tables and verdict over the records up to its step.

    ``upto_step`` drops later records (pass the branch's step; None keeps all); ``main`` adds the
    ``main`` row; ``plots`` maps a caption to an image path relative to the README."""
    recs = sort_records(records)
    if upto_step is not None:
        recs = [r for r in recs if int(r["step"]) <= upto_step]
    if not recs:
        raise PoelmError(f"no measurement records up to step {upto_step}; measure the branch first")
    last = recs[-1]
    title = title or (repo_id.split("/")[-1] if repo_id else "PoE per-stage-head model: trajectory")
    out = []
    if front_matter:
        out.append("---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
                   "tags:\n- poelm\n- product-of-experts\n- trajectory\n---\n")
    K, layers = _k(recs), last.get("stage_layers")
    intro = (f"Product-of-Experts per-stage-head language model, K={K} stages"
             + (f" (stage_layers = {tuple(layers)})" if layers else "") + ". "
             + ("`main` tracks " if main else "Newest save: ") + f"branch `{branch_name(last)}` (step "
             f"{int(last['step']):,}); the tables cover the {len(recs)} measured save(s) up to that step.")
    out.append(f"# {title}\n\n{intro}\n")
    j = judge(recs)
    out.append(answer_markdown(recs, j))  # the card's question answered first (issue 22)
    if repo_id:
        rev = "main" if main else branch_name(last)
        out.append("## Inference\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                   f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", revision=\"{rev}\", trust_remote_code=True)\n"
                   f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\", revision=\"{rev}\", trust_remote_code=True)\n"
                   "```\n\nPrepend the BOS token to a prompt; any `step-XXXXX` branch loads the same way.\n")
    secs = _sections(recs, main=main)
    appendix = [sec for sec in secs if sec[0].startswith(APPENDIX)]
    secs = [sec for sec in secs if not sec[0].startswith(APPENDIX)]
    out.append(verdict_markdown(j, cooldown_report.verdict_lines(recs) + averages_report.verdict_lines(recs)))
    out.append("## " + secs[0][0] + "\n\n" + secs[0][1] + "\n\n" + secs[0][2] + "\n")
    out.append("## Trajectory measurements\n")
    out += [f"### {h}\n\n{d}\n\n{t}\n" if t else f"### {h}\n\n{d}\n" for h, d, t in secs[1:]]
    if plots:
        out.append("## Plots\n\n" + "\n\n".join(f"![{cap}]({path})" for cap, path in plots.items()) + "\n")
    if appendix:
        out.append("## Appendix\n")
        out += [f"### {h}\n\n{d}\n\n{t}\n" for h, d, t in appendix]
    return "\n".join(out)


def write_report(records, out_dir) -> dict:
    """Write ``report.md`` (tables, verdict, plot links) and the PNGs into ``out_dir``, atomically.

    Returns ``{"report": Path, <plot name>: Path, ...}``."""
    recs = sort_records(records)
    if not recs:
        raise PoelmError("no measurement records to report; run `poelm measure` first")
    out_dir = Path(out_dir)
    pngs = make_plots(recs, out_dir) + benchmarks.make_plots(recs, out_dir)
    captions = {benchmarks.PLOT: benchmarks.CAPTION, "bpb_vs_step": "BPB per stage vs step with the LR multiplier",
                "spec_routing_vs_step": "Spec acceptance and routing fraction vs step",
                "wand_vs_step": "WAND p99 bounds vs step", "alpha_sweep": "Alpha sweep: seed and newest"}
    plots = {captions.get(p.stem, p.stem): p.name for p in pngs}
    text = render_card(recs, title="Trajectory report", main=False, plots=plots, front_matter=False)
    report = out_dir / "report.md"
    atomic_write_text(report, text)
    return {"report": report, **{p.stem: p for p in pngs}}
