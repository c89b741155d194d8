"""ZeRO-2 sharding for ``PoEOptimizer``: who owns which parameter, and the collectives.

ZeRO stage 2 (Rajbhandari et al., arXiv:1910.02054): gradients are reduced so that each rank
receives the *average* gradient only of what it owns, each rank keeps optimizer state and
computes the update only for what it owns, and the updated parameters are then sent to every
rank so all replicas agree. Three layouts, one per parameter (``Slot.layout``):

- ``whole``: the entire tensor belongs to one rank (``owner``). Used for Muon matrices, because
  Newton-Schulz orthogonalisation needs the full matrix. Gradient: ``reduce`` to the owner;
  parameter: ``broadcast`` from the owner. Matrices are assigned to ranks by greedy
  largest-first bin packing on ``numel`` (ties go to the lowest rank), which is deterministic
  given the parameter order.
- ``shard``: AdamW tensors with at least ``SHARD_MIN_NUMEL`` elements and at least
  ``world_size`` rows are split along dim 0 into ``world_size`` equal chunks of ``chunk`` rows
  (the tensor is zero-padded to ``chunk * world_size`` rows; the pad rows have zero gradient and
  zero state, so AdamW leaves them at zero). Gradient: ``reduce_scatter``; parameter:
  ``all_gather``. Elementwise AdamW on a chunk equals AdamW on the whole tensor.
- ``replicated``: small AdamW tensors (scalars, gates). Gradient: ``all_reduce``; every rank
  applies the identical update to its own copy (all-reduce results are bitwise identical on
  every rank for gloo and NCCL), so no parameter traffic is needed. Their state is replicated.

With ``world_size == 1`` every slot is owned by rank 0 and no collective is issued.

Reductions use ``SUM`` followed by a division by ``world_size`` (gloo has no ``AVG``). If the
backend lacks reduce-scatter (older gloo builds), ``Comm.reduce_scatter`` falls back to an
all-reduce of the full tensor and keeps the owned rows: a transport fallback only; gradient
*memory* is then temporarily full size, but optimizer *state* is still 1/world_size.
Only ``torch.distributed`` primitives are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from poelm.core.errors import PoelmError

WHOLE, SHARD, REPLICATED = "whole", "shard", "replicated"
# Below this many elements a tensor is cheaper to all-reduce and update redundantly than to
# shard (the same cut-off nanochat's DistAdamW uses for its small parameters).
SHARD_MIN_NUMEL = 1024


@dataclass
class Slot:
    """One parameter and where it lives across ranks."""

    index: int
    name: str
    param: torch.nn.Parameter
    group: str
    kind: str  # "muon" | "adamw"
    layout: str = REPLICATED
    owner: int = 0  # WHOLE only
    chunk: int = 0  # SHARD only: rows per rank

    def owned(self, rank: int) -> bool:
        return self.layout != WHOLE or self.owner == rank

    @property
    def rows(self) -> int:
        return self.param.shape[0]

    def row_range(self, rank: int) -> tuple[int, int]:
        """Real (unpadded) rows ``[start, stop)`` of the parameter held in ``rank``'s chunk."""
        start = min(rank * self.chunk, self.rows)
        return start, min(start + self.chunk, self.rows)

    def local_shape(self, world_size: int) -> tuple[int, ...]:
        """Shape of this rank's optimizer state (padded chunk for SHARD)."""
        if self.layout == SHARD:
            return (self.chunk, *self.param.shape[1:])
        return tuple(self.param.shape)


def assign_whole(numels: list[int], world_size: int) -> list[int]:
    """Owner rank of each matrix: largest first onto the least-loaded rank (ties: lowest rank,
    then original order), so per-rank Muon work and state are balanced and reproducible."""
    load = [0] * world_size
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += numels[i]
    return owners


