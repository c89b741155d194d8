"""Training-step throughput of a K-stage PoE model vs the same trunk as a plain GPT (K=1).

Prints tokens/s of both, measured side by side in one run (interleaved repetitions after a
warm-up, median of each), and their ratio; the goal is a PoE overhead <= 10%. The extra cost
of PoE is K-1 more heads (and their cross-entropies); the analytic FLOP overhead is printed for
the bench model and for the card's 3B preset, where the trunk dominates.

    python bench/train_throughput.py [--depth 8 --n-embd 256 --vocab 4096 --stages 4,2,1,1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poelm import config
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train.optim import build_optimizer


def make(cfg: ModelConfig, ocfg):
    m = PoEGPT(cfg)
    m.init_weights(seed=0)
    return m, build_optimizer(m, ocfg)


def step_time(model, opt, x, y) -> float:
    t = time.perf_counter()
    loss, _ = model.loss(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def analytic_overhead(cfg: ModelConfig) -> float:
    with torch.device("meta"):
        poe = PoEGPT(cfg)
        one = PoEGPT(ModelConfig(**{**cfg.to_dict(), "stage_layers": [cfg.depth]}))
    return poe.flops_per_token()["total"] / one.flops_per_token()["total"] - 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--stages", default="4,2,1,1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()
    torch.manual_seed(0)
    stages = [int(s) for s in a.stages.split(",")]
    base = dict(vocab_size=a.vocab, depth=a.depth, n_embd=a.n_embd, n_head=max(1, a.n_embd // 64), n_kv_head=max(1, a.n_embd // 128),
                intermediate=4 * a.n_embd, max_seq_len=a.seq)
    poe_cfg, one_cfg = ModelConfig(**base, stage_layers=stages), ModelConfig(**base, stage_layers=[a.depth])
    ocfg = config.OptimConfig()
    runs = {"PoE K=%d" % len(stages): make(poe_cfg, ocfg), "K=1": make(one_cfg, ocfg)}
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    y = torch.randint(0, a.vocab, (a.batch, a.seq))
    times = {k: [] for k in runs}
    for k, (m, o) in runs.items():  # warm-up
        step_time(m, o, x, y)
    for _ in range(a.reps):  # interleaved so both see the same machine load
        for k, (m, o) in runs.items():
            times[k].append(step_time(m, o, x, y))
    ntok = a.batch * a.seq
    tps = {k: ntok / statistics.median(v) for k, v in times.items()}
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: depth {a.depth}, n_embd {a.n_embd}, vocab {a.vocab}, stage_layers {stages}, batch {a.batch}x{a.seq}")
    for k, v in tps.items():
        print(f"  {k:10s} {v:10,.0f} tokens/s")
    (kp, vp), (_, v1) = list(tps.items())
    print(f"PoE overhead (measured): {v1 / vp - 1:+.1%}   (goal <= +10%)")
    print(f"PoE overhead (analytic FLOPs, this model): {analytic_overhead(poe_cfg):+.1%}")
    ref = config.load("cognica-3b").model
    print(f"PoE overhead (analytic FLOPs, card 3B preset {list(ref.stage_layers)}): {analytic_overhead(ref):+.1%}")


if __name__ == "__main__":
    main()
