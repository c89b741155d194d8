"""``poelm demo``: the whole pipeline on the embedded default, on a laptop CPU, in minutes.

1. train the byte-level BPE on the embedded corpus's training split;
2. a base phase with a full warmup / hold / warmdown cycle (``configs/embedded.toml``);
3. a continual phase with the card's B2 shape (half peak, warmdown 55%, final 0) anchored at the
   base phase's last step, saving every ``save_every`` steps; every save, the seed first, is
   published as a ``step-XXXXX`` branch of a local git repository (``main`` = newest), the seed
   with its training state (``--with-optimizer``: continuable exactly from the branch); the phase
   runs with the spike guard (``train.skip_spikes``) and reports how many updates it skipped;
4. every branch is measured (BPB per stage / prefix, accuracy, alpha sweep, WAND bounds written
   into its config.json, routing, self-speculative decoding, sample probe) against the seed;
5. two peak-phase saves get a short cooldown probe (``poelm.train.cooldown``: the LR decays to 0
   over ~10% of the phase), published as ``cooldown-XXXXX-N`` branches and measured against the
   seed: "what would BPB be if we annealed here?" (``_cooldown_probes``);
6. the trajectory report (tables, plots, verdict) is written and becomes ``main``'s model card.

Everything lands under ``--workdir`` (default ``./poelm-demo``); the command prints where.
"""

from __future__ import annotations

import shutil
from functools import partial
import time
from pathlib import Path

from poelm import config as config_mod
from poelm.core.errors import PoelmError
from poelm.measure import record

SPIKE_SIGMA = 6  # the continual phase's spike guard (OLMo-core's SkipStepAdamW default sigma_factor)


