"""``poelm plan``: the memory and time of a training run per rank, from its config alone.

The model is built on the meta device (no storage is allocated), so the card's 3B preset plans
in a second on a laptop. Per rank, in bytes:

- parameters: every rank holds the whole model in fp32 (master weights; bf16 is autocast).
- gradients: fp32 and full size on every rank: the loop's backward fills ``.grad`` of every
  parameter and the optimizer's step reduce-scatters them (poelm/train/dist.py), so ZeRO-2
  shards the *state* here, not the gradient buffers.
- optimizer state: exactly what ``PoEOptimizer`` allocates on each rank, from the same
  ``dist.plan`` layout: Muon momentum (one buffer) for the block matrices, each owned whole by
  one rank; AdamW ``exp_avg``/``exp_avg_sq`` for the rest, row-sharded (zero-padded) when large,
  replicated when small. The largest rank is reported (tested equal to a real instantiation).
- activations of the stage-by-stage local backward (``PoEGPT.backward_local``): only one stage's
  graph is alive at a time, so the peak is the largest stage's saved tensors plus the larger of
  its head phase and its backward transients (``activation_bytes``; tested within 25% of the
  peak measured on CPU by ``peak_allocated_bytes``).
- the head's chunk: the fused head (core/head.py) holds two ``[rows, V]`` fp32 buffers per chunk
  plus ``[V, d]`` weight-sized buffers (the merged head, its 1/softcap copy, dL/dW and one
  matmul result) and two ``[N, d]`` (the normed input, dL/dx).

"Fits" means the total is at most ``HEADROOM`` (90%) of the card's memory, the rest being left to
the CUDA context, NCCL buffers and allocator fragmentation; otherwise the largest
``device_batch_size`` that fits (and still divides the global batch) is suggested.

Time: FLOPs per token are ``PoEGPT.flops_per_token(seq_len=seq_len)["train_total"]`` (3x the
forward: the 6N rule plus attention over a row's mean context, ``seq_len/2`` keys, or the window's
mean on sliding-window layers, ``model.window_pattern``); a step takes ``tokens_per_step x FLOPs/token /
(world x peak x MFU)`` seconds, with the card's dense bf16 peak; the token budget is
``schedule.steps x tokens_per_step``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass

import torch

from poelm import config as config_mod
from poelm.core.errors import ConfigError
from poelm.core.head import chunk_rows
from poelm.core.model import PoEGPT
from poelm.train.dist import SHARD, WHOLE, Slot, plan as shard_plan
from poelm.train.optim import STATE_KEYS, group_of
from poelm.train.optim_nanochat import group_of_names, state_shapes_of

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes, as nvidia-smi reports the card's total
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s (vendor data sheets)


GPUS = {
    "h100": GPU("H100 SXM 80GB", 81_559 * 2**20, 989.4e12),
    "h200": GPU("H200 SXM 141GB", 143_771 * 2**20, 989.4e12),
    "a100": GPU("A100 SXM 80GB", 81_920 * 2**20, 312e12),
}


def mfu_scale(model, seq_len: int, device, world: int) -> float | None:
    """MFU per token/s of training: ``flops_per_token()["train_total"] / (ranks x dense bf16
    peak)`` (the training log's ``mfu`` = tok/s x this); None off a GPU named in ``GPUS`` (a CPU
    has no meaningful peak)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    peak = next((g.bf16_flops for k, g in GPUS.items() if k in name), None)
    return model.flops_per_token(seq_len=seq_len)["train_total"] / (world * peak) if peak else None


HEADROOM = 0.90


def _bf16(cfg) -> bool:
    """Activations under bf16 autocast (``train.dtype`` auto or bf16: a GPU run) or fp32."""
    return cfg.train.dtype != "fp32"


