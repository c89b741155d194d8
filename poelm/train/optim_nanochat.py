"""The reference implementation's optimizer (``optim.optimizer = "nanochat"``), on poelm's ZeRO-2 engine.

The card's checkpoints were trained by jaepil/nanochat (``GPT.setup_optimizer`` in
``nanochat/gpt.py`` at 276c2ac) with karpathy/nanochat's ``MuonAdamW`` / ``DistMuonAdamW``
(``nanochat/optim.py`` as of a3ca42a, last changed in c0dbf1f) and the schedules of its
``scripts/base_train.py``. This module reproduces their groups and update rules (read from those
files, written anew) and converts their checkpointed optimizer state to and from poelm's
world-size independent one, so a continued run is the same experiment.

Groups, in the reference's order (``s = (n_embd / 768) ** -0.5``; lrs are at lrm 1 and every
group's lr is ``initial_lr x lrm``):

=================  =====  ======================================  =======================  ===============  =====
group              rule   parameters (poelm names)                lr                       betas            wd
=================  =====  ======================================  =======================  ===============  =====
unembedding        AdamW  lm_head, stage_heads.{k}                unembedding_lr x s       (0.8, 0.96)      0.01
embedding          AdamW  wte                                     embedding_lr x s         (0.8, 0.995)     0.001
value_embedding    AdamW  value_embeds.{i}                        embedding_lr x s x 0.5   (0.8, 0.995)     0.01
resid              AdamW  resid_lambdas                           scalar_lr x 0.01         (0.8, 0.95)      0.05
x0                 AdamW  x0_lambdas                              scalar_lr                (0.96, 0.95)     0
smear              AdamW  smear_gate, smear_lambda, backout_l.    0.2                      (0.8, 0.95)      0
matrix_{R}x{C}     Muon   every blocks.* parameter of shape RxC   matrix_lr                momentum, beta2  (*)
=================  =====  ======================================  =======================  ===============  =====

AdamW eps is 1e-10 everywhere. Muon groups are one per shape, sorted by shape; inside a group the
parameters keep the reference's module order (per layer: c_q, c_k, c_v, c_proj, ve_gate, c_fc,
mlp.c_proj), which is its state layout. ``ve_gate`` is under Muon, as in the code. Where the
facts page and the code differ the code wins; they agree on all of the above.

Schedules (base_train.py of that era; poelm anchors them at the phase start like ``lrm``):
Muon momentum ``0.85 -> 0.97`` linearly over the first 400 steps, 0.97, then ``0.97 -> 0.90``
linearly over the LR warmdown; Muon weight decay ``weight_decay x (1 + cos(pi rel / steps)) / 2``
(cosine to zero over the phase). ``set_lrm(lrm, step, phase)`` applies them; for a cooldown probe
(no warmdown of its own) momentum and weight decay stay where the checkpoint left them.
``weight_decay`` is taken as given (base_train's batch/horizon rescaling is the caller's).

Update rules (per parameter, or per matrix; the reference stacks a group's K matrices, which is
the same arithmetic per matrix):
- AdamW: ``p *= 1 - lr wd``; ``m = lerp(m, g, 1-b1)``; ``v = lerp(v, g^2, 1-b2)``;
  ``p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)`` with fp32 scalars, ``t`` the
  parameter's own step count (state ``step``).
- Muon: Nesterov ``buf = lerp(buf, g, 1-mu)``, ``u = lerp(g, buf, mu)``; Polar Express
  (Amsel et al. 2025, arXiv:2505.16932): ``X = u / (1.01 ||u||_F + 1e-6)``, then for the 5
  coefficient triples ``X = a X + X (b A + c A^2)``, ``A = X^T X`` when tall (rows > cols), else
  ``X = a X + (b A + c A^2) X``, ``A = X X^T``; NorMuon (arXiv:2510.05491): ``v = mean(X^2)`` per
  row (rows >= cols) or per column, ``second = lerp(second, v, 1-beta2)``, ``X *= rsqrt(max(second,
  1e-10))`` rescaled so ``||X||_F`` is unchanged; cautious weight decay
  ``p -= lr_eff X + lr_eff wd p [X p >= 0]`` with ``lr_eff = lr max(1, rows/cols)^0.5``. On CUDA the
  reference computes X in bf16 and casts lr, wd and beta2 to bf16; so does this module.

State (``full_state_dict``, format ``poelm-optim-nanochat/1``): per AdamW parameter
``<name>/exp_avg`` and ``<name>/exp_avg_sq`` (parameter shape), per Muon matrix
``<name>/momentum_buffer`` (``[R, C]``) and ``<name>/second_momentum_buffer`` (``[R, 1]`` if
R >= C else ``[1, C]``); meta ``{"format", "step", "lrm", "grad_clip", "groups": {name: {the
reference's param-group options (kind, lr, initial_lr, betas | momentum, ns_steps, beta2, eps,
weight_decay), "params": [names]}}, "params": {name: {"group", "step", "shape"}}}``.
``gather_reference_state`` / ``scatter_reference_state`` convert between this and the reference's
per-rank ``optim_*_rank{r}.pt`` state dicts without touching a value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from poelm.core.errors import PoelmError
from poelm.train.dist import SHARD, WHOLE, ShardedOptimizer, Slot, plan

STATE_FORMAT = "poelm-optim-nanochat/1"
# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), as listed in the
# reference's optim.py (from arXiv:2505.16932).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# setup_optimizer's keyword defaults (used when no OptimConfig is given).
SETUP_DEFAULTS = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5)
EPS = 1e-10
MUON_MOMENTUM, MUON_NS_STEPS, MUON_BETA2 = 0.95, 5, 0.9  # setup_optimizer's Muon options
# base_train.py's Muon momentum schedule: start -> peak over `warmup` steps, peak -> final over the LR warmdown.
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_FINAL, MOMENTUM_WARMUP = 0.85, 0.97, 0.90, 400
# name, lr key (None = fixed), x s?, lr factor, betas, weight decay: setup_optimizer's AdamW groups in order.
ADAMW_GROUPS = (
    ("unembedding", "unembedding_lr", True, 1.0, (0.8, 0.96), 0.01),
    ("embedding", "embedding_lr", True, 1.0, (0.8, 0.995), 0.001),
    ("value_embedding", "embedding_lr", True, 0.5, (0.8, 0.995), 0.01),
    ("resid", "scalar_lr", False, 0.01, (0.8, 0.95), 0.05),
    ("x0", "scalar_lr", False, 1.0, (0.96, 0.95), 0.0),
    ("smear", None, False, 0.2, (0.8, 0.95), 0.0),
)
BLOCK_ORDER = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight", "attn.ve_gate.weight",
               "mlp.c_fc.weight", "mlp.c_proj.weight")  # the reference's registration order in a Block
FIXED = {"lm_head.weight": ("unembedding", (0,)), "wte.weight": ("embedding", ()), "resid_lambdas": ("resid", ()),
         "x0_lambdas": ("x0", ()), "smear_gate.weight": ("smear", (0,)), "smear_lambda": ("smear", (1,)),
         "backout_lambda": ("smear", (2,))}
INDEXED = ((re.compile(r"stage_heads\.(\d+)\.weight"), "unembedding"), (re.compile(r"value_embeds\.(\d+)\.weight"), "value_embedding"))
BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _place(name: str) -> tuple[str, tuple]:
    """``(group, sort key)`` of a poelm parameter name (``"matrix"`` for every block parameter)."""
    if name in FIXED:
        return FIXED[name]
    for rx, group in INDEXED:
        m = rx.fullmatch(name)
        if m:
            return group, (1, int(m.group(1)))
    m = BLOCK.fullmatch(name)
    if m:
        rest = m.group(2)
        return "matrix", (int(m.group(1)), BLOCK_ORDER.index(rest) if rest in BLOCK_ORDER else len(BLOCK_ORDER), rest)
    raise PoelmError(f"parameter {name!r} has no group in the reference optimizer (poelm/train/optim_nanochat.py)")


def muon_group_name(shape) -> str:
    return f"matrix_{shape[0]}x{shape[1]}"


def reference_param_groups(param_names_shapes: dict[str, tuple], optim_cfg=None) -> list[dict]:
    """The reference's param groups in ``setup_optimizer``'s order, over poelm parameter names.

    Each is ``{"name", "kind", "params": [names in the reference's order], "lr", ...}`` with
    ``betas``, ``eps``, ``weight_decay`` (AdamW) or ``momentum``, ``ns_steps``, ``beta2``,
    ``weight_decay`` (Muon). Lrs come from ``optim_cfg`` (an OptimConfig) or, without one,
    setup_optimizer's defaults. A group whose parameters the model lacks is empty (kept, so the
    group count and order match the reference's); an unknown name or a non-2-D block parameter
    is a PoelmError."""
    o = {k: float(getattr(optim_cfg, k)) for k in SETUP_DEFAULTS} if optim_cfg is not None else dict(SETUP_DEFAULTS)
    width = param_names_shapes.get("wte.weight") or param_names_shapes.get("lm_head.weight")
    if width is None or len(width) != 2:
        raise PoelmError("the reference optimizer scales AdamW lrs by n_embd: the model needs wte.weight or lm_head.weight")
    s = (width[1] / 768) ** -0.5
    placed: dict[str, list] = {}
    for name in param_names_shapes:
        group, key = _place(name)
        placed.setdefault(group, []).append((key, name))
    groups = []
    for name, lr_key, scaled, factor, betas, wd in ADAMW_GROUPS:
        lr = (o[lr_key] * (s if scaled else 1.0) * factor) if lr_key else factor
        params = [n for _, n in sorted(placed.get(name, []))]
        groups.append(dict(name=name, kind="adamw", params=params, lr=lr, betas=betas, eps=EPS, weight_decay=wd))
    matrices = [n for _, n in sorted(placed.get("matrix", []))]
    for n in matrices:
        if len(param_names_shapes[n]) != 2:
            raise PoelmError(f"Muon parameter {n} has shape {tuple(param_names_shapes[n])}: Muon needs a 2-D matrix")
    for shape in sorted({tuple(param_names_shapes[n]) for n in matrices}):
        params = [n for n in matrices if tuple(param_names_shapes[n]) == shape]
        groups.append(dict(name=muon_group_name(shape), kind="muon", params=params, lr=o["matrix_lr"], momentum=MUON_MOMENTUM,
                           ns_steps=MUON_NS_STEPS, beta2=MUON_BETA2, weight_decay=o["weight_decay"]))
    return groups


def muon_state_shapes(shape) -> dict[str, tuple]:
    r, c = shape
    return {"momentum_buffer": (r, c), "second_momentum_buffer": (r, 1) if r >= c else (1, c)}


def adamw_state_shapes(shape) -> dict[str, tuple]:
    return {"exp_avg": tuple(shape), "exp_avg_sq": tuple(shape)}


# ----------------------------------------------------------------------------- update rules
def _f32(x) -> torch.Tensor:
    # The reference passes hyper-parameters as fp32 0-D tensors: scalar arithmetic happens in fp32.
    return torch.tensor(x, dtype=torch.float32)


def adamw_update(p, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas, eps: float, weight_decay: float):
    """One reference AdamW step in place (see the module docstring), ``step`` counted from 1."""
    lr_t, b1, b2, wd = _f32(lr), _f32(betas[0]), _f32(betas[1]), _f32(weight_decay)
    t = _f32(float(step))
    p.mul_(float(1 - lr_t * wd))
    exp_avg.lerp_(grad, float(1 - b1))
    exp_avg_sq.lerp_(grad.square(), float(1 - b2))
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    denom = (exp_avg_sq / float(bias2)).sqrt() + float(_f32(eps))
    p.add_(exp_avg / denom, alpha=-float(lr_t / bias1))


def polar_express(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Polar Express orthogonalization of a matrix (or a stack): ``G / (1.01 ||G||_F + 1e-6)``
    then ``steps`` odd polynomial iterations with the coefficient triples ``POLAR_EXPRESS``.
    bf16 on CUDA as the reference (its COMPUTE_DTYPE), the input's dtype elsewhere."""
    X = G.bfloat16() if G.is_cuda else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X.mT @ X if tall else X @ X.mT  # the smaller Gram matrix
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def normuon_scale(X: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon variance reduction: updates ``second`` (the factored second moment) in place and
    returns ``X`` with each row (rows >= cols) or column scaled by ``rsqrt(max(second, 1e-10))``,
    rescaled to keep ``||X||_F``."""
    red = -1 if X.size(-2) >= X.size(-1) else -2
    n = X.size(red)
    v_mean = X.float().square().mean(dim=red, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    b2 = _f32(beta2).to(X.dtype)
    second.lerp_(v_mean.to(second.dtype), float(1 - b2))
    step = second.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return X * (step * (v_norm / v_norm_new.clamp_min(1e-10))).to(X.dtype)


def muon_update(p, grad, buf, second, lr: float, momentum: float, weight_decay: float, ns_steps: int, beta2: float):
    """One reference Muon step on one matrix in place (see the module docstring)."""
    mu = _f32(momentum).to(grad.dtype)
    buf.lerp_(grad, float(1 - mu))
    u = grad.lerp(buf, float(mu))
    X = normuon_scale(polar_express(u, ns_steps), second, beta2)
    lr_t = _f32(lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5).to(X.dtype)
    wd_t = _f32(weight_decay).to(X.dtype)
    mask = (X * p) >= 0
    p.sub_(lr_t * X + lr_t * wd_t * p * mask)


def reference_momentum(rel: int, steps: int, warmdown: int) -> float:
    """base_train.py's Muon momentum at step ``rel`` of a ``steps``-step run with ``warmdown`` LR-warmdown steps."""
    start = steps - warmdown
    if rel < MOMENTUM_WARMUP:
        frac = rel / MOMENTUM_WARMUP
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    if rel >= start:
        progress = (rel - start) / max(1, warmdown)
        return MOMENTUM_PEAK * (1 - progress) + MOMENTUM_FINAL * progress
    return MOMENTUM_PEAK


def reference_weight_decay(rel: int, steps: int, weight_decay: float) -> float:
    """base_train.py's Muon weight decay: cosine from ``weight_decay`` to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * rel / steps))


# ----------------------------------------------------------------------------- the optimizer
@dataclass
class RefGroup:
    name: str
    kind: str
    base_lr: float  # the reference's initial_lr
    params: list = field(default_factory=list)
    betas: tuple = (0.8, 0.95)
    eps: float = EPS
    weight_decay: float = 0.0
    momentum: float = MUON_MOMENTUM
    ns_steps: int = MUON_NS_STEPS
    beta2: float = MUON_BETA2
    lr: float = 0.0

    def options(self) -> dict:
        """The reference's param-group options (its ``param_groups`` entry minus ``params``)."""
        if self.kind == "adamw":
            return dict(kind=self.kind, lr=self.lr, betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay,
                        initial_lr=self.base_lr)
        return dict(kind=self.kind, lr=self.lr, momentum=self.momentum, ns_steps=self.ns_steps, beta2=self.beta2,
                    weight_decay=self.weight_decay, initial_lr=self.base_lr)


class NanochatOptimizer(ShardedOptimizer):
    """The reference's MuonAdamW (groups, rules, schedules of the module docstring) on poelm's
    ZeRO-2 layout: a Muon matrix is owned whole by one rank, large AdamW tensors are row-sharded;
    each matrix is updated on its own, so any world size gives the same numbers."""

    STATE_FORMAT = STATE_FORMAT
    NAME = "nanochat"

    def __init__(self, model: torch.nn.Module, optim_cfg, world_size: int = 1, rank: int = 0, process_group=None):
        self.base_weight_decay = float(getattr(optim_cfg, "weight_decay", 0.0))
        super().__init__(model, optim_cfg, world_size, rank, process_group)

    def _make_groups(self, optim_cfg, model) -> dict:
        ref = reference_param_groups({n: tuple(p.shape) for n, p in model.named_parameters()}, optim_cfg)
        self._where = {n: (g["name"], g["kind"]) for g in ref for n in g["params"]}
        out = {}
        for g in ref:
            extra = {k: g[k] for k in ("betas", "eps", "momentum", "ns_steps", "beta2") if k in g}
            out[g["name"]] = RefGroup(g["name"], g["kind"], g["lr"], list(g["params"]), weight_decay=g["weight_decay"], **extra)
        return out

    def _group_of(self, name: str) -> tuple[str, str]:
        return self._where[name]

    def state_shapes(self, s: Slot) -> dict[str, tuple]:
        return muon_state_shapes(s.param.shape) if s.kind == "muon" else adamw_state_shapes(s.param.shape)

    def _muon_step(self, s: Slot, g: torch.Tensor, grp, st: dict):
        muon_update(s.param.data, g.to(s.param.dtype), st["momentum_buffer"], st["second_momentum_buffer"], grp.lr,
                    grp.momentum, grp.weight_decay, grp.ns_steps, grp.beta2)

    def _adamw_step(self, target: torch.Tensor, g: torch.Tensor, grp, st: dict, step: int):
        adamw_update(target, g.to(target.dtype), st["exp_avg"], st["exp_avg_sq"], step, grp.lr, grp.betas, grp.eps, grp.weight_decay)

    def set_lrm(self, lrm: float, step: int | None = None, phase=None):
        """Every group's lr = initial lr x ``lrm``; with the loop's ``step`` and a ``Phase``, Muon
        momentum and weight decay follow base_train.py's schedules at ``step - phase.start_step``."""
        super().set_lrm(lrm)
        if step is None or getattr(phase, "warmdown_ratio", None) is None:
            return
        rel = step - phase.start_step
        mom = reference_momentum(rel, phase.steps, phase.warmdown_steps)
        wd = reference_weight_decay(rel, phase.steps, self.base_weight_decay)
        for g in self.groups.values():
            if g.kind == "muon":
                g.momentum, g.weight_decay = mom, wd

    def _meta(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "lrm": self.lrm,
            "grad_clip": self.grad_clip,
            "groups": {g.name: {**g.options(), "params": list(g.params)} for g in self.groups.values()},
            "params": {s.name: {"group": s.group, "step": self.param_steps[s.index], "shape": list(s.param.shape)} for s in self.slots},
        }

    def _load_hyper(self, meta: dict):
        # Muon momentum / weight decay as they were at the save (a phase's set_lrm overrides them).
        for name, g in self.groups.items():
            saved = meta.get("groups", {}).get(name)
            if g.kind == "muon" and saved:
                g.momentum, g.weight_decay = float(saved["momentum"]), float(saved["weight_decay"])


def state_numel_per_rank(model: torch.nn.Module, world: int, objective: str = "poe") -> list[int]:
    """Optimizer-state elements each rank allocates under ``NanochatOptimizer`` (AdamW: two
    moments, row-sharded when large; Muon: momentum plus the factored second moment, on the
    matrix's owner), on poelm's ``dist.plan`` layout. ``objective = "bp"``: the stage heads
    before the last get no gradient, hence no state."""
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    where = {n: (g["name"], g["kind"]) for g in reference_param_groups(names) for n in g["params"]}
    slots = plan([Slot(i, n, p, *where[n]) for i, (n, p) in enumerate(model.named_parameters())], world)
    K = model.config.n_stages
    idle = {f"stage_heads.{k}.weight" for k in range(K - 1)} if objective == "bp" else set()
    per_rank = [0] * world
    for s in slots:
        if s.name in idle:
            continue
        shapes = muon_state_shapes(s.param.shape) if s.kind == "muon" else adamw_state_shapes(s.param.shape)
        numel = sum(math.prod(s.local_shape(world)) if s.layout == SHARD else math.prod(sh) for sh in shapes.values())
        for r in range(world):
            if s.layout != WHOLE or s.owner == r:
                per_rank[r] += numel
    return per_rank
