"""Data-parallel scaling of a training step: tokens/s on 1, 2, ... ranks, per-rank optimizer
memory (ZeRO-2), and on CUDA the model FLOPs utilisation (MFU).

Each world size W runs W processes (``torch.multiprocessing``; gloo on CPU, NCCL on CUDA with
one GPU per rank), each doing what ``poelm train`` does per micro-step on random tokens: forward
+ backward of ``model.loss`` on ``--batch`` rows, then the ZeRO-2 ``PoEOptimizer.step()``
(reduce-scatter of gradients, owned update, all-gather/broadcast of parameters). Weak scaling:
every rank takes ``--batch`` rows, so one step is ``W x batch x seq`` tokens; the step time is
the median over ``--steps`` timed steps after ``--warmup`` untimed ones.

    tokens/s   = W x batch x seq / median step time
    efficiency = tokens/s(W) / (W x tokens/s(1))
    MFU        = flops_per_token()["train_total"] x tokens/s / (W x peak FLOP/s of one device)

``train_total`` is 3x the forward FLOPs (matmuls 2 FLOPs per weight, attention at the mean causal
context seq/2: ``PoEGPT.flops_per_token``). The peak is ``--peak-flops`` or, by device name,
dense bf16: H100/H200 SXM 989e12, A100 312e12. On CPU, MFU is not printed (no meaningful peak)
and each rank runs ``--threads`` intra-op threads (default 1: W ranks then use W cores, and the
efficiency isolates the cost of the collectives; ``--threads 0`` gives each rank cores // W).

    python bench/scaling.py                              # CPU: 1 and 2 gloo ranks, small model
    python bench/scaling.py --preset d20 --worlds 1,8    # GPUs: a d20-class model in bf16

The CUDA path (NCCL, bf16 autocast, MFU) has not been run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poelm.config import OptimConfig
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train.optim import STATE_KEYS, build_optimizer

PRESETS = {
    # ~2M parameters: a CPU step of a few hundred ms, so the bench finishes in about a minute.
    "small": dict(vocab_size=2048, depth=4, n_embd=128, n_head=2, n_kv_head=1, intermediate=512, stage_layers=[2, 1, 1],
                  seq=128, batch=8),
    # nanochat's d20 shape (depth 20, width 1280, 65,536 vocab) as a K=4 PoE, GQA 2:1.
    "d20": dict(vocab_size=65536, depth=20, n_embd=1280, n_head=10, n_kv_head=5, intermediate=5120, stage_layers=[10, 4, 3, 3],
                seq=2048, batch=8),
}
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in name), None)


def worker(rank: int, world: int, port: int, a: dict, out: str):
    cuda = a["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(a["threads"] or max(1, a["cores"] // world))
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=300))
    try:
        mc = ModelConfig(**a["model"])
        model = PoEGPT(mc).to(dev)
        model.init_weights(seed=0)
        opt = build_optimizer(model, OptimConfig(), world_size=world, rank=rank)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, mc.vocab_size, (a["batch"], a["seq"] + 1), generator=g).to(dev)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        times = []
        for i in range(a["warmup"] + a["steps"]):
            if cuda:
                torch.cuda.synchronize()
            elif world > 1:
                dist.barrier()
            t = time.perf_counter()
            with ctx:
                loss, _ = model.loss(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= a["warmup"]:
                times.append(time.perf_counter() - t)
        owned = torch.tensor([opt.owned_state_numel()], dtype=torch.int64, device=dev)
        counts = [owned.clone() for _ in range(world)]
        if world > 1:
            dist.all_gather(counts, owned)
        if rank == 0:
            elem = next(model.parameters()).element_size()
            full = sum(s.param.numel() * len(STATE_KEYS[s.kind]) for s in opt.slots)
            res = {"world": world, "step_s": statistics.median(times), "owned_numel": [int(c.item()) for c in counts],
                   "full_numel": full, "elem_bytes": elem, "flops_per_token": model.flops_per_token(context=a["seq"] / 2)["train_total"],
                   "params": sum(p.numel() for p in model.parameters()),
                   "device_name": torch.cuda.get_device_name(dev) if cuda else f"CPU, {a['cores']} cores, {torch.get_num_threads()} threads/rank"}
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--worlds", default="1,2", help="comma-separated world sizes (default 1,2)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch", type=int, help="rows per rank per step (default: the preset's)")
    ap.add_argument("--seq", type=int, help="tokens per row (default: the preset's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank (0: cores // world size)")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s of one device (default: by name, bf16 dense)")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    seq, batch = a.seq or p.pop("seq"), a.batch or p.pop("batch")
    p = {k: v for k, v in p.items() if k not in ("seq", "batch")}
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args = {"model": {**p, "max_seq_len": seq}, "seq": seq, "batch": batch, "steps": a.steps, "warmup": a.warmup,
            "device": device, "cores": cores, "threads": a.threads}
    worlds = [int(w) for w in a.worlds.split(",")]
    if device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"world size {max(worlds)} needs {max(worlds)} GPUs; this machine has {torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in worlds:
            out = os.path.join(tmp, f"w{w}.json")
            mp.spawn(worker, args=(w, free_port(), args, out), nprocs=w, join=True)
            with open(out) as f:
                rows.append(json.load(f))
    r0 = rows[0]
    print(f"device: {r0['device_name']}; torch {torch.__version__}; preset {a.preset}: {r0['params'] / 1e6:.1f}M parameters, "
          f"{batch} rows x {seq} tokens per rank per step{', bf16 autocast' if device == 'cuda' else ', fp32'}")
    peak = a.peak_flops or (peak_flops(r0["device_name"]) if device == "cuda" else None)
    base = None
    print(f"{'ranks':>5} {'tokens/s':>12} {'efficiency':>10} {'optim state/rank (MiB)':>24} {'of unsharded':>12}" + ("   MFU" if peak else ""))
    for r in rows:
        tps = r["world"] * batch * seq / r["step_s"]
        base = base or tps / r["world"]
        mib = max(r["owned_numel"]) * r["elem_bytes"] / 2**20
        frac = max(r["owned_numel"]) / r["full_numel"]
        line = f"{r['world']:>5} {tps:>12,.0f} {tps / (r['world'] * base):>10.0%} {mib:>24,.2f} {frac:>12.1%}"
        if peak:
            line += f"   {r['flops_per_token'] * tps / (r['world'] * peak):.1%}"
        print(line)
    if device == "cuda" and not peak:
        print("MFU: unknown peak for this GPU; pass --peak-flops")


if __name__ == "__main__":
    main()
