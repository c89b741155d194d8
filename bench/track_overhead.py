"""What a live dashboard costs a training run: the embedded config with and without each tracker.

Prints, measured side by side in one process, ``--rounds`` rounds of ``--steps`` training steps
per variant (no tracker, tensorboard, wandb offline, trackio local; the order rotates every round
so that load drifts hit every variant alike), each with ``train.log_every = 1`` (a record every
step: the most a tracker is asked to do):

- step: wall seconds per step of the loop (``Trainer.run``'s elapsed time, less the final save,
  over the steps), median over rounds, and its difference to the run without trackers;
- log: the time spent inside ``Run.log_record`` per record (the tracker's own cost on the
  training thread: flattening, the backend's ``log`` call; measured directly, so it is not lost
  in the load noise of the first figure);
- start+finish: opening and closing the run (once per phase, not per step).

Usage: ``python bench/track_overhead.py [--steps 50] [--rounds 3] [--trackers tensorboard,wandb,trackio]``.
W&B runs with ``WANDB_MODE=offline`` and trackio with a temporary ``TRACKIO_DIR`` (nothing leaves
the machine). Needs ``pip install -e ".[track]"``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trackers", default="tensorboard,wandb,trackio")
    ap.add_argument("--config", default="embedded")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="poelm-track-bench-"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TRACKIO_DIR", str(work / "trackio"))  # before trackio is imported

    import dataclasses

    from poelm import config as config_mod
    from poelm import track
    from poelm.train import loop

    # instrument the tracker: time in log_record (per record) and in start + finish (per run)
    cost = {"log": 0.0, "n": 0, "open": 0.0}

    def timed(key, fn, count=False):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                cost[key] += time.perf_counter() - t0
                cost["n"] += int(count)
        return wrapper

    track.Run.log_record = timed("log", track.Run.log_record, count=True)

    variants = ["none"] + [t for t in a.trackers.split(",") if t]
    track.check([v for v in variants if v != "none"])
    cfg = config_mod.load(a.config, ["train.eval_every=0", "train.save_every=0", "train.log_every=1"])
    # One trainer (model, optimizer, loader: set up once, the corpus tokenised once), run in
    # segments of --steps steps; before each segment the variant's tracker is attached (a new run)
    # and the phase is stretched to end N steps later. Saves are skipped (the same for every variant).
    out = work / "run"
    rt = loop.setup_runtime(cfg)
    trainer = loop._make_trainer(cfg, out, rt, None, None, False)
    trainer.save = lambda: None
    phase0 = cfg.schedule.phase(start_step=0)
    res = {v: {"step": [], "log": [], "open": []} for v in variants}
    for r in range(a.rounds + 1):  # round 0 warms up (imports, the first W&B service start); not counted
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            for k in cost:
                cost[k] = 0 if k == "n" else 0.0
            t0 = time.perf_counter()
            trainer.tracker = None if v == "none" else track.start([v], out / f"{v}-{r}", cfg.to_dict())
            t_open = time.perf_counter() - t0
            trainer.phase = dataclasses.replace(phase0, steps=trainer.step + a.steps)  # ends N steps from here
            t0 = time.perf_counter()
            trainer.run()
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            if trainer.tracker is not None:
                trainer.tracker.finish()
            t_open += time.perf_counter() - t1
            if r == 0:
                continue
            res[v]["step"].append(wall / a.steps)
            if v != "none":
                res[v]["log"].append(cost["log"] / max(1, cost["n"]))
                res[v]["open"].append(t_open)
    loop.teardown_runtime(rt)
    base = statistics.median(res["none"]["step"])
    print(f"track overhead: config {a.config}, {a.steps} steps x {a.rounds} rounds per variant (interleaved), "
          f"log_every 1, load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<12} {'step ms (median [min, max])':<30} {'vs none':>10} {'log ms/record':>14} {'start+finish s':>15}")
    for v in variants:
        st = res[v]["step"]
        med = statistics.median(st)
        d = "" if v == "none" else f"{100 * (med / base - 1):+.1f}%"
        lg = f"{1e3 * statistics.median(res[v]['log']):.2f}" if res[v]["log"] else "-"
        op = f"{statistics.median(res[v]['open']):.2f}" if res[v]["open"] else "-"
        print(f"{v:<12} {1e3 * med:7.1f} [{1e3 * min(st):.1f}, {1e3 * max(st):.1f}]{'':<10} {d:>10} {lg:>14} {op:>15}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
