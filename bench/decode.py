"""Decoding throughput of poelm's engine, every mode side by side, in one process.

    python bench/decode.py                  # 12 layers, width 512, stages (6,2,2,2), vocab 8192
    python bench/decode.py --hf             # also transformers generate() on the exported model
    python bench/decode.py --depth 4 --width 128 --stages 2,1,1 --vocab 1024 --new-tokens 16

The bench model is random (no training is needed to time decoding) but built so that its stages
agree the way a trained PoE model's do: ``init_weights(seed)`` (per-stage heads exactly zero, so
every stage reads the same shared head), then the blocks' output projections, which
``init_weights`` zeroes, are drawn N(0, 1/fan_in), scaled by ``--late`` (default 0.03) in the
blocks after stage 0, whose ``x0`` mixing scalars are also set to 0: stages 1..K-1 only refine
the stream stage 0 produced. The shared head is drawn N(0, ``--head-scale``**2/width) so logits
are well separated (no near-ties). With the fixed seed, stage 0 then drafts most tokens right
(acceptance ~0.9, like the card's 0.94-0.997) but not all.

WAND bounds are calibrated on this model as SPEC says (p99 of ``range(delta_s)`` over positions)
on random token rows (``--calib-tokens``), not on a data slice.

Printed: tokens/s of ``full``, ``speculative`` (speedup, acceptance, mean accepted), ``wand``
(speedup, top-1 agreement with ``full``: position-wise over the generated tokens, mean depth),
``stage=0``, optionally (``--hf``) transformers ``generate()`` through ``poelm.hf``'s
``PoelmForCausalLM`` with the same weights; and the analytic limit of speculation
``(m+1)/(m*c0 + (1-c0))`` with ``c0`` = stage 0's share of ``model.flops_per_token()`` (the
issue's formula: a round that drafts m tokens and verifies them with stages 1..K-1 at the cost of
one position). The engine's round feeds m+1 positions to stage 0 (the last draft's states are
needed for the bonus token), so its own bound is ``(m+1)/((m+1)*c0 + (1-c0))``, also printed.
Each (mode, prompt) is timed ``--repeats`` times (modes interleaved, after a warm-up) and the
fastest run is kept, which filters out other processes on a shared machine. CPU time does not
follow FLOPs exactly (per-call overheads, memory-bound heads), so the measured stage-0 time share
``c0_time = t(stage=0) / t(full)`` and the limit it implies are printed as well. On a machine
shared with other jobs, ``--threads 1`` gives steadier ratios (no thread-barrier stalls).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from poelm.core import poe
from poelm.infer.engine import Engine
from poelm.core.model import ModelConfig, PoEGPT


def build(args) -> PoEGPT:
    stages = tuple(int(x) for x in args.stages.split(","))
    cfg = ModelConfig(vocab_size=args.vocab, depth=sum(stages), n_embd=args.width, n_head=args.heads, n_kv_head=args.kv_heads,
                      intermediate=4 * args.width, max_seq_len=args.prompt_len + args.new_tokens + 8, stage_layers=stages)
    model = PoEGPT(cfg)
    model.init_weights(seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            scale = 1.0 if i < stages[0] else args.late
            for lin in (b.attn.c_proj, b.mlp.c_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale * lin.weight.shape[1] ** -0.5)
            if i >= stages[0]:
                model.x0_lambdas[i] = 0.0  # later stages refine stage 0's stream, not re-mix x0 into it
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * args.head_scale * args.width ** -0.5)
    return model.eval()


@torch.no_grad()
def calibrate_bounds(model, n_tokens: int, seed: int) -> list[float]:
    """p99 over positions of ``range(delta_s)`` (SPEC), on random token rows."""
    T = model.config.max_seq_len
    rows = max(1, n_tokens // T)
    idx = torch.randint(0, model.config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(seed))
    r = torch.cat([poe.wand_ranges(model.stage_log_probs(idx[i : i + 1])).flatten(1) for i in range(rows)], dim=1)
    return torch.quantile(r, 0.99, dim=1).tolist()


def timed(engine, prompt, n, **kw):
    t = time.perf_counter()
    res = engine.generate(prompt, n, **kw)
    return time.perf_counter() - t, res.tokens[0], res.stats


def run_hf(model, prompts, n, repeats):
    """Time greedy transformers ``generate()`` (its own DynamicCache) through poelm's
    ``PoelmForCausalLM`` wrapper (poelm/hf, the class an export ships) holding the same weights."""
    from poelm.hf.configuration_poelm import PoelmConfig
    from poelm.hf.modeling_poelm import PoelmForCausalLM

    hf = PoelmForCausalLM(PoelmConfig(**model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    best, outs = math.inf, None
    for _ in range(repeats + 1):  # the first pass warms up
        t = time.perf_counter()
        outs = [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):].tolist() for p in prompts]
        best = min(best, time.perf_counter() - t)
    return best, outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="6,2,2,2", help="stage_layers (depth = their sum)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--late", type=float, default=0.03, help="scale of the block outputs after stage 0")
    ap.add_argument("--head-scale", type=float, default=4.0)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="also time transformers generate() through poelm.hf (PoelmForCausalLM, same weights)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    cfg = model.config
    n = args.new_tokens
    g = torch.Generator().manual_seed(args.seed + 2)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    bounds = calibrate_bounds(model, args.calib_tokens, args.seed + 3)
    flops = model.flops_per_token(context=args.prompt_len + n / 2)
    c0 = flops["per_stage"][0] / flops["total"]
    m = args.m
    print(f"model: depth {cfg.depth}, width {cfg.n_embd}, stage_layers {cfg.stage_layers}, vocab {cfg.vocab_size}, "
          f"{model.param_count()['total'] / 1e6:.1f}M params; torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}")
    print(f"run: {args.prompts} prompts x {args.prompt_len} tokens, {n} new tokens each, best of {args.repeats} after warm-up; "
          f"wand p99 bounds {[round(b, 3) for b in bounds]}")
    eng = Engine(model)
    modes = {
        "full": dict(mode="full"),
        "speculative": dict(mode="speculative", m=m),
        "wand": dict(mode="wand", bounds=bounds),
        "stage=0": dict(mode="stage=0"),
    }
    for kw in modes.values():  # warm-up
        eng.generate(prompts[0], 8, **kw)
    # best[mode][prompt]: the fastest of the repeats, modes interleaved so slow spells of a shared
    # machine hit every mode alike
    best = {k: [math.inf] * len(prompts) for k in modes}
    outs = {k: [None] * len(prompts) for k in modes}
    stats = {k: [None] * len(prompts) for k in modes}
    for _ in range(args.repeats):
        for i, p in enumerate(prompts):
            for name, kw in modes.items():
                t, o, s = timed(eng, p, n, **kw)
                if t < best[name][i]:
                    best[name][i], outs[name][i], stats[name][i] = t, o, s
    total = n * len(prompts)
    tps = {k: total / sum(v) for k, v in best.items()}
    full = outs["full"]

    def agree(o):
        pairs = [(a, b) for x, y in zip(o, full) for a, b in zip(x, y)]
        return sum(a == b for a, b in pairs) / len(pairs)

    spec = stats["speculative"]
    acc = sum(s["accepted"] for s in spec) / sum(s["proposed"] for s in spec)
    mean_acc = sum(s["accepted"] for s in spec) / sum(s["row_rounds"] for s in spec)
    wdepth = sum(s["mean_depth"] * s["new_tokens"] for s in stats["wand"]) / sum(s["new_tokens"] for s in stats["wand"])
    sp = tps["speculative"] / tps["full"]
    limit = (m + 1) / (m * c0 + (1 - c0))
    limit_engine = (m + 1) / ((m + 1) * c0 + (1 - c0))
    predicted = (mean_acc + 1) / ((m + 1) * c0 + (1 - c0))
    print(f"{'mode':<14}{'tok/s':>9}{'speedup':>9}  notes")
    print(f"{'full':<14}{tps['full']:>9.1f}{1.0:>8.2f}x  K={cfg.n_stages}")
    print(f"{'speculative':<14}{tps['speculative']:>9.1f}{sp:>8.2f}x  m={m}, acceptance {acc:.4f}, mean accepted {mean_acc:.2f}/{m}, "
          f"identical to full: {outs['speculative'] == full}")
    print(f"{'wand':<14}{tps['wand']:>9.1f}{tps['wand'] / tps['full']:>8.2f}x  top-1 agreement with full {agree(outs['wand']):.4f}, "
          f"mean depth {wdepth:.2f}/{cfg.n_stages}")
    print(f"{'stage=0':<14}{tps['stage=0']:>9.1f}{tps['stage=0'] / tps['full']:>8.2f}x  c0 = {c0:.3f} (stage-0 FLOPs share), 1/c0 = {1 / c0:.2f}")
    if args.hf:
        t_hf, o_hf = run_hf(model, prompts, n, args.repeats)
        print(f"{'hf generate':<14}{total / t_hf:>9.1f}{total / t_hf / tps['full']:>8.2f}x  transformers generate(), greedy, "
              f"identical to full: {o_hf == full}")
    print(f"speculation limit (m+1)/(m*c0+(1-c0)) = {limit:.2f}x with FLOPs c0 {c0:.3f}: achieved {sp / limit:.1%}")
    print(f"  engine round bound (m+1)/((m+1)*c0+(1-c0)) = {limit_engine:.2f}x: achieved {sp / limit_engine:.1%}; "
          f"at the measured acceptance (mean accepted+1)/((m+1)*c0+(1-c0)) = {predicted:.2f}x")
    ct = tps["full"] / tps["stage=0"]
    print(f"  with the measured time share c0_time = {ct:.3f}: limit {(m + 1) / (m * ct + (1 - ct)):.2f}x "
          f"(achieved {sp / ((m + 1) / (m * ct + (1 - ct))):.1%}), engine round bound {(m + 1) / ((m + 1) * ct + (1 - ct)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
