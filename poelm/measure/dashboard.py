"""A measurement record on a dashboard: the card's per-branch metrics at the branch's step.

``card_scalars`` picks the figures the card and the trajectory report show (definitions in
``docs/record.md``) and names them ``measure/...``; ``log_measurement`` logs them into the run
that saved the branch (``poelm.track.measurement_run``), so W&B / TensorBoard / trackio show the
trajectory's metrics next to its training curves, at the same steps.
"""

from __future__ import annotations

from poelm import track
from poelm.measure import record
from poelm.measure.record import Figure


def _value(node):
    """A figure with interval or a timed figure (``{"value": ...}``), or a plain number."""
    if isinstance(node, Figure):
        node = node.value
    elif isinstance(node, dict):
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

    r = record.load(rec)
    for key, node in (("bpb/full", r.bpb and r.bpb.full), ("acc/full", r.acc and r.acc.full), ("crossover_gap", r.crossover_gap)):
        put(key, node)
    for k, n in enumerate(r.bpb.single if r.bpb else []):
        put(f"bpb/single/{k}", n)
    for j, n in enumerate(r.bpb.prefix if r.bpb else []):
        put(f"bpb/prefix/{j + 1}", n)  # K' = j + 1 stages
    for k, n in enumerate(r.acc.single if r.acc else []):
        put(f"acc/single/{k}", n)
    if r.alpha_sweep:
        for a, v in zip(r.alpha_sweep.alphas, r.alpha_sweep.bpb):
            put(f"alpha_sweep/bpb/{a:g}", v)
    if r.wand:
        for s, b in enumerate(r.wand.bounds):
            put(f"wand/bound/{s}", b)
        for k, f in enumerate(r.wand.exit.fraction_per_stage if r.wand.exit else []):
            put(f"wand/exit_fraction/{k}", f)
    put("wand/exit_agreement", r.get("wand.exit.agreement"))
    put("wand/generation_speedup", r.get("wand.generation.speedup"))
    for key in ("fraction", "tau", "value", "projected_speedup", "agreement_s0_full"):
        put(f"routing/{key}", r.get(f"routing.{key}"))
    put("routing/generation_speedup", r.get("routing.generation.speedup"))
    for key in ("acceptance", "mean_accepted", "speedup", "implied_speedup"):
        put(f"spec/{key}", r.get(f"spec.{key}"))
    if r.probe and isinstance(r.probe.passed, int) and r.probe.total:
        put("probe/pass_rate", r.probe.passed / r.probe.total)
    put("delta_vs_ref/bpb_full", r.against.deltas.get("bpb.full") if r.against else None)
    for b in r.benchmarks or []:
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
