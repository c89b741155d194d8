"""Where a run executes: device, autocast dtype, and (under ``torchrun``) the process group.

Rank, world size and local rank come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); NCCL on CUDA, gloo on CPU. Small collectives used by the loop live here too.

``POELM_DIST_TIMEOUT`` (seconds) bounds how long a collective waits for the other ranks before
the process fails with an error instead of waiting on (torch's defaults: 30 min for gloo, 10 min
for NCCL). A rank whose peer process died usually fails at once (the connection closes); the
timeout covers a peer that hangs or a network that drops silently. Keep it above the longest
stretch one rank works alone while the others wait: rank 0's checkpoint save (all ranks meet at a
barrier after it) and, on a fresh run, its tokenizer training. Tested over loopback with 2 nodes
(tests/train/test_multinode.py).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from poelm.core.errors import ConfigError


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # autocast dtype (fp32 = no autocast)
    owns_group: bool = False  # this process initialised torch.distributed (and tears it down)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(cfg) -> Runtime:
    """Device, dtype and (under torchrun) the process group.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT from its rendezvous
    flags); the process group uses the ``env://`` defaults: NCCL when the device is CUDA (one GPU
    per process, ``cuda:LOCAL_RANK``), gloo otherwise. Without torchrun: one process, no group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available; use --device cpu")
        device = torch.device(f"cuda:{local_rank}") if want == "cuda" else torch.device(want)
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    owns = False
    if world > 1 and not dist.is_initialized():
        timeout = dist_timeout()
        kw = {"timeout": timeout} if timeout is not None else {}
        if device.type == "cuda":  # device_id binds the communicator to this GPU (eager NCCL init)
            dist.init_process_group(backend="nccl", device_id=device, **kw)
        else:
            dist.init_process_group(backend="gloo", **kw)
        owns = True
    dt = cfg.train.dtype
    if dt == "auto":
        dt = "bf16" if device.type == "cuda" else "fp32"
    return Runtime(rank, world, local_rank, device, torch.bfloat16 if dt == "bf16" else torch.float32, owns)


