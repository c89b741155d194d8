"""Muon for the blocks' matrices, AdamW for everything else, optionally ZeRO-2 sharded.

Parameter groups (every PoEGPT parameter lands in exactly one; an unknown name is an error, so
a new model parameter cannot silently go untrained):

=============  ======  ==================================================  ==================
group          rule    parameters                                           lr (x lrm)
=============  ======  ==================================================  ==================
matrix         Muon    blocks.*.attn.c_q/c_k/c_v/c_proj, blocks.*.mlp.*     matrix_lr
embedding      AdamW   wte, value_embeds.*                                  embedding_lr
unembedding    AdamW   lm_head, stage_heads.*                               unembedding_lr
gate           AdamW   blocks.*.attn.ve_gate                                matrix_lr
resid          AdamW   resid_lambdas                                        0.01 x scalar_lr
x0             AdamW   x0_lambdas                                           scalar_lr
=============  ======  ==================================================  ==================

Design choices where SPEC is silent:
- ``resid_lambdas`` use ``0.01 x scalar_lr`` as nanochat does: they multiply the whole residual
  stream at every layer, so Adam's ~lr-sized first steps (0.5 from an init of 1.0) would be
  destabilising. ``x0_lambdas`` use ``scalar_lr``.
- ``ve_gate`` (an ``[n_kv_head, 32]`` matrix, zero-initialised) uses AdamW at ``matrix_lr``: Muon
  on a 2 x 32 matrix orthogonalises only two rows, and at ``scalar_lr`` (0.5) each step would move
  a gate logit by ~0.5 * sqrt(32), saturating the sigmoid at once.
- ``weight_decay`` (decoupled, ``p *= 1 - lr * wd``) applies to the Muon matrices and to the
  embedding/unembedding groups, never to scalars and gates (decaying a residual gain to zero is
  not a regulariser). LRs are used as configured; there is no ``1/sqrt(d_model/768)`` rescaling.
- Muon momentum warms up linearly from ``muon_momentum_start`` (0.85) to ``muon_momentum`` over
  the first ``muon_momentum_warmup`` (300) optimizer steps, as nanochat's ``get_muon_momentum``;
  both are read from the OptimConfig when present (``muon_momentum_warmup = 0`` disables it).
  The step count is part of the checkpointed state, so a resumed run does not re-warm.
- ``grad_clip > 0`` clips the *global* norm of the averaged gradient (computed on the owned
  pieces and all-reduced, so it is the same number for any world size); ``step()`` returns that
  pre-clip norm as a 0-d tensor, so the training loop must not clip by itself.

Distributed (``world_size > 1``): ZeRO-2 as laid out in ``poelm/train/dist.py`` (Muon matrices owned
whole by one rank, large AdamW tensors sharded by rows, small ones all-reduced); checkpoints go
through ``full_state_dict``/``load_full_state_dict``, which are independent of the world size.

Muon (Keller Jordan, kellerjordan.github.io/posts/muon; nanochat ``muon.py``): SGD-momentum with
Nesterov, then the update is replaced by the nearest semi-orthogonal matrix computed by a
quintic Newton-Schulz iteration, scaled by ``max(1, rows/cols) ** 0.5``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from poelm.train.dist import REPLICATED, SHARD, WHOLE, Comm, Slot, plan
from poelm.core.errors import CheckpointError, PoelmError

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steep at 0, lands in ~[0.7, 1.2]
RESID_LR_SCALE = 0.01
MOMENTUM_START, MOMENTUM_WARMUP = 0.85, 300
STATE_FORMAT = "poelm-optim/1"

GROUP_RULES = (
    ("matrix", "muon", re.compile(r"blocks\.\d+\.(?:attn\.c_(?:q|k|v|proj)|mlp\.c_(?:fc|proj))\.weight")),
    ("gate", "adamw", re.compile(r"blocks\.\d+\.attn\.ve_gate\.weight")),
    ("embedding", "adamw", re.compile(r"(?:wte|value_embeds\.\d+)\.weight")),
    ("unembedding", "adamw", re.compile(r"(?:lm_head|stage_heads\.\d+)\.weight")),
    ("resid", "adamw", re.compile(r"resid_lambdas")),
    ("x0", "adamw", re.compile(r"x0_lambdas")),
)
STATE_KEYS = {"muon": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


def group_of(name: str) -> tuple[str, str]:
    """``(group, rule)`` of a PoEGPT parameter name; PoelmError if no group claims it."""
    hits = [(g, k) for g, k, rx in GROUP_RULES if rx.fullmatch(name)]
    if len(hits) != 1:
        raise PoelmError(f"parameter {name!r} matches {len(hits)} optimizer groups: add exactly one rule for it in poelm/train/optim.py GROUP_RULES")
    return hits[0]


# ----------------------------------------------------------------------------- update rules
def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate ``U V^T`` of ``G = U S V^T`` by ``steps`` quintic Newton-Schulz iterations.

    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and ``(a, b, c) = NS_COEFFS`` maps each
    singular value s to ``a s + b s^3 + c s^5``; starting from ``X = G / ||G||_F`` (all s <= 1) five
    steps push every singular value that is not tiny into roughly [0.7, 1.2] (not exactly 1: the
    coefficients trade accuracy for a steep slope at 0, see Jordan's post). Wide orientation
    (rows <= cols) keeps ``A`` the smaller Gram matrix. Runs in bf16 on CUDA (fast, as Muon
    intends) and fp32 elsewhere (so CPU runs are deterministic and bitwise reproducible)."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_update(p, grad, buf, lr: float, momentum: float, weight_decay: float, ns_steps: int):
    """One Muon step in place: ``buf <- m buf + (1-m) g``; Nesterov ``u = (1-m) g + m buf``;
    ``p <- p (1 - lr wd) - lr max(1, rows/cols)^0.5 orthogonalize(u)``."""
    buf.lerp_(grad, 1 - momentum)
    u = grad.lerp(buf, momentum)
    o = orthogonalize(u, ns_steps)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(o.to(p.dtype), alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


def adamw_update(p, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas, eps: float, weight_decay: float):
    """One AdamW step in place (Loshchilov & Hutter, decoupled decay), ``step`` counted from 1:
    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``."""
    b1, b2 = betas
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (exp_avg_sq / (1 - b2**step)).sqrt_().add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**step))


# ----------------------------------------------------------------------------- the optimizer
@dataclass
class Group:
    name: str
    kind: str  # "muon" | "adamw"
    base_lr: float
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-10
    momentum: float = 0.95  # Muon: the final (post-warmup) momentum
    ns_steps: int = 5
    lr: float = 0.0  # base_lr x lrm


def make_groups(optim_cfg) -> dict[str, Group]:
    o = optim_cfg
    adam = dict(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    groups = [
        Group("matrix", "muon", o.matrix_lr, o.weight_decay, momentum=o.muon_momentum, ns_steps=o.muon_ns_steps),
        Group("embedding", "adamw", o.embedding_lr, o.weight_decay, **adam),
        Group("unembedding", "adamw", o.unembedding_lr, o.weight_decay, **adam),
        Group("gate", "adamw", o.matrix_lr, 0.0, **adam),
        Group("resid", "adamw", o.scalar_lr * RESID_LR_SCALE, 0.0, **adam),
        Group("x0", "adamw", o.scalar_lr, 0.0, **adam),
    ]
    return {g.name: g for g in groups}


class PoEOptimizer:
    """Muon + AdamW over all of a model's parameters, ZeRO-2 sharded when ``world_size > 1``.

    Usage per step: backward on every rank (each on its own micro-batch, loss averaged as for
    one process), then ``set_lrm(lrm)``, ``step()``, ``zero_grad()``. ``step()`` averages the
    gradients over ranks itself: do not wrap the model in DDP."""

    def __init__(self, model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None):
        self.groups = make_groups(optim_cfg)
        self.grad_clip = float(getattr(optim_cfg, "grad_clip", 0.0) or 0.0)
        self.momentum_start = float(getattr(optim_cfg, "muon_momentum_start", MOMENTUM_START))
        self.momentum_warmup = int(getattr(optim_cfg, "muon_momentum_warmup", MOMENTUM_WARMUP))
        slots = [Slot(i, n, p, *group_of(n)) for i, (n, p) in enumerate(model.named_parameters())]
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

    # ------------------------------------------------------------------------- hyper-parameters
    def set_lrm(self, lrm: float):
        """Effective lr of every group = its base lr x ``lrm`` (the schedule's multiplier)."""
        self.lrm = float(lrm)
        for g in self.groups.values():
            g.lr = g.base_lr * self.lrm

    def muon_momentum(self, step: int | None = None) -> float:
        """Momentum used at optimizer step ``step`` (0-based; default: the next step)."""
        step = self.step_count if step is None else step
        if self.momentum_warmup <= 0:
            return self.groups["matrix"].momentum
        frac = min(step / self.momentum_warmup, 1.0)
        return (1 - frac) * self.momentum_start + frac * self.groups["matrix"].momentum

    def zero_grad(self, set_to_none: bool = True):
        for s in self.slots:
            if s.param.grad is not None:
                if set_to_none:
                    s.param.grad = None
                else:
                    s.param.grad.zero_()

    # ------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Average gradients over ranks, clip (if configured), update the owned parameters and
        state, share the result. Returns the global L2 norm of the averaged gradient (before
        clipping) as a 0-d fp32 tensor. Parameters without a gradient on every rank are skipped."""
        has = self.comm.any_rank([s.param.grad is not None for s in self.slots], self.device)
        active = [s for s, h in zip(self.slots, has) if h]
        grads = {s.index: s.param.grad if s.param.grad is not None else torch.zeros_like(s.param) for s in active}
        owned = self.comm.reduce_grads(active, grads)
        norm = self._global_norm(active, owned)
        coef = None
        if self.grad_clip > 0:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        momentum = self.muon_momentum()
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
                muon_update(s.param.data, g.to(s.param.dtype), st["momentum_buffer"], grp.lr, momentum, grp.weight_decay, grp.ns_steps)
                continue
            if s.layout == SHARD:
                a, b = s.row_range(self.rank)
                target = torch.zeros(s.local_shape(self.world_size), dtype=s.param.dtype, device=s.param.device)
                target[: b - a] = s.param.data[a:b]
                chunks[s.index] = target
            else:
                target = s.param.data
            adamw_update(target, g.to(target.dtype), st["exp_avg"], st["exp_avg_sq"], self.param_steps[s.index],
                         grp.lr, grp.betas, grp.eps, grp.weight_decay)
        self.comm.sync_params(active, chunks)
        self.step_count += 1
        return norm

    def _state(self, s: Slot) -> dict[str, torch.Tensor]:
        st = self.state.get(s.index)
        if st is None:
            shape = s.local_shape(self.world_size)
            st = {k: torch.zeros(shape, dtype=s.param.dtype, device=s.param.device) for k in STATE_KEYS[s.kind]}
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

    def layout(self) -> list[dict]:
        """Where every parameter lives: name, group, layout, owner rank / rows per rank."""
        return [dict(name=s.name, group=s.group, layout=s.layout, owner=s.owner if s.layout == WHOLE else None,
                     chunk=s.chunk if s.layout == SHARD else None) for s in self.slots]

    # ------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        groups = {}
        for g in self.groups.values():
            d = asdict(g)
            d["betas"] = list(g.betas)
            groups[g.name] = d
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "lrm": self.lrm,
            "muon_momentum": self.muon_momentum(),
            "muon_momentum_start": self.momentum_start,
            "muon_momentum_warmup": self.momentum_warmup,
            "grad_clip": self.grad_clip,
            "world_size": self.world_size,
            "groups": groups,
            "params": {s.name: {"group": s.group, "step": self.param_steps[s.index], "shape": list(s.param.shape)} for s in self.slots},
        }

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
            for key in STATE_KEYS[s.kind]:
                full = self.comm.gather_full(s, st.get(key), keep)
                if keep:
                    tensors[f"{s.name}/{key}"] = full
        return tensors, self._meta()

    def load_full_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        """Load a ``full_state_dict`` saved at any world size; each rank keeps what it owns here.
        Base lrs come from this optimizer's config (a new phase may change them); the step
        counts and lrm come from ``meta``. Raises CheckpointError on a mismatched model."""
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(f"optimizer state has format {got!r}, expected {STATE_FORMAT!r}: not a poelm optimizer checkpoint")
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
                expected |= {f"{s.name}/{k}" for k in STATE_KEYS[s.kind]}
        if set(tensors) != expected:
            bad = sorted(set(tensors) ^ expected)[0]
            what = "unexpected" if bad in tensors else "missing"
            raise CheckpointError(f"optimizer state tensor {bad!r} is {what}: optim.safetensors does not match optim.json")
        state = {}
        for s in self.slots:
            if params[s.name]["step"] == 0:
                continue
            st = {}
            for key in STATE_KEYS[s.kind]:
                t = tensors[f"{s.name}/{key}"]
                if tuple(t.shape) != tuple(s.param.shape):
                    raise CheckpointError(f"optimizer state {s.name}/{key} has shape {tuple(t.shape)}, parameter has {tuple(s.param.shape)}")
                part = self.comm.local_part(s, t)
                if part is not None:
                    st[key] = part
            if st:
                state[s.index] = st
        self.state = state
        self.param_steps = [int(params[s.name]["step"]) for s in self.slots]
        self.step_count = int(meta["step"])
        self.set_lrm(meta.get("lrm", 1.0))

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
            if s is None or k not in STATE_KEYS[s.kind] or tuple(t.shape) != s.local_shape(self.world_size):
                raise CheckpointError(f"optimizer state_dict entry {key!r} does not fit this model")
            state.setdefault(s.index, {})[k] = t.to(s.param.device, s.param.dtype).clone()
        self.state = state
        self.param_steps = [int(meta["params"][s.name]["step"]) for s in self.slots]
        self.step_count = int(meta["step"])
        self.set_lrm(meta.get("lrm", 1.0))


def build_optimizer(model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None) -> PoEOptimizer:
    """The optimizer for ``model`` (see the module docstring for groups and design choices).
    ``world_size > 1`` needs ``torch.distributed`` initialised (gloo on CPU, NCCL on GPU) and the
    same initial parameters on every rank."""
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise PoelmError(f"bad distributed layout rank {rank} of world_size {world_size}")
    return PoEOptimizer(model, optim_cfg, world_size, rank, process_group)
