"""Cost of ``poelm measure`` against one plain evaluation forward over the same tokens.

Prints, measured side by side in one process (alternating runs, best of ``--reps``):

- eval: ``train.evaluate_bpb`` (the training evaluation: one ``stage_log_probs`` forward per batch,
  full-K and per-stage BPB) over the measurement + calibration slices;
- measure: ``measure.measure`` position-level work over the same slices (calibration pass +
  measurement pass: BPB per stage / prefix / alpha, accuracy, WAND ranges and exits, routing
  histograms, block sums) plus the bootstrap, without the generation probe;
- probe+timing: the fixed-size generation part (prompt set, greedy; the timed decoding modes), timed separately
  because it does not grow with the slice.

Usage: ``python bench/measure_cost.py [--config embedded] [--set model.n_embd=512 ...] [--tokens N] [--calib N] [--probe]``.
The model is the config's architecture with random weights (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import torch

from poelm import config as config_mod
from poelm.measure import run as measure
from poelm.core.model import PoEGPT


class ByteCounts:
    """What measure needs of a tokenizer, without training one: ids 4..259 are the bytes (as in
    poelm's tokenizer), 0 is BOS; every other id counts 3 bytes. Costs depend on token counts only."""

    def __init__(self, V: int):
        self.vocab_size = V
        self.bos_id = 0
        self.fingerprint = "bench"

    def encode(self, text: str) -> list[int]:
        return [4 + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")

    def token_bytes(self):
        tb = torch.full((self.vocab_size,), 3, dtype=torch.long)
        tb[0] = 0
        return tb


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="embedded")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.n_embd=512")
    ap.add_argument("--tokens", type=int, default=16384, help="measurement slice (targets)")
    ap.add_argument("--calib", type=int, default=2048, help="calibration slice (targets)")
    ap.add_argument("--batch-size", type=int, default=0, help="default: the config's train.device_batch_size")
    ap.add_argument("--reps", type=int, default=5, help="alternating runs of each; the best is reported (the machine is shared)")
    ap.add_argument("--probe", action="store_true", help="also time the generation part (card prompt set, 60 tokens, speculative m=4)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from poelm.train.loop import evaluate_bpb

    cfg = config_mod.load(args.config, args.overrides)
    torch.manual_seed(0)
    model = PoEGPT(cfg.model)
    model.init_weights(0)
    with torch.no_grad():  # give the per-stage heads something to disagree about
        for h in model.stage_heads:
            h.weight.normal_(0, 0.02)
    model.to(args.device).eval()
    V = cfg.model.vocab_size
    tok = ByteCounts(V)
    T = cfg.seq_len
    B = args.batch_size or cfg.train.device_batch_size
    n = args.tokens + args.calib + 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, V, (n,), generator=g)
    tokens[::200] = 0  # documents start with BOS
    tb = tok.token_bytes().to(args.device)
    params = model.param_count()["total"]
    print(f"model: {args.config} architecture, {params / 1e6:.2f}M params, vocab {V}, depth {cfg.model.depth}, n_embd {cfg.model.n_embd}, "
          f"stage_layers {list(cfg.model.stage_layers)}; seq_len {T}, batch {B}; {args.tokens:,} + {args.calib:,} tokens; "
          f"{torch.get_num_threads()} threads, device {args.device}")

    def run_eval():
        evaluate_bpb(model, tokens, tb, B, T)

    def run_measure():
        measure.measure(model, tok, {}, tokens=tokens, split_tokens=args.tokens, calib_tokens=args.calib, batch_size=B, seq_len=T,
                        probe_set=None, progress=False)

    def timed(f):
        w, c = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - w, time.process_time() - c

    run_eval()  # warm-up (allocator, kernels)
    te, tm = [], []
    for _ in range(args.reps):
        te.append(timed(run_eval))
        tm.append(timed(run_measure))
    e, mm = min(x[0] for x in te), min(x[0] for x in tm)
    ec, mc = min(x[1] for x in te), min(x[1] for x in tm)
    print(f"eval forward (evaluate_bpb): {e:.2f}s   measure (position-level + bootstrap): {mm:.2f}s   "
          f"wall ratio {mm / e:.3f}x, CPU-time ratio {mc / ec:.3f}x (best of {args.reps}; CPU time is less sensitive to other load)")
    print(f"  all runs (wall s): eval {[round(x[0], 2) for x in te]}  measure {[round(x[0], 2) for x in tm]}")
    if args.probe:
        from poelm.measure.probe import get_engine, load_prompt_set, run_probe
        from poelm.measure.genset import cut_prompts, untimed_figures
        from poelm.measure.timing import modes_for, timed_generation

        label, prompts = load_prompt_set("card")
        engine = get_engine(model)
        bounds = [1.0] * (cfg.model.n_stages - 1)
        t0 = time.perf_counter()
        run_probe(model, tok, prompts, label, 60, engine)
        t1 = time.perf_counter()
        gen, _ = cut_prompts(tokens[:args.tokens + 1], 0)  # the generation set (genset defaults), BOS = 0 here
        modes = modes_for(cfg.model.n_stages, 4, bounds, tau=0.5)
        untimed_figures(model, engine, gen, 32, modes)
        t15 = time.perf_counter()
        timed_generation(model, gen, engine, modes)
        t2 = time.perf_counter()
        print(f"generation part (fixed size, not per token of the slice): probe {t1 - t0:.2f}s, generation set (acceptance, "
              f"agreement, exit depths) {t15 - t1:.2f}s, timed decoding "
              f"(full, stage 0, speculative, wand, route; measure.timing defaults) {t2 - t15:.2f}s; "
              f"whole measurement / eval = {(mm + t2 - t0) / e:.3f}x at this slice size")


if __name__ == "__main__":
    main()
