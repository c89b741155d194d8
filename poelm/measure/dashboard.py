"""A measurement record on a dashboard: the card's per-branch metrics at the branch's step.

``card_scalars`` picks the figures the card and the trajectory report show (definitions in
``docs/record.md``) and names them ``measure/...``; ``log_measurement`` logs them into the run
that saved the branch (``poelm.track.measurement_run``), so W&B / TensorBoard / trackio show the
trajectory's metrics next to its training curves, at the same steps.
"""

from __future__ import annotations

from poelm import track


def _value(node):
    """A figure with interval or a timed figure (``{"value": ...}``), or a plain number."""
    if isinstance(node, dict):
        node = node.get("value")
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def card_scalars(rec: dict) -> dict:
    """``measure/...`` -> number for BPB full / single / prefix, accuracy, the alpha sweep and the
    crossover gap, WAND bounds and exits, routing, speculative acceptance and speedups, the
    sample probe, the delta of full-K BPB against the reference, and every benchmark score."""
    out = {}

    def put(key, node):
        v = _value(node)
        if v is not None:
            out[f"measure/{key}"] = v

    bpb, acc = rec.get("bpb") or {}, rec.get("acc") or {}
    put("bpb/full", bpb.get("full"))
    for k, n in enumerate(bpb.get("single") or []):
        put(f"bpb/single/{k}", n)
    for j, n in enumerate(bpb.get("prefix") or []):
        put(f"bpb/prefix/{j + 1}", n)  # K' = j + 1 stages
    put("acc/full", acc.get("full"))
    for k, n in enumerate(acc.get("single") or []):
        put(f"acc/single/{k}", n)
    sweep = rec.get("alpha_sweep") or {}
    for a, v in zip(sweep.get("alphas") or [], sweep.get("bpb") or []):
        put(f"alpha_sweep/bpb/{a:g}", v)
    put("crossover_gap", rec.get("crossover_gap"))
    wand = rec.get("wand") or {}
    for s, b in enumerate(wand.get("bounds") or []):
        put(f"wand/bound/{s}", b)
    ex = wand.get("exit") or {}
    for k, f in enumerate(ex.get("fraction_per_stage") or []):
        put(f"wand/exit_fraction/{k}", f)
    put("wand/exit_agreement", ex.get("agreement"))
    put("wand/generation_speedup", (wand.get("generation") or {}).get("speedup"))
    r = rec.get("routing") or {}
    for key in ("fraction", "tau", "value", "projected_speedup", "agreement_s0_full"):
        put(f"routing/{key}", r.get(key))
    put("routing/generation_speedup", (r.get("generation") or {}).get("speedup"))
    sp = rec.get("spec") or {}
    for key in ("acceptance", "mean_accepted", "speedup", "implied_speedup"):
        put(f"spec/{key}", sp.get(key))
    probe = rec.get("probe") or {}
    if isinstance(probe.get("passed"), int) and probe.get("total"):
        put("probe/pass_rate", probe["passed"] / probe["total"])
    deltas = (rec.get("against") or {}).get("deltas") or {}
    put("delta_vs_ref/bpb_full", deltas.get("bpb.full"))
    for b in rec.get("benchmarks") or []:
        if isinstance(b, dict) and b.get("task") and b.get("metric"):
            stages = b.get("stages") or "full"
            put(f"benchmarks/{b['task']}/{b['metric']}" + ("" if stages == "full" else f"/{stages}"), b.get("value"))
    return out


def log_measurement(rec: dict, names, opts: dict | None = None) -> dict:
    """Log ``card_scalars(rec)`` at the record's step into its run (``rec["tracking"]``, set by
    ``measure_target`` from the checkpoint or branch). Returns what was logged. Never raises for
    a backend (``track.Run``)."""
    step = rec.get("step")
    metrics = card_scalars(rec)
    run = track.measurement_run(names, rec, rec.get("tracking"), opts=opts)
    if run is None:
        return {}
    try:
        if step is not None and metrics:
            run.log(metrics, int(step))
    finally:
        run.finish()
    return metrics