def layer_saved_bytes(mcfg, layer: int, bf16: bool = False) -> int:
    """Bytes per token that autograd keeps for the backward of one block.

    fp32 (counted from the forward, tested against saved-tensor hooks and the CPU peak): the
    block's input and the x0-mixed stream, the two norms' outputs, q (rotary reads its halves), q
    and k after rotary and after QK-norm, the attention output and its contiguous copy, the
    residual after attention: 8 x ``n_embd``; k, rotary k, normed k and v: 3 x ``kv_dim`` (plus
    the norm statistics ``2 + 2 n_head + n_kv_head``); relu and its square: 2 x
    ``intermediate``; 4 bytes each. A value-embedding layer adds its embedding row and the gate
    (``kv_dim + 3 n_kv_head``).

    bf16 autocast (an analysis of the same forward, not measured here: CPU runs are fp32): the
    residual stream, the norms' inputs and the rotary outputs stay fp32 (the parameters and the
    rotary tables are fp32), the matmul inputs are saved as their bf16 casts and the matmul and
    attention outputs are bf16: ``28 n_embd + 10 kv_dim + 4 intermediate`` bytes, the value
    embedding row fp32."""
    d, kvd, H, G = mcfg.n_embd, mcfg.kv_dim, mcfg.n_head, mcfg.n_kv_head
    stats = 4 * (2 + 2 * H + G)
    if bf16:
        n = 28 * d + 10 * kvd + 4 * mcfg.intermediate + stats
    else:
        n = 4 * (8 * d + 3 * kvd + 2 * mcfg.intermediate) + stats
    if mcfg.has_value_embed(layer):
        n += 4 * (kvd + 3 * G)
    return n


def activation_bytes(mcfg, rows: int, seq_len: int, bf16: bool = False) -> dict:
    """Peak activation memory of ``backward_local`` on ``rows x seq_len`` tokens, in bytes.

    ``saved``: the largest stage's saved tensors (``layer_saved_bytes``; plus the shared x0 for
    stages after the first); ``head``: the fused head's phase: two ``[rows, V]`` fp32 chunk
    buffers (plus the bf16 matmul output under autocast), four ``[V, d]`` fp32 tensors (the merged
    head, its 1/softcap copy, dL/dW, one matmul result; bf16 casts add 6 bytes per element) and
    two ``[N, d]`` fp32 (the normed input, dL/dx); ``backward``: the transients of a block's
    backward (about four ``[N, intermediate]`` and two fp32 ``[N, n_embd]``). Peak = saved +
    max(head, backward)."""
    N = rows * seq_len
    d, V = mcfg.n_embd, mcfg.vocab_size
    per_stage = []
    for k in range(mcfg.n_stages):
        a, b = mcfg.stage_bounds(k)
        per_stage.append(N * (sum(layer_saved_bytes(mcfg, i, bf16) for i in range(a, b)) + (4 * d if k > 0 else 0)))
    largest = max(range(mcfg.n_stages), key=lambda k: per_stage[k])
    r = chunk_rows(N, V, d)
    chunk = r * V * (10 if bf16 else 8)
    head_fixed = V * d * (22 if bf16 else 16) + 8 * N * d
    backward = N * (4 * mcfg.intermediate * (2 if bf16 else 4) + 8 * d)
    total = per_stage[largest] + max(chunk + head_fixed, backward)
    return {"stage": largest, "saved": per_stage[largest], "chunk": chunk, "chunk_rows": r, "head": chunk + head_fixed,
            "backward": backward, "total": total}


def optimizer_state_numel(model: torch.nn.Module, world: int, objective: str = "poe", optimizer: str = "nanochat") -> list[int]:
    """Optimizer-state elements each rank allocates: the ``_state`` shapes of ``optimizer``'s
    class (``"poelm"``: one Muon momentum / two AdamW moments of the parameter's shape;
    ``"nanochat"``: Muon adds a factored second moment) on the ``dist.plan`` layout
    (``owned_state_numel`` of a real optimizer after its first step). Under ``objective = "bp"``
    the stage heads before the last get no gradient, hence no state."""
    if optimizer == "nanochat":
        where = group_of_names({n: tuple(p.shape) for n, p in model.named_parameters()})
        slots = [Slot(i, n, p, *where[n]) for i, (n, p) in enumerate(model.named_parameters())]
        shapes = lambda s: state_shapes_of(s.kind, s.param.shape)  # noqa: E731
    else:
        slots = [Slot(i, n, p, *group_of(n)) for i, (n, p) in enumerate(model.named_parameters())]
        shapes = lambda s: {k: s.param.shape for k in STATE_KEYS[s.kind]}  # noqa: E731
    shard_plan(slots, world)
    K = model.config.n_stages
    idle = {f"stage_heads.{k}.weight" for k in range(K - 1)} if objective == "bp" else set()
    per_rank = [0] * world
    for s in slots:
        if s.name in idle:
            continue
        numel = sum(math.prod(s.local_shape(world) if s.layout == SHARD else shape) for shape in shapes(s).values())
        for r in range(world):
            if s.layout != WHOLE or s.owner == r:
                per_rank[r] += numel
    return per_rank