def run_demo(workdir="poelm-demo", config="embedded", base_steps=None, continual_steps=None, save_every=None,
             split_tokens=None, calib_tokens=None, overrides=None, progress=True, log=print, overwrite=False,
             trackers=(), tracking=None) -> dict:
    """``trackers`` / ``tracking`` (``{"project", "run_name"}``): live dashboards (poelm/track.py):
    runs ``<name>-base`` and ``<name>-continual`` (grouped), one per cooldown probe, and every
    branch's card metrics at its step in the run that saved it."""
    from poelm.train import loop as train
    from poelm.trajectory import publish

    t0 = time.time()
    work = Path(workdir)
    if work.exists() and any(work.iterdir()):
        if not overwrite:
            raise PoelmError(f"{work} already holds a demo run; pass --overwrite to replace it or --workdir to use another folder")
        shutil.rmtree(work)
    repo = work / "trajectory"
    cfg = config_mod.load(config, overrides or [])
    if base_steps:
        cfg.schedule.steps = base_steps
        cfg.schedule.warmup = max(1, base_steps // 12)
    cfg.train.save_every = 0  # the base phase saves once, at its end (the annealed seed)
    if trackers:
        cfg.train.trackers = list(trackers)
    config_mod.validate(cfg)
    from poelm import track

    track.check(cfg.train.trackers)  # before any compute
    prefix = (tracking or {}).get("run_name") or work.resolve().name
    opts = {"project": (tracking or {}).get("project")}
    log(f"[1/4] base phase: {cfg.schedule.steps} steps, stage_layers={list(cfg.model.stage_layers)} -> {work / 'base'}")
    base = train.train(cfg, work / "base", progress=progress, tracking={**opts, "run_name": f"{prefix}-base"})
    seed_ckpt = Path(base["out"]) / _step_dir(base["step"])

    n = continual_steps or max(2, cfg.schedule.steps // 2)
    every = save_every or max(1, n // 6)
    log(f"[2/4] continual B2 phase: {n} steps from step {base['step']}, saving every {every}, publishing to {repo}")
    # The guard for the re-warm shock (train/spikes.py) on the phase whose LR comes back up, at
    # OLMo-core's default of 6 sigma; the seed branch carries the training state (continuable
    # exactly: `poelm continue --from REPO@step-XXXXX`), the phase's later saves the weights only.
    ov = [f"train.save_every={every}", f"train.skip_spikes={SPIKE_SIGMA}"]
    seed_first = iter([True])

    def publish_seed_with_state(ckpt, repo, **kw):
        return publish.publish(ckpt, repo, with_optimizer=next(seed_first, False), **kw)

    cont = train.continue_phase(seed_ckpt, work / "continual", steps=n, publisher=partial(publish.Publisher, str(repo), publish_fn=publish_seed_with_state),
                                progress=progress, overrides=ov, tracking={**opts, "run_name": f"{prefix}-continual"})
    log(f"      spike guard (train.skip_spikes = {SPIKE_SIGMA}): {cont['skipped_steps']} of {n} updates skipped")

    from poelm.measure import run as measure

    branches = [b["branch"] for b in publish.list_branches(repo)]
    log(f"[3/4] measuring {len(branches)} branches: {', '.join(branches)}")
    seed_target = f"{repo}@{branches[0]}"
    kw = {}
    if split_tokens:
        kw["split_tokens"] = split_tokens
    if calib_tokens:
        kw["calib_tokens"] = calib_tokens
    recs = []
    for b in branches:
        rec = measure.measure_target(f"{repo}@{b}", against=None if b == branches[0] else seed_target, progress=False, **kw)
        recs.append(rec)
        log(f"      {b}: full-K BPB {record.figure(rec, 'bpb.full')[0]:.4f}")
        _dashboards(rec, cfg.train.trackers, {**opts, "dir": work / "continual"})
    from poelm.measure import evals  # the shipped offline benchmark on every branch (needs poelm[eval])

    evals.demo_evals(repo, log=log)

    probes = _cooldown_probes(work / "continual", repo, seed_target, cont, n, kw, log, progress, (cfg.train.trackers, opts))

    from poelm.report import tables as report

    log("[4/4] trajectory report")
    records = report.load_records(repo)
    paths = report.write_report(records, work / "report")
    report.update_cards(repo)  # every branch's model card = the report up to its step
    elapsed = time.time() - t0
    out = {"workdir": str(work), "trajectory": str(repo), "branches": branches, "report": str(paths.get("report", work / "report")),
           "elapsed_s": elapsed, "base": base, "continual": cont, "cooldown": probes}
    log(f"done in {elapsed:.0f} s")
    for line in summary_table(recs):
        log(line)
    log(f"  report          : {out['report']}")
    log(f"  trajectory repo : {repo}  (branches: {', '.join(branches)}; main = {branches[-1]})")
    log(f"  checkout        : poelm checkout {repo}@main DIR   (or {repo}@{branches[0]}: any branch)")
    log(f"  checkpoints     : {work / 'base'}, {work / 'continual'}")
    return out


def summary_table(records: list[dict]) -> list[str]:
    """The demo's closing table: one row per branch (the seed first) with its step, lrm, full-K
    BPB and the paired delta against the seed, each with its 95 % block-bootstrap interval."""

    def ci(node) -> str:
        lo, hi = node.get("ci") or (None, None)
        return f"{node['value']:+.4f}" if lo is None else f"{node['value']:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    def bpb(node) -> str:
        lo, hi = node.get("ci") or (None, None)
        return f"{node['value']:.4f}" if lo is None else f"{node['value']:.4f} [{lo:.4f}, {hi:.4f}]"

    fmt = "  {:<11} {:>6} {:>6}  {:<26} {}"
    lines = [fmt.format("branch", "step", "lrm", "full-K BPB [95% CI]", "delta vs seed [95% CI]")]
    for r in records:
        d = record.lookup(r, "against.deltas", {}).get("bpb.full")  # a delta's key holds dots: not a path
        lrm = "-" if r.get("lrm") is None else f"{r['lrm']:.3f}"
        lines.append(fmt.format(r.get("branch") or "-", r.get("step") if r.get("step") is not None else "-", lrm,
                                bpb(record.lookup(r, "bpb.full")), ci(d) if d else "(the seed)"))
    return lines


def _step_dir(step: int) -> str:
    from poelm.train.checkpoint import step_name

    return step_name(step)


def _dashboards(rec: dict, trackers, opts: dict) -> None:
    if trackers:
        from poelm.measure.dashboard import log_measurement

        log_measurement(rec, trackers, opts)


def _cooldown_probes(run_dir: Path, repo: Path, seed_target: str, cont: dict, phase_steps: int, kw: dict, log, progress,
                     trackers=((), {})) -> dict:
    """Probe up to two peak-phase saves of the continual phase (the first and the last of them)
    with an N-step linear cooldown to lrm 0, N = 10% of the phase (at least 2 steps; Hägele et al.
    2024 cool down over 10-20% of a run); publish and measure each against the seed. Returns the
    probes and their cost (steps and seconds, as fractions of the phase)."""
    from poelm.measure import run as measure
    from poelm.schedule import Phase
    from poelm.train import checkpoint, cooldown
    from poelm.trajectory import publish
    from poelm.report.verdict import segment

    peak = []
    for d in sorted(p for p in run_dir.iterdir() if checkpoint.STEP_RE.match(p.name)):
        meta = checkpoint.read_json(d / "meta.json", "checkpoint meta")
        ph = Phase(**meta["phase"])
        if segment(int(meta["step"]) - ph.start_step, ph) == "peak":
            peak.append(d)
    chosen = sorted({peak[0], peak[-1]}) if peak else []
    n = max(2, round(phase_steps / 10))
    out = {"steps": n, "probes": [], "phase_steps": phase_steps}
    if not chosen:
        log("      cooldown probes: no peak-phase save to probe")
        return out
    log(f"      cooldown probes: {n}-step linear decay to lrm 0 from {', '.join(d.name for d in chosen)}")
    for d in chosen:
        t0 = time.time()
        s = cooldown.cooldown(d, steps=n, publisher=partial(publish.Publisher, str(repo)), progress=progress)
        wall = time.time() - t0  # setup, N steps, the save and its publish
        branch = s["branches"][0]
        t0 = time.time()
        rec = measure.measure_target(f"{repo}@{branch}", against=seed_target, progress=False, probe_set=None, **kw)
        dt = time.time() - t0
        _dashboards(rec, trackers[0], {**trackers[1], "dir": Path(s["ckpt"]).parent})
        full = record.lookup(rec, "bpb.full")
        out["probes"].append({"branch": branch, "source": d.name, "train_s": wall, "loop_s": s["elapsed_s"], "measure_s": dt,
                              "bpb": full, "delta_vs_seed": record.lookup(rec, "against.deltas", {}).get("bpb.full")})
        ci = full.get("ci") or [None, None]
        log(f"      {branch}: BPB if annealed here {full['value']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci[0] is not None else "")
            + f" ({wall:.1f}s cooldown incl. save and publish, {dt:.1f}s measuring)")
    one = sum(p["train_s"] for p in out["probes"]) / len(out["probes"])
    out["cost"] = {"steps": n, "train_s": one, "step_fraction": n / phase_steps, "time_fraction": one / cont["elapsed_s"]}
    log(f"      one probe: {n} steps = {100 * n / phase_steps:.0f}% of the phase's {phase_steps} steps, {one:.1f}s training "
        f"= {100 * one / cont['elapsed_s']:.0f}% of its {cont['elapsed_s']:.0f}s")
    return out
