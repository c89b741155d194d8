"""One measurement record as a few terminal lines (``poelm measure``); the record has everything."""

from __future__ import annotations

from poelm.measure import record
from poelm.measure.record import Figure
from poelm.report.cells import ci_cell, times


def _f(x, d=6):
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(v, ci=None, d=6):
    """``v [lo, hi]`` (a ``Figure`` for ``v`` brings its own interval)."""
    if isinstance(v, Figure):
        v, ci = v.value, v.ci
    if not ci or ci[0] is None:
        return _f(v, d)
    return f"{_f(v, d)} [{_f(ci[0], d)}, {_f(ci[1], d)}]"


def _cx(node) -> str:
    """A timed speedup ``1.23x [1.10x, 1.30x]`` (a timed figure: ``{value, ci, repeats}``)."""
    return ci_cell(*record.figure({"n": node}, "n"), times(2))


def format_summary(rec) -> str:
    """A few lines for the terminal (the record has everything); ``rec``: a record, typed or its JSON."""
    r = record.load(rec)
    K = r.K
    L = [f"{r.target or 'model'}  step {r.step}  K={K} {r.stage_layers}  "
         f"{r.split_tokens:,} tokens ({r.data}), calib {r.calib_tokens:,}, {r.device} {r.dtype}, {r.elapsed_s:.1f}s"]
    b = r.bpb
    L.append(f"  BPB full K    {_ci(b.full)}   (95% block-bootstrap interval)")
    L.append("  BPB single    " + "  ".join(f"s{k} {_f(x.value)}" for k, x in enumerate(b.single)))
    if b.prefix:
        L.append("  BPB prefix    " + "  ".join(f"K'={j + 1} {_f(x.value)}" for j, x in enumerate(b.prefix)))
    a = r.acc
    L.append("  accuracy      " + "  ".join(f"s{k} {_f(x.value, 4)}" for k, x in enumerate(a.single)) + f"  full {_f(a.full.value, 4)}")
    sw = r.alpha_sweep
    L.append("  alpha sweep   " + "  ".join(f"{al:g}: {_f(v)}" for al, v in zip(sw.alphas, sw.bpb)) + f"   crossover gap {_f(r.crossover_gap)}")
    if r.wand:
        L.append("  WAND p99      " + "  ".join(f"{s}->{s + 1} {v:.4f}" for s, v in enumerate(r.wand.bounds)))
    rt = r.routing
    if rt:
        sel = (f"cap met with no threshold (value {_f(rt.value_tau0_calib, 4)} at tau 0)" if rt.cap_met_at_tau0 else
               f"tau {_f(rt.tau, 4)} (value at tau 0: {_f(rt.value_tau0_calib, 4)}), "
               f"routed {_f(None if rt.fraction is None else 100 * rt.fraction, 2)}%, projected {_f(rt.projected_speedup, 3)}x")
        g = rt.generation
        meas = f", measured {_cx(g.speedup)} agreement {_f(g.agreement, 4)}" if g and g.speedup else ""
        L.append(f"  routing       {rt.metric} <= {rt.cap} ({rt.confidence}): {sel}{meas}, "
                 f"s0=full agreement {_f(rt.agreement_s0_full, 4)}")
    g = r.wand.generation if r.wand else None
    if g:
        L.append(f"  WAND decode   speedup {_cx(g.speedup)}, agreement {_f(g.agreement, 4)}, "
                 f"mean exit depth {_f(g.mean_depth, 2)}, exit depths {g.depth_hist}")
    s = r.spec
    if s:
        sp = s.speedup
        sp = "n/a" if sp is None else (_cx(sp) if isinstance(sp, dict) else f"{sp:.2f}x")
        imp = f", implied {_cx(s.implied_speedup)}" if isinstance(s.implied_speedup, dict) else ""
        L.append(f"  speculative   m={s.m} ({s.mode}): acceptance {_ci(s.acceptance, s.acceptance_ci, 4)}, "
                 f"mean accepted {_ci(s.mean_accepted, s.mean_accepted_ci, 2)}/{s.m}, speedup {sp}{imp}")
    gen = r.generation
    if gen:
        L.append(f"  generation    {gen.prompts} contexts of {gen.context_tokens} tokens from the measurement slice (seed {gen.seed}) "
                 f"x {gen.new_tokens_per_prompt} new tokens; intervals over prompts")
    t = r.timing
    if t:
        L.append(f"  timing        {t.prompts} prompts x {t.new_tokens_per_prompt} tokens x {t.repeats} interleaved rounds, "
                 f"{t.interval or 'min-max over rounds'}; full K {_f(t.get('ms_per_token.full'), 2)} ms/token")
    p = r.probe
    if p:
        marks = " ".join(f"{x['name']} {'PASS' if x['pass'] else 'fail'}" for x in p.results)
        words = f" ({p.words_matched}/{p.words_total} answer words)" if p.words_total else ""
        L.append(f"  probe ({p.set}) {p.passed}/{p.total}{words}: {marks}")
    ag = r.against
    if ag:
        d = ag.deltas
        noisy = [k for k, v in d.items() if v.get("inside_noise")]
        L.append(f"  vs {ag.target}: dBPB full {_ci(Figure.from_dict(d['bpb.full']))}, dacc full {_ci(Figure.from_dict(d['acc.full']), d=4)}; "
                 f"{len(d) - len(noisy)} of {len(d)} deltas outside noise")
    return "\n".join(L)