def dist_timeout() -> timedelta | None:
    """``$POELM_DIST_TIMEOUT`` seconds as the process group's timeout (None: torch's default)."""
    raw = os.environ.get("POELM_DIST_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        sec = float(raw)
    except ValueError:
        sec = float("nan")
    if not sec > 0 or sec == float("inf"):
        raise ConfigError(f"POELM_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=sec)


def peer_failure(exc: BaseException) -> str | None:
    """One line for an error a collective raised because another rank died, hung past the
    timeout, or the network failed (None for any other error, which keeps its traceback).

    gloo reports a dead peer as ``RuntimeError: [.../pair.cc:553] Connection closed by peer ...``
    and a silent one as ``Timed out waiting 20000ms for recv operation``; NCCL and the c10d store
    raise ``torch.distributed.DistError`` subclasses."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    text = str(exc).strip()
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out")
    if world <= 1 or not (isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in markers)):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    if first.startswith("[") and "] " in first:  # drop gloo's "[path/file.cc:line] " prefix
        first = first.split("] ", 1)[1]
    first = first.split(". ")[0].rstrip(".")
    t = dist_timeout()
    limit = f"POELM_DIST_TIMEOUT={t.total_seconds():g} s" if t is not None else "torch's default timeout; set POELM_DIST_TIMEOUT to shorten it"
    return (f"rank {os.environ.get('RANK', '?')} of {world} lost the other ranks ({first}): a process or node of this job died, "
            f"hung or lost the network ({limit}); saved checkpoints are intact: restart every node with --resume RUN_DIR")


def teardown_runtime(rt: Runtime) -> None:
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _broadcast_text(text: str | None, rt: Runtime) -> str:
    """Rank 0's ``text`` on every rank (as a uint8 tensor: no pickling, no shared filesystem)."""
    if rt.world == 1:
        return text
    n = torch.tensor([len(text.encode("utf-8")) if rt.master else 0], dtype=torch.int64, device=rt.device)
    dist.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=rt.device)
    if rt.master:
        buf.copy_(torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes().decode("utf-8")


def _all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- evaluation processes
def pick_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    return str(device)


def join_group(device: str) -> str:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group with ``runtime.setup_runtime``
    (gloo on CPU, NCCL on CUDA; ``cuda`` becomes ``cuda:LOCAL_RANK``) unless one exists; returns
    the device to load on. The group then lives until the process exits, so several targets of
    one ``poelm measure`` share it; ``runtime.teardown_runtime`` runs at exit."""
    import atexit
    from types import SimpleNamespace

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or (dist.is_initialized() and dist.get_world_size() > 1):
        return device
    rt = setup_runtime(SimpleNamespace(train=SimpleNamespace(device=device, dtype="fp32")))
    if rt.owns_group:
        atexit.register(teardown_runtime, rt)
    return str(rt.device)


# ----------------------------------------------------------------------------- RNG states (exact resume)
def rng_states(rt: Runtime | None) -> dict:
    """Every rank's generator states, for a checkpoint's ``rng.safetensors`` (a collective under
    torch.distributed: each rank calls it, rank 0 gets them all).

    ``cpu`` / ``cuda{i}``: rank 0's CPU state and its CUDA state of every visible device (the
    layout checkpoints always had); ``cpu_rank{r}`` / ``cuda_rank{r}``: rank r's CPU state and
    that of its own device (``cuda:LOCAL_RANK``), which is the generator rank r's kernels draw from.
    A process's CUDA generator lives in that process, so rank 0 cannot read rank r's: each rank
    sends its own (``all_gather``; every rank's state has the same size)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    world = rt.world if rt is not None else 1
    own = {"cpu": out["cpu"]}
    if rt is not None and rt.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(rt.device)
    for kind, state in own.items():
        if world == 1:
            out[f"{kind}_rank0"] = state.clone()  # safetensors stores no shared tensors
            continue
        dev = rt.device if rt.device.type == "cuda" else torch.device("cpu")  # NCCL moves device tensors only
        parts = [torch.empty_like(state, device=dev) for _ in range(world)]
        dist.all_gather(parts, state.to(dev))
        for r, p in enumerate(parts):
            out[f"{kind}_rank{r}"] = p.cpu()
    return out


def restore_rng(rng: dict | None, rt: Runtime | None) -> list[str]:
    """Set this rank's generators from a checkpoint's states (``rng_states``); returns the keys
    used. Rank r takes ``cpu_rank{r}`` and, on a GPU, ``cuda_rank{r}`` onto its device; a
    checkpoint written before per-rank states (or by another world size) falls back to ``cpu``
    and ``cuda{device index}``. A CUDA state with no GPU here (a GPU run resumed on CPU) is not
    used: CPU kernels never draw from it."""
    if not rng:
        return []
    rank = rt.rank if rt is not None else 0
    used = []
    cpu = f"cpu_rank{rank}" if f"cpu_rank{rank}" in rng else "cpu"
    if cpu in rng:
        torch.set_rng_state(rng[cpu])
        used.append(cpu)
    dev = rt.device if rt is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        key = next((k for k in (f"cuda_rank{rank}", f"cuda{index}") if k in rng), None)
        if key is not None:
            torch.cuda.set_rng_state(rng[key], dev)
            used.append(key)
    return used


# ----------------------------------------------------------------------------- torch.compile
COMPILE_MODES = ("model", "blocks")


def compile_mode(setting, device) -> str | None:
    """``train.compile`` resolved for ``device``: ``"auto"`` is ``"model"`` on CUDA and off
    elsewhere (on CPU inductor's C++ compile takes longer than the short runs it would speed up);
    ``true`` is ``"model"``; ``false`` off."""
    if setting == "auto":
        return "model" if torch.device(device).type == "cuda" else None
    if setting is True:
        return "model"
    return setting or None


def apply_compile(model, mode: str | None) -> None:
    """``torch.compile`` the trunk in place; parameter names, state_dict keys, checkpoints, the
    optimizer groups and exports are unchanged, and the numbers equal eager ones to fp32 rounding.

    ``"model"``: each stage as one graph (nanochat compiles its whole model; under local
    learning ``backward_local`` runs stage by stage, so a stage, blocks, x0 mixing and masks, is
    the largest piece a graph can hold): ``model.run_stage`` is replaced by its compiled version,
    specialised per stage index (K graphs, times train / eval). ``"blocks"``: every block
    compiled alone (``nn.Module.compile``), the setting before ``"model"`` existed. The fused
    stage head (core/head.py) stays eager in both: it computes its gradients chunk by chunk."""
    if mode is None:
        return
    if mode == "blocks":
        for block in model.blocks:
            block.compile()
        return
    import torch._dynamo

    # one specialisation per stage and grad mode (training, evaluation): K x 2 entries in all
    need = 2 * model.config.n_stages + 2
    for name in ("recompile_limit", "cache_size_limit"):  # recompile_limit from torch 2.6 on
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), need))
            break
    model.run_stage = torch.compile(model.run_stage)
