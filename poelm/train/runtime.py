"""Where a run executes: device, autocast dtype, and (under ``torchrun``) the process group.

Rank, world size and local rank come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); NCCL on CUDA, gloo on CPU. Small collectives used by the loop live here too.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

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
        if device.type == "cuda":  # device_id binds the communicator to this GPU (eager NCCL init)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        owns = True
    dt = cfg.train.dtype
    if dt == "auto":
        dt = "bf16" if device.type == "cuda" else "fp32"
    return Runtime(rank, world, local_rank, device, torch.bfloat16 if dt == "bf16" else torch.float32, owns)


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
