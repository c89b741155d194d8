"""Optimizer step time: the reference optimizer (``optim.optimizer = "nanochat"``: Polar Express +
NorMuon + cautious decay) against poelm's (quintic Newton-Schulz Muon), side by side, one process.

Both optimizers step the same model with the same fixed gradients (one backward of ``model.loss``
on random tokens, kept between steps); rounds alternate between the two so load drifts hit both
alike. Prints the median ``step()`` time of each over ``--rounds`` rounds of ``--steps`` steps
(after one untimed step that allocates the state) and their ratio.

    python bench/optim_step.py                 # CPU, a ~2M-parameter model
    python bench/optim_step.py --n-embd 512 --depth 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poelm.config import OptimConfig
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train.optim import build_optimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=a.vocab, depth=a.depth, n_embd=a.n_embd, n_head=max(1, a.n_embd // 64), n_kv_head=max(1, a.n_embd // 128),
                      intermediate=4 * a.n_embd, max_seq_len=128, stage_layers=[a.depth - a.depth // 2, a.depth // 2])
    model = PoEGPT(cfg).to(a.device)
    model.init_weights(0)
    idx = torch.randint(0, a.vocab, (4, 129), device=a.device)
    model.loss(idx[:, :-1], idx[:, 1:])[0].backward()
    opts = {k: build_optimizer(model, OptimConfig(optimizer=k, weight_decay=0.1)) for k in ("poelm", "nanochat")}
    times = {k: [] for k in opts}
    for o in opts.values():
        o.step()
    for _ in range(a.rounds):
        for k, o in opts.items():
            for _ in range(a.steps):
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                o.step()
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"model {n / 1e6:.2f}M params on {a.device} ({torch.get_num_threads()} threads), {a.rounds}x{a.steps} timed steps each")
    for k, v in med.items():
        q = statistics.quantiles([t * 1e3 for t in times[k]], n=4)
        print(f"  {k:9s} step median {v:8.2f} ms   (quartiles {q[0]:.2f} .. {q[2]:.2f})")
    print(f"  ratio nanochat / poelm: {med['nanochat'] / med['poelm']:.2f}")


if __name__ == "__main__":
    main()
