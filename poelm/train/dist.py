"""ZeRO-2 sharding for poelm's optimizers: who owns which parameter, the collectives, and the
engine (``ShardedOptimizer``) that ``PoEOptimizer`` (optim.py) and ``NanochatOptimizer``
(optim_nanochat.py) share; they differ only in groups, update rules and state shapes.

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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from poelm.core.errors import CheckpointError, PoelmError

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
    def gather_full(self, s: Slot, local: torch.Tensor | None, keep: bool, shape: tuple | None = None) -> torch.Tensor | None:
        """Full-shape copy (on CPU) of a per-rank state tensor; collective on all ranks.
        Returns None on ranks with ``keep`` False (saves host memory off the writing rank).
        ``shape``: the state tensor's full shape when it is not the parameter's (WHOLE only)."""
        p = s.param
        if self.world_size == 1 or s.layout == REPLICATED:
            full = local
        elif s.layout == WHOLE:
            full = local if self.rank == s.owner else torch.empty(shape or p.shape, dtype=p.dtype, device=p.device)
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


# ----------------------------------------------------------------------------- the optimizer engine
class ShardedOptimizer:
    """The ZeRO-2 engine of poelm's optimizers: parameter slots on the ``plan`` layout, the step
    (average, clip, update what this rank owns, share), and world-size independent checkpoints.

    A subclass names the groups (``_make_groups``, ``_group_of``: ``(group, "muon" | "adamw")``),
    the state tensors (``state_shapes``), the update rules (``_muon_step``, ``_adamw_step``) and
    the checkpoint ``_meta``. Usage per step: backward on every rank (each on its own micro-batch,
    loss averaged as for one process), then ``set_lrm(lrm)``, ``step()``, ``zero_grad()``.
    ``step()`` averages the gradients over ranks itself: do not wrap the model in DDP."""

    STATE_FORMAT = ""
    NAME = ""

    def __init__(self, model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None):
        self.groups = self._make_groups(optim_cfg, model)
        self.grad_clip = float(getattr(optim_cfg, "grad_clip", 0.0) or 0.0)
        slots = [Slot(i, n, p, *self._group_of(n)) for i, (n, p) in enumerate(model.named_parameters())]
        for s in slots:
            if s.kind == "muon" and s.param.dim() != 2:
                raise PoelmError(f"Muon parameter {s.name} has shape {tuple(s.param.shape)}: Muon needs a 2-D matrix")
        self.slots = plan(slots, world_size)
        self.world_size, self.rank = world_size, rank
        self.comm = Comm(world_size, rank, process_group)
        self.device = slots[0].param.device
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # owned state only, by slot index
        self.param_steps = [0] * len(slots)  # AdamW bias-correction counts (replicated on all ranks)
        self.step_count = 0
        self.set_lrm(1.0)

    # ------------------------------------------------------------------------- subclass hooks
    def _make_groups(self, optim_cfg, model) -> dict:
        """``{group name: object with base_lr and lr}``."""
        raise NotImplementedError

    def _group_of(self, name: str) -> tuple[str, str]:
        raise NotImplementedError

    def state_shapes(self, s: Slot) -> dict[str, tuple]:
        """Full (unsharded) shape of each optimizer-state tensor of slot ``s``."""
        raise NotImplementedError

    def _muon_step(self, s: Slot, g: torch.Tensor, grp, st: dict):
        raise NotImplementedError

    def _adamw_step(self, target: torch.Tensor, g: torch.Tensor, grp, st: dict, step: int):
        raise NotImplementedError

    def _meta(self) -> dict:
        raise NotImplementedError

    def _local_shape(self, s: Slot, full: tuple) -> tuple:
        # Only AdamW tensors are row-sharded, and their state has the parameter's shape.
        return s.local_shape(self.world_size) if s.layout == SHARD else tuple(full)

    # ------------------------------------------------------------------------- hyper-parameters
    def set_lrm(self, lrm: float, step: int | None = None, phase=None):
        """Effective lr of every group = its base lr x ``lrm`` (the schedule's multiplier).
        ``step``/``phase`` (the loop's global step and phase) are for subclasses whose other
        hyper-parameters follow the schedule; Muon momentum here follows the step count."""
        self.lrm = float(lrm)
        for g in self.groups.values():
            g.lr = g.base_lr * self.lrm

    def zero_grad(self, set_to_none: bool = True):
        for s in self.slots:
            if s.param.grad is not None:
                if set_to_none:
                    s.param.grad = None
                else:
                    s.param.grad.zero_()

    # ------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, skip=None) -> torch.Tensor:
        """Average gradients over ranks, clip (if configured), update the owned parameters and
        state, share the result. Returns the global L2 norm of the averaged gradient (before
        clipping) as a 0-d fp32 tensor. Parameters without a gradient on every rank are skipped.
        ``skip``: a predicate of that norm (``train/spikes.py``); when it says True nothing is
        updated (parameters, state, step counts), as if the step had not been taken."""
        has = self.comm.any_rank([s.param.grad is not None for s in self.slots], self.device)
        active = [s for s, h in zip(self.slots, has) if h]
        grads = {s.index: s.param.grad if s.param.grad is not None else torch.zeros_like(s.param) for s in active}
        owned = self.comm.reduce_grads(active, grads)
        norm = self._global_norm(active, owned)
        if skip is not None and skip(norm):
            return norm
        coef = None
        if self.grad_clip > 0:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        chunks = {}
        for s in active:
            self.param_steps[s.index] += 1
            g = owned.get(s.index)
            if g is None:
                continue
            if coef is not None:
                g = g * coef.to(g.device, g.dtype)
            grp, st = self.groups[s.group], self._state(s)
            if s.kind == "muon":
                self._muon_step(s, g, grp, st)
                continue
            if s.layout == SHARD:
                a, b = s.row_range(self.rank)
                target = torch.zeros(s.local_shape(self.world_size), dtype=s.param.dtype, device=s.param.device)
                target[: b - a] = s.param.data[a:b]
                chunks[s.index] = target
            else:
                target = s.param.data
            self._adamw_step(target, g, grp, st, self.param_steps[s.index])
        self.comm.sync_params(active, chunks)
        self.step_count += 1
        return norm

    def _state(self, s: Slot) -> dict[str, torch.Tensor]:
        st = self.state.get(s.index)
        if st is None:
            st = {k: torch.zeros(self._local_shape(s, shape), dtype=s.param.dtype, device=s.param.device)
                  for k, shape in self.state_shapes(s).items()}
            self.state[s.index] = st
        return st

    def _global_norm(self, active: list[Slot], owned: dict[int, torch.Tensor]) -> torch.Tensor:
        # Each element counted once: WHOLE on its owner, SHARD chunks (pad rows are zero) on every
        # rank, REPLICATED tensors (identical everywhere) on rank 0 only.
        parts = [owned[s.index].float().square().sum() for s in active
                 if s.index in owned and (s.layout != REPLICATED or self.rank == 0)]
        sq = torch.stack(parts).sum() if parts else torch.zeros((), device=self.device)
        return self.comm.all_reduce_sum(sq.to(self.device, torch.float32)).sqrt()

    # ------------------------------------------------------------------------- accounting
    def owned_state_numel(self) -> int:
        """Optimizer-state elements held by this rank (SHARD chunks counted with their padding)."""
        return sum(t.numel() for st in self.state.values() for t in st.values())

    def unsharded_state_numel(self) -> int:
        """Optimizer-state elements of the whole model on one rank (what ZeRO-2 divides)."""
        return sum(math.prod(shape) for s in self.slots for shape in self.state_shapes(s).values())

    def layout(self) -> list[dict]:
        """Where every parameter lives: name, group, layout, owner rank / rows per rank."""
        return [dict(name=s.name, group=s.group, layout=s.layout, owner=s.owner if s.layout == WHOLE else None,
                     chunk=s.chunk if s.layout == SHARD else None) for s in self.slots]

    # ------------------------------------------------------------------------- checkpoints
    def full_state_dict(self, all_ranks: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """World-size independent state: ``({"<param>/<key>": full-shape CPU tensor}, meta)``.

        A collective: call it on every rank. The tensors are returned on rank 0 (on every rank
        with ``all_ranks``); elsewhere the dict is empty. ``meta`` (json-able) holds the step
        counts, lrm and group hyper-parameters. Parameters never stepped have no state entry."""
        keep = all_ranks or self.rank == 0
        tensors = {}
        for s in self.slots:
            if self.param_steps[s.index] == 0:
                continue
            st = self.state.get(s.index, {})
            for key, shape in self.state_shapes(s).items():
                full = self.comm.gather_full(s, st.get(key), keep, shape)
                if keep:
                    tensors[f"{s.name}/{key}"] = full
        return tensors, self._meta()

    def load_full_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        """Load a ``full_state_dict`` saved at any world size; each rank keeps what it owns here.
        Base lrs come from this optimizer's config (a new phase may change them); the step
        counts and lrm come from ``meta``. Raises CheckpointError on a mismatched model."""
        if not isinstance(meta, dict) or meta.get("format") != self.STATE_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(f"optimizer state has format {got!r}, expected {self.STATE_FORMAT!r}: not a checkpoint of this "
                                  f"optimizer (optim.optimizer = {self.NAME!r})")
        params = meta.get("params", {})
        names = {s.name for s in self.slots}
        for n in sorted(set(params) ^ names):
            where = "the checkpoint" if n in params else "this model"
            raise CheckpointError(f"optimizer state and model disagree: parameter {n!r} exists only in {where} (different architecture?)")
        expected = set()
        for s in self.slots:
            rec = params[s.name]
            if rec["group"] != s.group or list(rec["shape"]) != list(s.param.shape):
                raise CheckpointError(f"optimizer state for {s.name} is group {rec['group']} shape {rec['shape']}, "
                                      f"model has group {s.group} shape {list(s.param.shape)}")
            if rec["step"] > 0:
                expected |= {f"{s.name}/{k}" for k in self.state_shapes(s)}
        if set(tensors) != expected:
            bad = sorted(set(tensors) ^ expected)[0]
            what = "unexpected" if bad in tensors else "missing"
            raise CheckpointError(f"optimizer state tensor {bad!r} is {what}: the state tensors do not match their meta")
        state = {}
        for s in self.slots:
            if params[s.name]["step"] == 0:
                continue
            st = {}
            for key, shape in self.state_shapes(s).items():
                t = tensors[f"{s.name}/{key}"]
                if tuple(t.shape) != shape:
                    raise CheckpointError(f"optimizer state {s.name}/{key} has shape {tuple(t.shape)}, expected {shape} "
                                          f"for parameter shape {tuple(s.param.shape)}")
                part = self.comm.local_part(s, t)
                if part is not None:
                    st[key] = part
            if st:
                state[s.index] = st
        self.state = state
        self.param_steps = [int(params[s.name]["step"]) for s in self.slots]
        self.step_count = int(meta["step"])
        self.set_lrm(meta.get("lrm", 1.0))
        self._load_hyper(meta)

    def _load_hyper(self, meta: dict):
        """Schedule-driven hyper-parameters beyond lrm restored from ``meta`` (subclass hook)."""

    def state_dict(self) -> dict:
        """This rank's own (sharded) state, valid only for the same world size and rank; use
        ``full_state_dict`` for checkpoints that must survive a change of world size."""
        local = {f"{s.name}/{k}": t for s in self.slots for k, t in self.state.get(s.index, {}).items()}
        return {"world_size": self.world_size, "rank": self.rank, "meta": self._meta(), "state": local}

    def load_state_dict(self, sd: dict):
        if sd.get("world_size") != self.world_size or sd.get("rank") != self.rank:
            raise CheckpointError(f"optimizer state_dict is for rank {sd.get('rank')} of {sd.get('world_size')}, this is rank "
                                  f"{self.rank} of {self.world_size}: use load_full_state_dict to reshard")
        meta, by_name = sd["meta"], {s.name: s for s in self.slots}
        state = {}
        for key, t in sd["state"].items():
            name, k = key.rsplit("/", 1)
            s = by_name.get(name)
            full = self.state_shapes(s).get(k) if s is not None else None
            if full is None or tuple(t.shape) != self._local_shape(s, full):
                raise CheckpointError(f"optimizer state_dict entry {key!r} does not fit this model")
            state.setdefault(s.index, {})[k] = t.to(s.param.device, s.param.dtype).clone()
        self.state = state
        self.param_steps = [int(meta["params"][s.name]["step"]) for s in self.slots]
        self.step_count = int(meta["step"])
        self.set_lrm(meta.get("lrm", 1.0))
        self._load_hyper(meta)
