"""poelm's earlier Muon/AdamW (``optim.optimizer = "poelm"``), and ``build_optimizer`` for both.

The default is the reference's optimizer (``optim_nanochat.py``); this one is kept so the runs
trained with it resume exactly, and for the measured comparison in ``config.OptimConfig``'s
docstring. Muon for the blocks' matrices, AdamW for everything else, optionally ZeRO-2 sharded.

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
smear          AdamW   smear_gate, smear_lambda, backout_lambda             0.2 (fixed)
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
  not a regulariser). The smear / backout scalars (present only with the reference ops,
  ``model.smear`` / ``model.backout``) take the reference's fixed AdamW lr 0.2 without decay,
  so a model with the reference's ops trains under either optimizer. LRs are used as configured; there is no ``1/sqrt(d_model/768)`` rescaling.
- Muon momentum warms up linearly from ``muon_momentum_start`` (0.85) to ``muon_momentum`` over
  the first ``muon_momentum_warmup`` (300) optimizer steps (``nanochat_rules.muon_momentum_at``,
  nanochat's ``get_muon_momentum``; ``muon_momentum_warmup = 0`` disables it).
  The step count is part of the checkpointed state, so a resumed run does not re-warm.
- ``grad_clip > 0`` clips the *global* norm of the averaged gradient (computed on the owned
  pieces and all-reduced, so it is the same number for any world size); ``step()`` returns that
  pre-clip norm as a 0-d tensor, so the training loop must not clip by itself.

``optim.optimizer = "nanochat"`` (the default) selects the reference implementation's groups and
rules instead (``optim_nanochat.py``); ``build_optimizer`` is the one entry point for both.

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

from poelm.core.errors import PoelmError
from poelm.train.dist import ShardedOptimizer, Slot
from poelm.train.nanochat_rules import muon_momentum_at
from poelm.train.optim_nanochat import SMEAR_LR, NanochatOptimizer

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steep at 0, lands in ~[0.7, 1.2]
RESID_LR_SCALE = 0.01
STATE_FORMAT = "poelm-optim/1"

GROUP_RULES = (
    ("matrix", "muon", re.compile(r"blocks\.\d+\.(?:attn\.c_(?:q|k|v|proj)|mlp\.c_(?:fc|proj))\.weight")),
    ("gate", "adamw", re.compile(r"blocks\.\d+\.attn\.ve_gate\.weight")),
    ("embedding", "adamw", re.compile(r"(?:wte|value_embeds\.\d+)\.weight")),
    ("unembedding", "adamw", re.compile(r"(?:lm_head|stage_heads\.\d+)\.weight")),
    ("resid", "adamw", re.compile(r"resid_lambdas")),
    ("x0", "adamw", re.compile(r"x0_lambdas")),
    ("smear", "adamw", re.compile(r"smear_gate\.weight|smear_lambda|backout_lambda")),
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
        Group("smear", "adamw", SMEAR_LR, 0.0, **adam),
    ]
    return {g.name: g for g in groups}


class PoEOptimizer(ShardedOptimizer):
    """poelm's Muon + AdamW (the groups and rules of the module docstring) on the ZeRO-2 engine
    of ``poelm/train/dist.py``."""

    STATE_FORMAT = STATE_FORMAT
    NAME = "poelm"

    def __init__(self, model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None):
        self.momentum_start, self.momentum_warmup = float(optim_cfg.muon_momentum_start), int(optim_cfg.muon_momentum_warmup)
        super().__init__(model, optim_cfg, world_size, rank, process_group)

    def _make_groups(self, optim_cfg, model) -> dict:
        return make_groups(optim_cfg)

    def _group_of(self, name: str) -> tuple[str, str]:
        return group_of(name)

    def state_shapes(self, s: Slot) -> dict[str, tuple]:
        return {k: tuple(s.param.shape) for k in STATE_KEYS[s.kind]}

    def _muon_step(self, s: Slot, g: torch.Tensor, grp, st: dict):
        muon_update(s.param.data, g.to(s.param.dtype), st["momentum_buffer"], grp.lr, self.muon_momentum(), grp.weight_decay, grp.ns_steps)

    def _adamw_step(self, target: torch.Tensor, g: torch.Tensor, grp, st: dict, step: int):
        adamw_update(target, g.to(target.dtype), st["exp_avg"], st["exp_avg_sq"], step, grp.lr, grp.betas, grp.eps, grp.weight_decay)

    def muon_momentum(self, step: int | None = None) -> float:
        """Momentum used at optimizer step ``step`` (0-based; default: the next step)."""
        step = self.step_count if step is None else step
        return muon_momentum_at(step, self.momentum_start, self.groups["matrix"].momentum, self.momentum_warmup)

    def _meta(self) -> dict:
        groups = {}
        for g in self.groups.values():
            d = asdict(g)
            d["betas"] = list(g.betas)
            groups[g.name] = d
        return {
            "format": self.STATE_FORMAT,
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


def build_optimizer(model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None) -> ShardedOptimizer:
    """The optimizer ``optim_cfg.optimizer`` names for ``model``: ``"nanochat"`` (the reference
    implementation's, see ``optim_nanochat.py``) or ``"poelm"`` (this module's groups and rules,
    see its docstring). ``world_size > 1`` needs ``torch.distributed`` initialised (gloo on
    CPU, NCCL on GPU) and the same initial parameters on every rank."""
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise PoelmError(f"bad distributed layout rank {rank} of world_size {world_size}")
    kind = getattr(optim_cfg, "optimizer", "nanochat")
    if kind not in OPTIMIZERS:
        raise PoelmError(f"unknown optim.optimizer {kind!r}: use one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[kind](model, optim_cfg, world_size, rank, process_group)


OPTIMIZERS = {"poelm": PoEOptimizer, "nanochat": NanochatOptimizer}