def _validate(cfg, world, gpu: str, mfu) -> GPU:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ConfigError(f"--world must be a positive integer, got {world!r}")
    if gpu.lower() not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}: use one of {', '.join(GPUS)}")
    if not (isinstance(mfu, (int, float)) and math.isfinite(mfu) and 0 < mfu <= 1):
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu!r}")
    t = cfg.train
    micro = t.device_batch_size * cfg.seq_len * world
    if t.tokens_per_step and t.tokens_per_step % micro:
        rows = t.tokens_per_step // cfg.seq_len
        raise ConfigError(f"global batch train.tokens_per_step = {t.tokens_per_step} ({rows} rows of {cfg.seq_len}) does not split over "
                          f"{world} ranks x train.device_batch_size {t.device_batch_size}: use a world size dividing {rows // t.device_batch_size}")
    return GPUS[gpu.lower()]


def plan(cfg, world: int, gpu: str = "h100", mfu: float = 0.4) -> dict:
    """Memory per rank and time of ``cfg`` on ``world`` GPUs (see the module docstring)."""
    card = _validate(cfg, world, gpu, mfu)
    with torch.device("meta"):
        model = PoEGPT(cfg.model)
    mc, t = cfg.model, cfg.train
    n_params = sum(p.numel() for p in model.parameters())
    state = optimizer_state_numel(model, world, mc.objective, cfg.optim.optimizer)
    bf16 = _bf16(cfg)
    act = activation_bytes(mc, t.device_batch_size, cfg.seq_len, bf16)
    tokens_per_step = t.tokens_per_step or t.device_batch_size * cfg.seq_len * world
    accum = tokens_per_step // (t.device_batch_size * cfg.seq_len * world)
    mem = {"parameters": 4 * n_params, "gradients": 4 * n_params, "optimizer_state": 4 * max(state),
           "activations": act["saved"] + max(0, act["backward"] - act["head"]), "head_chunk": act["head"]}
    total = sum(mem.values())
    fits = total <= HEADROOM * card.memory
    suggestion = None
    if not fits:
        fixed = total - act["total"]
        for b in range(t.device_batch_size - 1, 0, -1):
            if tokens_per_step % (b * cfg.seq_len * world) == 0 or not t.tokens_per_step:
                if fixed + activation_bytes(mc, b, cfg.seq_len, bf16)["total"] <= HEADROOM * card.memory:
                    suggestion = b
                    break
    flops = model.flops_per_token(seq_len=cfg.seq_len)
    step_s = tokens_per_step * flops["train_total"] / (world * card.bf16_flops * mfu)
    steps = cfg.schedule.steps
    return {"world": world, "gpu": card, "mfu": mfu, "dtype": "bf16 autocast" if bf16 else "fp32", "n_params": n_params, "params": model.param_count(),
            "state_per_rank": [4 * s for s in state], "memory": mem, "total": total, "fits": fits, "suggestion": suggestion,
            "activation": act, "tokens_per_step": tokens_per_step, "accum": accum, "flops_per_token": flops["train_total"],
            "step_s": step_s, "steps": steps, "budget_tokens": steps * tokens_per_step, "budget_s": steps * step_s,
            "device_batch_size": t.device_batch_size, "seq_len": cfg.seq_len, "vocab": mc.vocab_size,
            "stage_layers": list(mc.stage_layers), "windows": mc.window_sizes()}