def plan(slots: list[Slot], world_size: int) -> list[Slot]:
    """Fill in ``layout``/``owner``/``chunk`` of every slot for ``world_size`` ranks."""
    muon = [s for s in slots if s.kind == "muon"]
    for s, r in zip(muon, assign_whole([s.param.numel() for s in muon], world_size)):
        s.layout, s.owner = WHOLE, r
    for s in slots:
        if s.kind == "muon":
            continue
        if world_size > 1 and s.param.numel() >= SHARD_MIN_NUMEL and s.param.dim() >= 1 and s.rows >= world_size:
            s.layout, s.chunk = SHARD, -(-s.rows // world_size)
        else:
            s.layout = REPLICATED
    return slots


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` zero-padded along dim 0 to ``rows`` rows (``t`` itself when no padding is needed)."""
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


class Comm:
    """The collectives PoEOptimizer needs, on one process group; all no-ops for one rank."""

    def __init__(self, world_size: int = 1, rank: int = 0, group=None):
        self.world_size, self.rank, self.group = world_size, rank, group
        if world_size > 1:
            if not dist.is_initialized():
                raise PoelmError("world_size > 1 needs torch.distributed initialised first (dist.init_process_group)")
            if (dist.get_world_size(group), dist.get_rank(group)) != (world_size, rank):
                raise PoelmError(f"optimizer built for rank {rank} of {world_size} but the process group says rank "
                                 f"{dist.get_rank(group)} of {dist.get_world_size(group)}")
        self._rs_ok = True  # reduce-scatter available on this backend (probed on first use)

    def _global(self, r: int) -> int:
        # broadcast/reduce take global ranks; ``rank``/``owner`` are ranks within ``group``.
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # --------------------------------------------------------------------------- step helpers
    def any_rank(self, flags: list[bool], device) -> list[bool]:
        """Element-wise OR of a flag list over ranks (which parameters have a gradient
        anywhere), so every rank issues the same collectives even if a rank lacks a grad."""
        if self.world_size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return [bool(v) for v in t.tolist()]

    def reduce_grads(self, slots: list[Slot], grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Average gradients over ranks; return ``{index: owned gradient}`` (full tensor for
        WHOLE owned here and REPLICATED, this rank's padded chunk for SHARD). ``grads`` tensors
        may be overwritten (they are the ranks' local ``.grad``)."""
        if self.world_size == 1:
            return {s.index: grads[s.index] for s in slots}
        ws, out, works = self.world_size, {}, []
        for s in slots:
            g = grads[s.index]
            if s.layout == WHOLE:
                works.append(dist.reduce(g, dst=self._global(s.owner), op=dist.ReduceOp.SUM, group=self.group, async_op=True))
                if s.owner == self.rank:
                    out[s.index] = g
            elif s.layout == REPLICATED:
                works.append(dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
                out[s.index] = g
            else:
                full = pad_rows(g, s.chunk * ws)
                chunk = torch.empty(s.local_shape(ws), dtype=g.dtype, device=g.device)
                works.append(self.reduce_scatter(chunk, full))
                out[s.index] = chunk
        for w in works:
            if w is not None:
                w.wait()
        for g in out.values():
            g.div_(ws)
        return out

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor):
        """Sum ``full`` (dim 0 = world_size * chunk) over ranks, keep this rank's chunk in ``out``.
        Returns an async work handle, or None after the synchronous all-reduce fallback."""
        if self._rs_ok:
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            try:
                return fn(out, full, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            except (RuntimeError, NotImplementedError, ValueError):
                self._rs_ok = False  # transport fallback, see module docstring
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
        out.copy_(full[self.rank * out.shape[0] : (self.rank + 1) * out.shape[0]])
        return None

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def sync_params(self, slots: list[Slot], chunks: dict[int, torch.Tensor]):
        """Make every rank's parameters equal to the owners' updated values: broadcast WHOLE
        matrices from their owner, all-gather SHARD chunks (``chunks[index]``, padded)."""
        if self.world_size == 1:
            return
        works, gathered = [], []
        for s in slots:
            if s.layout == WHOLE:
                works.append(dist.broadcast(s.param.data, src=self._global(s.owner), group=self.group, async_op=True))
            elif s.layout == SHARD:
                buf = torch.empty((s.chunk * self.world_size, *s.param.shape[1:]), dtype=s.param.dtype, device=s.param.device)
                works.append(self._all_gather(buf, chunks[s.index]))
                gathered.append((s, buf))
        for w in works:
            w.wait()
        for s, buf in gathered:
            s.param.data.copy_(buf[: s.rows])

    def _all_gather(self, out: torch.Tensor, part: torch.Tensor, async_op: bool = True):
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return fn(out, part.contiguous(), group=self.group, async_op=async_op)

    # --------------------------------------------------------------------------- checkpoints
    def gather_full(self, s: Slot, local: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
        """Full-shape copy (on CPU) of a per-rank state tensor; collective on all ranks.
        Returns None on ranks with ``keep`` False (saves host memory off the writing rank)."""
        p = s.param
        if self.world_size == 1 or s.layout == REPLICATED:
            full = local
        elif s.layout == WHOLE:
            full = local if self.rank == s.owner else torch.empty(p.shape, dtype=p.dtype, device=p.device)
            dist.broadcast(full, src=self._global(s.owner), group=self.group)
        else:
            buf = torch.empty((s.chunk * self.world_size, *p.shape[1:]), dtype=local.dtype, device=local.device)
            self._all_gather(buf, local, async_op=False)
            full = buf[: s.rows]
        return full.to("cpu", copy=True) if keep else None

    def local_part(self, s: Slot, full: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of a full-shape state tensor (None where another rank owns it),
        sliced before it is moved to the parameter's device."""
        if s.layout == WHOLE and s.owner != self.rank:
            return None
        part = full
        if s.layout == SHARD:
            a, b = s.row_range(self.rank)
            part = pad_rows(full[a:b], s.chunk)
        return part.to(device=s.param.device, dtype=s.param.dtype, copy=True)
