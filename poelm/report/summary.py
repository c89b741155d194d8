"""One measurement record as a few terminal lines (``poelm measure``); the record has everything."""

from __future__ import annotations

from poelm.report.sections import _cell, _x


def _f(x, d=6):
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(node, d=6):
    v, ci = node.get("value"), node.get("ci") or [None, None]
    if ci[0] is None:
        return _f(v, d)
    return f"{_f(v, d)} [{_f(ci[0], d)}, {_f(ci[1], d)}]"


def _cx(node) -> str:
    """A timed speedup ``1.23x [1.10x, 1.30x]`` (median [min, max] over the timing rounds)."""
    return _cell({"n": node}, "n", _x(2))


def format_summary(rec: dict) -> str:
    """A few lines for the terminal (the record has everything)."""
    K = rec["K"]
    L = [f"{rec.get('target') or 'model'}  step {rec.get('step')}  K={K} {rec['stage_layers']}  "
         f"{rec['split_tokens']:,} tokens ({rec['data']}), calib {rec['calib_tokens']:,}, {rec['device']} {rec['dtype']}, "
         f"{rec['elapsed_s']:.1f}s"]
    b = rec["bpb"]
    L.append(f"  BPB full K    {_ci(b['full'])}   (95% block-bootstrap interval)")
    L.append("  BPB single    " + "  ".join(f"s{k} {_f(x['value'])}" for k, x in enumerate(b["single"])))
    if b["prefix"]:
        L.append("  BPB prefix    " + "  ".join(f"K'={j + 1} {_f(x['value'])}" for j, x in enumerate(b["prefix"])))
    a = rec["acc"]
    L.append("  accuracy      " + "  ".join(f"s{k} {_f(x['value'], 4)}" for k, x in enumerate(a["single"])) + f"  full {_f(a['full']['value'], 4)}")
    sw = rec["alpha_sweep"]
    L.append("  alpha sweep   " + "  ".join(f"{al:g}: {_f(v)}" for al, v in zip(sw["alphas"], sw["bpb"])) + f"   crossover gap {_f(rec['crossover_gap'])}")
    if rec.get("wand"):
        L.append("  WAND p99      " + "  ".join(f"{s}->{s + 1} {v:.4f}" for s, v in enumerate(rec["wand"]["bounds"])))
    r = rec.get("routing")
    if r:
        sel = (f"cap met with no threshold (value {_f(r.get('value_tau0_calib'), 4)} at tau 0)" if r.get("cap_met_at_tau0") else
               f"tau {r['tau']:.4f} (value at tau 0: {_f(r.get('value_tau0_calib'), 4)}), routed {100 * r['fraction']:.2f}%, "
               f"projected {r['projected_speedup']:.3f}x")
        g = r.get("generation") or {}
        meas = f", measured {_cx(g['speedup'])} agreement {_f(g.get('agreement'), 4)}" if g.get("speedup") else ""
        L.append(f"  routing       {r['metric']} <= {r['cap']} ({r['confidence']}): {sel}{meas}, "
                 f"s0=full agreement {_f(r['agreement_s0_full'], 4)}")
    g = (rec.get("wand") or {}).get("generation")
    if g:
        L.append(f"  WAND decode   speedup {_cx(g['speedup'])}, agreement {_f(g['agreement'], 4)}, "
                 f"mean exit depth {_f(g['mean_depth'], 2)}, exit depths {g['depth_hist']}")
    s = rec.get("spec")
    if s:
        sp = s.get("speedup")
        sp = "n/a" if sp is None else (_cx(sp) if isinstance(sp, dict) else f"{sp:.2f}x")
        imp = f", implied {_cx(s['implied_speedup'])}" if isinstance(s.get("implied_speedup"), dict) else ""
        acc = _ci({"value": s["acceptance"], "ci": s.get("acceptance_ci")}, 4)
        ma = _ci({"value": s["mean_accepted"], "ci": s.get("mean_accepted_ci")}, 2)
        L.append(f"  speculative   m={s['m']} ({s['mode']}): acceptance {acc}, mean accepted {ma}/{s['m']}, speedup {sp}{imp}")
    g = rec.get("generation")
    if g:
        L.append(f"  generation    {g['prompts']} contexts of {g['context_tokens']} tokens from the measurement slice (seed {g['seed']}) "
                 f"x {g['new_tokens_per_prompt']} new tokens; intervals over prompts")
    t = rec.get("timing")
    if t:
        L.append(f"  timing        {t['prompts']} prompts x {t['new_tokens_per_prompt']} tokens x {t['repeats']} interleaved rounds, "
                 f"{t.get('interval', 'min-max over rounds')}; full K {t['ms_per_token']['full']:.2f} ms/token")
    p = rec.get("probe")
    if p:
        marks = " ".join(f"{x['name']} {'PASS' if x['pass'] else 'fail'}" for x in p["results"])
        words = f" ({p['words_matched']}/{p['words_total']} answer words)" if p.get("words_total") else ""
        L.append(f"  probe ({p['set']}) {p['passed']}/{p['total']}{words}: {marks}")
    ag = rec.get("against")
    if ag:
        d = ag["deltas"]
        noisy = [k for k, v in d.items() if v.get("inside_noise")]
        L.append(f"  vs {ag['target']}: dBPB full {_ci(d['bpb.full'])}, dacc full {_ci(d['acc.full'], 4)}; "
                 f"{len(d) - len(noisy)} of {len(d)} deltas outside noise")
    return "\n".join(L)