def _gib(b: float) -> str:
    return f"{b / GiB:8.2f} GiB"


def _count(n: float) -> str:
    for unit, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= v:
            return f"{n / v:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(p: dict, config_name: str) -> str:
    g, m, a, pc = p["gpu"], p["memory"], p["activation"], p["params"]
    st = p["state_per_rank"]
    stage_layers = p["stage_layers"]
    usable = HEADROOM * g.memory
    lines = [
        f"plan: {config_name} on {p['world']} x {g.name}, MFU {p['mfu']:g}, activations in {p['dtype']}",
        f"model: {_count(p['n_params'])} parameters (blocks {_count(pc['blocks'])}, embedding {_count(pc['embedding'])}, "
        f"value embeddings {_count(pc['value_embeds'])}, heads {_count(pc['lm_head'] + pc['stage_heads'])}), "
        f"K={len(stage_layers)} stages {tuple(stage_layers)}",
        f"batch: {p['tokens_per_step']:,} tokens per step = {p['world']} ranks x {p['accum']} micro-steps (accumulation) x "
        f"{p['device_batch_size']} rows x {p['seq_len']}",
        "memory per rank:",
        f"  parameters (fp32, replicated)          {_gib(m['parameters'])}",
        f"  gradients (fp32, full until the step)  {_gib(m['gradients'])}",
        f"  optimizer state (ZeRO-2 shard)         {_gib(m['optimizer_state'])}   (largest rank; smallest {min(st) / GiB:.2f} GiB)",
        f"  activations, stage {a['stage']} (largest)        {_gib(m['activations'])}   ("
        + (f"saved tensors of its {p['stage_layers'][a['stage']]} layers" if a["backward"] <= a["head"] else
           f"saved {a['saved'] / GiB:.2f} GiB of its {p['stage_layers'][a['stage']]} layers + backward transients") + ")",
        f"  head / logit chunk                     {_gib(m['head_chunk'])}   ({a['chunk_rows']} positions x {p['vocab']:,} logits per chunk, "
        f"plus [V, d] and [N, d] buffers)",
        f"  total                                  {_gib(p['total'])}   of {g.memory / GiB:.1f} GiB ({usable / GiB:.1f} GiB usable at {HEADROOM:.0%}): "
        + ("fits" if p["fits"] else (f"does not fit, try device_batch_size={p['suggestion']}" if p["suggestion"]
                                    else "does not fit even at device_batch_size=1: use more ranks or a smaller model")),
        f"compute: {p['flops_per_token']:.3g} FLOPs per token (training, 3x forward{_window_note(p)}); one step {_duration(p['step_s'])} at MFU {p['mfu']:g} "
        f"({g.bf16_flops / 1e12:.0f} TFLOP/s dense bf16 per GPU)",
        f"budget: {p['steps']:,} steps x {p['tokens_per_step']:,} tokens = {_count(p['budget_tokens'])} tokens: {_duration(p['budget_s'])}",
    ]
    return "\n".join(lines)


def _window_note(p) -> str:
    """``, S layers attend within W keys`` when the model has sliding-window layers."""
    short = sorted({w for w in p["windows"] if w < p["seq_len"] - 1})
    return f", {sum(w in short for w in p['windows'])} sliding-window layers of {'/'.join(map(str, short))} keys" if short else ""


def run_plan(config_path: str, world: int, gpu: str = "h100", mfu: float = 0.4, overrides=None) -> str:
    """Load and validate the config, plan it, and return the printed text."""
    cfg = config_mod.load(config_path, overrides or [])
    return format_plan(plan(cfg, world, gpu, mfu), config_path)


# ----------------------------------------------------------------------------- measuring
def peak_allocated_bytes(fn) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs, above what was allocated
    when it started: the running "Total Allocated" of torch.profiler's memory events (every
    allocation and free of the c10 CPU allocator, in order). Unlike the process RSS it counts
    only tensors (no malloc caching or fragmentation, no interpreter), so it is the quantity the
    activation estimate models, and it is exact and repeatable."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    if not mem:
        return 0
    base = mem[0][1] - mem[0][2]
    return max(0, max(m[1] for m in mem) - base)
