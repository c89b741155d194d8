"""Peak memory of one PoE training step: one backward over the whole trunk vs the stage-by-stage
backward that local learning allows (``PoEGPT.backward_local``, used by the training loop), each
with the plain stage heads (``head_chunk_rows = 0``: ``[B, T, V]`` logits per stage, the path
before core/head.py) and with the fused chunked head (the default).

Each variant runs in its own subprocess and reports two peaks above its baseline (model and
gradients allocated): the process's resident set (ru_maxrss, what the OS sees, including malloc
caching) and torch's CPU allocator peak (``poelm.train.plan.peak_allocated_bytes``, tensors
only: the quantity ``poelm plan`` estimates, printed next to it). The step's wall time is printed
too (one step per subprocess: indicative only on a shared machine; bench/train_throughput.py
times steps properly).

    python bench/train_memory.py [--n-embd 256 --stages 8,3,3,2 --batch 8 --seq 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = {  # name -> (backward, head_chunk_rows)
    "whole, plain head": ("whole", 0),
    "local, plain head": ("local", 0),
    "whole, fused head": ("whole", None),
    "local, fused head": ("local", None),
}


def model_config(a):
    from poelm.core.model import ModelConfig

    stages = [int(s) for s in a.stages.split(",")]
    return ModelConfig(vocab_size=a.vocab, depth=sum(stages), n_embd=a.n_embd, n_head=max(1, a.n_embd // 64),
                       n_kv_head=max(1, a.n_embd // 128), intermediate=4 * a.n_embd, max_seq_len=a.seq, stage_layers=stages)


def child(a):
    import torch

    from poelm.core.model import PoEGPT
    from poelm.train.plan import peak_allocated_bytes

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = PoEGPT(model_config(a))
    m.init_weights(seed=0)
    backward, m.head_chunk_rows = VARIANTS[a.variant]
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    y = torch.randint(0, a.vocab, (a.batch, a.seq))
    for p in m.parameters():  # allocate the gradients first, so only activations differ
        p.grad = torch.zeros_like(p)

    def step():
        if backward == "whole":
            loss, _ = m.loss(x, y)
            loss.backward()
        else:
            m.backward_local(x, y)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    step()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    alloc = peak_allocated_bytes(step)  # after the RSS high-water mark is read
    print(json.dumps({"rss_mib": (peak - base) / 1024, "alloc_mib": alloc / 2**20, "step_s": dt}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--stages", default="8,3,3,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--variant", choices=list(VARIANTS))
    a = ap.parse_args()
    if a.variant:
        return child(a)
    res = {}
    for v in VARIANTS:
        args = [sys.executable, __file__, "--variant", v, "--n-embd", str(a.n_embd), "--vocab", str(a.vocab),
                "--stages", a.stages, "--batch", str(a.batch), "--seq", str(a.seq)] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])
    from poelm.train.plan import activation_bytes

    est = activation_bytes(model_config(a), a.batch, a.seq, bf16=False)["total"] / 2**20
    print(f"model: stage_layers ({a.stages}), n_embd {a.n_embd}, vocab {a.vocab}, batch {a.batch}x{a.seq}; "
          f"MiB above the model + gradients")
    print(f"  {'variant':22s}{'RSS peak':>10s}{'allocator peak':>16s}{'step s':>8s}")
    for v, r in res.items():
        print(f"  {v:22s}{r['rss_mib']:10.0f}{r['alloc_mib']:16.0f}{r['step_s']:8.1f}")
    lp, lf, wp = res["local, plain head"], res["local, fused head"], res["whole, plain head"]
    print(f"  stage-by-stage / whole (plain heads): RSS {lp['rss_mib'] / wp['rss_mib']:.2f}, allocator {lp['alloc_mib'] / wp['alloc_mib']:.2f}")
    print(f"  fused / plain head (stage-by-stage):  RSS {lf['rss_mib'] / lp['rss_mib']:.2f}, allocator {lf['alloc_mib'] / lp['alloc_mib']:.2f}")
    print(f"  poelm plan's activation estimate (fp32): {est:.0f} MiB = {est / lf['alloc_mib']:.2f}x the allocator peak of 'local, fused head'")


if __name__ == "__main__":
    main()
