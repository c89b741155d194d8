"""Per-step data time of rank 0 at the card's batch, text on the fly vs prefetch vs shards.

    python bench/loader.py                      # W = 1, 8, 12; 5 measured steps per cell
    python bench/loader.py --worlds 12 --steps 3 --copies 8

The card's batch: 384 rows of 2048 tokens per optimizer step (786,432 tokens), cut into
micro-steps of ``W x 8`` rows (``configs/cognica-3b.toml``: device_batch_size 8, so accumulation
48 / 6 / 4 at W = 1 / 8 / 12). Rank 0 calls ``TrainLoader.next_batch(8 W, rank=0, world_size=W)``
as the training loop does, and also hashes the whole global batch for the log (it is the logging
rank). The corpus is the shape the issue measured: parquet row groups of 1,000 documents of 492
characters on average, made in a temp dir from the embedded corpus (3,306 documents, 492 chars
on average) repeated ``--copies`` times, each copy's documents prefixed with the copy number (so
they are distinct documents with their own split keys); a 32,768-token BPE fitted on the embedded
corpus; ``val_fraction`` 0.01 as the 3B preset.

Cells (seconds per optimizer step, median over ``--steps`` steps after one warm-up step):

* ``text``: today's loader without prefetch: every second it takes is exposed.
* ``text+prefetch`` / ``shards+prefetch``: the *exposed* wait, i.e. the time ``next_batch``
  blocks while the next batch is prepared in the background; the step's GPU work is simulated
  by sleeping ``min(planned step, --sim-cap)`` per step, spread over the micro-steps (a sleeping
  main thread leaves the CPU to the loader as a GPU-bound step does; a shorter simulated step
  than planned only makes the overlap harder).
* ``shards``: the shard loader without prefetch (all of its time exposed).

Each cell is printed next to ``poelm plan``'s step time for the 3B preset on W H100s
(``poelm.train.plan.plan``, MFU 0.4) as a share of it; the goal is an exposed wait <= 2 %. Also
printed: the one-off ``poelm tokenize`` time for the corpus (``--workers`` threads), and per cell
the CPU seconds the process spent per step (all threads; less sensitive than wall time to other
jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poelm import config as config_mod  # noqa: E402
from poelm.data import corpus, pretokenize  # noqa: E402
from poelm.data.mixture import TrainLoader  # noqa: E402
from poelm.data.tokenizer import train_tokenizer  # noqa: E402
from poelm.train.plan import plan  # noqa: E402


def make_corpus(root: Path, copies: int, per_file: int = 10) -> tuple[Path, int, float]:
    """Parquet files of row groups of 1,000 documents; returns (dir, documents, mean chars)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = list(corpus.read_documents("embedded"))
    docs = [f"{c}. {d}" for c in range(copies) for d in base]
    d = root / "text"
    d.mkdir()
    step = 1000 * per_file
    for i in range(0, len(docs), step):
        pq.write_table(pa.table({"text": docs[i:i + step]}), d / f"part-{i // step:03d}.parquet", row_group_size=1000)
    return d, len(docs), sum(map(len, docs)) / len(docs)


def time_steps(loader, world: int, dbs: int, rows: int, steps: int, sim_step: float | None) -> tuple[list[float], list[float]]:
    """Seconds rank 0 waits in ``next_batch`` per optimizer step, and CPU seconds the process
    spent per step (all threads: the tokenizer's pool and the prefetch thread included), after
    one warm-up step."""
    micro = world * dbs
    accum = rows // micro
    out, cpu = [], []
    for s in range(steps + 1):
        wait = 0.0
        c0 = time.process_time()
        for _ in range(accum):
            t0 = time.perf_counter()
            loader.next_batch(micro, 0, world)
            wait += time.perf_counter() - t0
            if sim_step:
                time.sleep(sim_step / accum)  # the micro-step's GPU work
        loader.batch_hash()  # the loop logs it once per step
        if s:
            out.append(wait)
            cpu.append(time.process_time() - c0)
    return out, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,8,12")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--copies", type=int, default=16, help="copies of the embedded corpus (16: ~53k documents, ~26M characters)")
    ap.add_argument("--workers", type=int, default=2, help="poelm tokenize threads")
    ap.add_argument("--sim-cap", type=float, default=4.0, help="longest simulated GPU step, seconds")
    ap.add_argument("--modes", default="text,text+prefetch,shards,shards+prefetch")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    modes = args.modes.split(",")
    cfg = config_mod.load("cognica-3b")
    rows = cfg.train.tokens_per_step // cfg.seq_len
    dbs = cfg.train.device_batch_size
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="poelm-bench-loader-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        text_dir, n_docs, mean_chars = make_corpus(tmp, args.copies)
        tok = train_tokenizer(corpus.read_documents("embedded"), cfg.model.vocab_size)
        print(f"corpus: {n_docs:,} documents, {mean_chars:.0f} chars on average, row groups of 1,000; "
              f"tokenizer {tok.vocab_size:,} tokens ({time.perf_counter() - t0:.1f} s to build both)")
        text_cfg = config_mod.DataConfig(path=str(text_dir), val_fraction=cfg.data.val_fraction)
        shard_cfg = config_mod.DataConfig(path=str(tmp / "shards"), val_fraction=cfg.data.val_fraction)
        if any(m.startswith("shards") for m in modes):
            t0 = time.perf_counter()
            idx = pretokenize.tokenize(text_cfg, tmp / "shards", tok, workers=args.workers)[0]
            dt = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in (tmp / "shards").rglob("*") if f.is_file())
            print(f"poelm tokenize: {idx['tokens']:,} tokens in {dt:.1f} s ({idx['tokens'] / dt / 1e6:.2f} M tokens/s, "
                  f"{args.workers} threads), {size / 2**20:.0f} MiB of shards ({idx['dtype']})")
        head = f"{'W':>3} {'plan step':>10} " + " ".join(f"{m:>28}" for m in modes)
        print(f"\nseconds rank 0 waits for data per optimizer step ({rows} rows x {cfg.seq_len}; median [min-max] of {args.steps}; "
              f"% of the planned step)\n{head}")
        for w in worlds:
            step_s = plan(cfg, w)["step_s"]
            sim = min(step_s, args.sim_cap)
            cells, cpus = [], []
            for m in modes:
                data = shard_cfg if m.startswith("shards") else text_cfg
                loader = TrainLoader(data, tok, cfg.seq_len, prefetch=m.endswith("prefetch"))
                ts, cpu = time_steps(loader, w, dbs, rows, args.steps, sim if m.endswith("prefetch") else None)
                loader.close()  # its prepared batch must not run into the next cell's timing
                med = statistics.median(ts)
                cells.append(f"{med:6.3f} [{min(ts):.3f}-{max(ts):.3f}] {100 * med / step_s:5.1f}%")
                cpus.append(statistics.median(cpu))
            print(f"{w:>3} {step_s:>9.2f}s " + " ".join(f"{c:>28}" for c in cells), flush=True)
            print(f"{'':>3} {'cpu s/step':>10} " + " ".join(f"{c:>28.3f}" for c in cpus), flush=True)
    print(f"\nprefetch cells simulate a GPU step of min(plan, {args.sim_cap:g} s); load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
