"""Padded-batch decoding vs one prompt at a time: same prompts, same model, same process.

    python bench/padded.py                      # 8 prompts of 8..64 tokens, 32 new tokens each
    python bench/padded.py --prompts 16 --new-tokens 64 --threads 1

Prompts of different lengths decode together in one left-padded batch (per-row RoPE positions
and a validity mask over the cache slots, poelm/core/inputs.py); this bench times that against
decoding each prompt alone, for poelm's engine in every mode that matters for throughput (full,
speculative with per-row accepted counts, wand with per-row exits, stage 0) and for transformers
``generate()`` through poelm's ``PoelmForCausalLM`` (left-padded ``attention_mask`` batch vs one
call per prompt). Each figure is new tokens of all prompts / wall time of all of them (prefill
included), the best of ``--repeats`` after a warm-up, batch and one-at-a-time interleaved so slow
spells of a shared machine hit both; it also checks that every batched row equals its lone run.

The model is random (timing needs no training): ``init_weights`` then the blocks' output
projections drawn N(0, 1/fan_in), scaled by ``--late`` after stage 0 so later stages refine
stage 0's stream as in a trained PoE model (the speculative drafts are then mostly accepted).
WAND bounds are the p99 of ``range(delta_s)`` (SPEC) on random token rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

from poelm.core import poe
from poelm.core.model import PoEGPT
from poelm.infer.engine import Engine


def build(args) -> PoEGPT:
    """bench/decode.py's agreeing-stages model (imported by path: bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).resolve().parent / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    return decode.build(argparse.Namespace(**{**vars(args), "prompt_len": args.max_len, "head_scale": 4.0}))


@torch.no_grad()
def calibrate_bounds(model, n_tokens: int, seed: int) -> list[float]:
    T = model.config.max_seq_len
    idx = torch.randint(0, model.config.vocab_size, (max(1, n_tokens // T), T), generator=torch.Generator().manual_seed(seed))
    r = torch.cat([poe.wand_ranges(model.stage_log_probs(idx[i : i + 1])).flatten(1) for i in range(idx.size(0))], dim=1)
    return torch.quantile(r, 0.99, dim=1).tolist()


def engine_runs(eng, prompts, n, kw):
    def batch():
        return eng.generate(prompts, n, **kw).tokens

    def alone():
        return [eng.generate(p, n, **kw).tokens[0] for p in prompts]

    return batch, alone


def hf_runs(model, prompts, n):
    from poelm.hf.configuration_poelm import PoelmConfig
    from poelm.hf.modeling_poelm import PoelmForCausalLM

    hf = PoelmForCausalLM(PoelmConfig(**model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)

    def batch():
        return hf.generate(ids, attention_mask=mask, **kw)[:, L:].tolist()

    def alone():
        return [hf.generate(torch.tensor([p]), **kw)[0, len(p):].tolist() for p in prompts]

    return batch, alone


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="6,2,2,2")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--late", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="also transformers generate() (PoelmForCausalLM)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    n = args.new_tokens
    g = torch.Generator().manual_seed(args.seed + 2)
    lengths = [round(args.min_len + (args.max_len - args.min_len) * i / max(1, args.prompts - 1)) for i in range(args.prompts)]
    prompts = [torch.randint(0, args.vocab, (L,), generator=g).tolist() for L in lengths]
    bounds = calibrate_bounds(model, 2048, args.seed + 3)
    eng = Engine(model)
    runs = {
        "full": engine_runs(eng, prompts, n, dict(mode="full")),
        "speculative": engine_runs(eng, prompts, n, dict(mode="speculative", m=args.m)),
        "wand": engine_runs(eng, prompts, n, dict(mode="wand", bounds=bounds)),
        "stage=0": engine_runs(eng, prompts, n, dict(mode="stage=0")),
    }
    if args.hf:
        runs["hf generate"] = hf_runs(model, prompts, n)
    cfg = model.config
    print(f"model: depth {cfg.depth}, width {cfg.n_embd}, stage_layers {cfg.stage_layers}, vocab {cfg.vocab_size}, "
          f"{model.param_count()['total'] / 1e6:.1f}M params; torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}")
    print(f"run: {len(prompts)} prompts of {lengths[0]}..{lengths[-1]} tokens (one padded batch vs one at a time), {n} new tokens each, "
          f"best of {args.repeats} after warm-up, interleaved")
    with torch.no_grad():
        for batch, alone in runs.values():  # warm-up
            batch()
            alone()
    best = {k: [math.inf, math.inf] for k in runs}
    outs = {k: [None, None] for k in runs}
    for _ in range(args.repeats):
        for name, fns in runs.items():
            for j, fn in enumerate(fns):
                t = time.perf_counter()
                o = fn()
                dt = time.perf_counter() - t
                if dt < best[name][j]:
                    best[name][j], outs[name][j] = dt, o
    total = n * len(prompts)
    print(f"{'mode':<14}{'batch tok/s':>12}{'alone tok/s':>13}{'ratio':>8}  rows identical")
    for name in runs:
        tb, ta = total / best[name][0], total / best[name][1]
        print(f"{name:<14}{tb:>12.1f}{ta:>13.1f}{tb / ta:>7.2f}x  {outs[name][0] == outs[name][1]}")
    stats = eng.generate(prompts, n, mode="speculative", m=args.m).stats
    print(f"speculative batch: acceptance {stats['acceptance']:.3f}, cache repacks {stats['compactions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
