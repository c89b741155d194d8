"""``poelm demo``: the whole pipeline on the embedded default, on a laptop CPU, in minutes.

1. train the byte-level BPE on the embedded corpus's training split;
2. a base phase with a full warmup / hold / warmdown cycle (``configs/embedded.toml``);
3. a continual phase with the card's B2 shape (half peak, warmdown 55%, final 0) anchored at the
   base phase's last step, saving every ``save_every`` steps; every save, the seed first, is
   published as a ``step-XXXXX`` branch of a local git repository (``main`` = newest);
4. every branch is measured (BPB per stage / prefix, accuracy, alpha sweep, WAND bounds written
   into its config.json, routing, self-speculative decoding, sample probe) against the seed;
5. the trajectory report (tables, plots, verdict) is written and becomes ``main``'s model card.

Everything lands under ``--workdir`` (default ``./poelm-demo``); the command prints where.
"""

from __future__ import annotations

import shutil
from functools import partial
import time
from pathlib import Path

from poelm import config as config_mod
from poelm.core.errors import PoelmError


def run_demo(workdir="poelm-demo", config="embedded", base_steps=None, continual_steps=None, save_every=None,
             split_tokens=None, calib_tokens=None, overrides=None, progress=True, log=print, overwrite=False) -> dict:
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
    config_mod.validate(cfg)
    log(f"[1/4] base phase: {cfg.schedule.steps} steps, stage_layers={list(cfg.model.stage_layers)} -> {work / 'base'}")
    base = train.train(cfg, work / "base", progress=progress)
    seed_ckpt = Path(base["out"]) / _step_dir(base["step"])

    n = continual_steps or max(2, cfg.schedule.steps // 2)
    every = save_every or max(1, n // 6)
    log(f"[2/4] continual B2 phase: {n} steps from step {base['step']}, saving every {every}, publishing to {repo}")
    ov = [f"train.save_every={every}"]
    cont = train.continue_phase(seed_ckpt, work / "continual", steps=n, publisher=partial(publish.Publisher, str(repo)), progress=progress, overrides=ov)

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
        log(f"      {b}: full-K BPB {rec['bpb']['full']['value']:.4f}")

    from poelm.report import tables as report

    log("[4/4] trajectory report")
    records = report.load_records(repo)
    paths = report.write_report(records, work / "report")
    report.update_cards(repo)  # every branch's model card = the report up to its step
    elapsed = time.time() - t0
    out = {"workdir": str(work), "trajectory": str(repo), "branches": branches, "report": str(paths.get("report", work / "report")),
           "elapsed_s": elapsed, "base": base, "continual": cont}
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
        d = ((r.get("against") or {}).get("deltas") or {}).get("bpb.full")
        lrm = "-" if r.get("lrm") is None else f"{r['lrm']:.3f}"
        lines.append(fmt.format(r.get("branch") or "-", r.get("step") if r.get("step") is not None else "-", lrm,
                                bpb(r["bpb"]["full"]), ci(d) if d else "(the seed)"))
    return lines


def _step_dir(step: int) -> str:
    from poelm.train.checkpoint import step_name

    return step_name(step)
