"""Peak memory of one PoE training step: one backward over the whole trunk vs the stage-by-stage
backward that local learning allows (``PoEGPT.backward_local``, used by the training loop).

Each variant runs in its own subprocess and reports its peak resident set size (ru_maxrss) above
the process's baseline after building the model, side by side in one run.

    python bench/train_memory.py [--depth 16 --n-embd 256 --stages 8,3,3,2 --batch 8 --seq 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(a):
    import torch

    from poelm.core.model import ModelConfig, PoEGPT

    torch.manual_seed(0)
    stages = [int(s) for s in a.stages.split(",")]
    cfg = ModelConfig(vocab_size=a.vocab, depth=sum(stages), n_embd=a.n_embd, n_head=max(1, a.n_embd // 64),
                      n_kv_head=max(1, a.n_embd // 128), intermediate=4 * a.n_embd, max_seq_len=a.seq, stage_layers=stages)
    m = PoEGPT(cfg)
    m.init_weights(seed=0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    y = torch.randint(0, a.vocab, (a.batch, a.seq))
    for p in m.parameters():  # allocate the gradients first, so only activations differ
        p.grad = torch.zeros_like(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if a.variant == "whole":
        loss, _ = m.loss(x, y)
        loss.backward()
    else:
        m.backward_local(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mib": (peak - base) / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int)  # informational; depth = sum(stages)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--stages", default="8,3,3,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--variant", choices=["whole", "local"])
    a = ap.parse_args()
    if a.variant:
        return child(a)
    res = {}
    for v in ("whole", "local"):
        args = [sys.executable, __file__, "--variant", v, "--n-embd", str(a.n_embd), "--vocab", str(a.vocab),
                "--stages", a.stages, "--batch", str(a.batch), "--seq", str(a.seq)]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])["delta_mib"]
    print(f"model: stage_layers ({a.stages}), n_embd {a.n_embd}, vocab {a.vocab}, batch {a.batch}x{a.seq}")
    print(f"  one backward over the trunk : {res['whole']:8.0f} MiB above the model + gradients")
    print(f"  stage-by-stage backward     : {res['local']:8.0f} MiB")
    print(f"  ratio local / whole         : {res['local'] / res['whole']:.2f}")


if __name__ == "__main__":
    main()
