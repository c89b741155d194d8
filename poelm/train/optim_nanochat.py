"""The reference implementation's optimizer (``optim.optimizer = "nanochat"``), on poelm's ZeRO-2 engine.

The card's checkpoints were trained by jaepil/nanochat (``GPT.setup_optimizer`` in
``nanochat/gpt.py`` at 276c2ac) with karpathy/nanochat's ``MuonAdamW`` / ``DistMuonAdamW``
(``nanochat/optim.py`` as of a3ca42a, last changed in c0dbf1f) and the schedules of its
``scripts/base_train.py``. This module reproduces their groups and update rules (read from those
files, written anew) and converts their checkpointed optimizer state to and from poelm's
world-size independent one, so a continued run is the same experiment.

Groups, in the reference's order (``s = (n_embd / 768) ** -0.5``; lrs are at lrm 1, each times
``optim.lr_scale`` (base_train's ``batch_lr_scale``, default 1), and every group's lr is
``initial_lr x lrm``):

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

(*) ``weight_decay`` from the config, on the schedule below. AdamW eps is 1e-10 everywhere;
Muon options are momentum 0.95 (replaced every step by the schedule below), ns_steps 5, beta2 0.9.
Muon groups are one per shape, sorted by shape; inside a group the
parameters keep the reference's module order (per layer: c_q, c_k, c_v, c_proj, ve_gate, c_fc,
mlp.c_proj), which is its state layout. ``ve_gate`` is under Muon, as in the code. Where the
facts page (shared/reference/nanochat-poe.md) and the code differ the code wins: they agree on
the groups and rules; the page leaves out what the code adds, i.e. the schedules below (it lists
setup_optimizer's momentum 0.95, which base_train replaces every step) and the bf16 casts on CUDA.

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
per-rank ``optim_*_rank{r}.pt`` state dicts without touching a value (over the reference's
padded vocabulary; ``resize_vocab_rows`` cuts / restores the padding rows).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from poelm.core.errors import CheckpointError, PoelmError
from poelm.train.dist import ShardedOptimizer, Slot
from poelm.train.nanochat_rules import adamw_update, muon_update, reference_momentum, reference_weight_decay

STATE_FORMAT = "poelm-optim-nanochat/1"
# setup_optimizer's keyword defaults (used when no OptimConfig is given).
SETUP_DEFAULTS = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5)
EPS = 1e-10  # AdamW eps of every group
MUON_MOMENTUM, MUON_NS_STEPS, MUON_BETA2 = 0.95, 5, 0.9  # setup_optimizer's Muon options
SMEAR_LR = 0.2  # gpt.py setup_optimizer's fixed lr of smear_gate / smear_lambda / backout_lambda (poelm's optimizer too)
# name, lr key (None = fixed), x s?, lr factor, betas, weight decay: setup_optimizer's AdamW groups in order.
ADAMW_GROUPS = (
    ("unembedding", "unembedding_lr", True, 1.0, (0.8, 0.96), 0.01),
    ("embedding", "embedding_lr", True, 1.0, (0.8, 0.995), 0.001),
    ("value_embedding", "embedding_lr", True, 0.5, (0.8, 0.995), 0.01),
    ("resid", "scalar_lr", False, 0.01, (0.8, 0.95), 0.05),
    ("x0", "scalar_lr", False, 1.0, (0.96, 0.95), 0.0),
    ("smear", None, False, SMEAR_LR, (0.8, 0.95), 0.0),
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
    scale = float(getattr(optim_cfg, "lr_scale", 1.0)) if optim_cfg is not None else 1.0  # base_train's batch_lr_scale
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
        lr = ((o[lr_key] * (s if scaled else 1.0) * factor) if lr_key else factor) * scale
        params = [n for _, n in sorted(placed.get(name, []))]
        groups.append(dict(name=name, kind="adamw", params=params, lr=lr, betas=betas, eps=EPS, weight_decay=wd))
    matrices = [n for _, n in sorted(placed.get("matrix", []))]
    for n in matrices:
        if len(param_names_shapes[n]) != 2:
            raise PoelmError(f"Muon parameter {n} has shape {tuple(param_names_shapes[n])}: Muon needs a 2-D matrix")
    for shape in sorted({tuple(param_names_shapes[n]) for n in matrices}):
        params = [n for n in matrices if tuple(param_names_shapes[n]) == shape]
        groups.append(dict(name=muon_group_name(shape), kind="muon", params=params, lr=o["matrix_lr"] * scale, momentum=MUON_MOMENTUM,
                           ns_steps=MUON_NS_STEPS, beta2=MUON_BETA2, weight_decay=o["weight_decay"]))
    return groups


def group_of_names(param_names_shapes: dict[str, tuple]) -> dict[str, tuple[str, str]]:
    """``{name: (group, "adamw" | "muon")}`` under the reference's groups."""
    return {n: (g["name"], g["kind"]) for g in reference_param_groups(param_names_shapes) for n in g["params"]}


def state_shapes_of(kind: str, shape) -> dict[str, tuple]:
    """Full shape of each optimizer-state tensor of a parameter of ``shape`` under rule ``kind``."""
    return muon_state_shapes(shape) if kind == "muon" else adamw_state_shapes(shape)


def muon_state_shapes(shape) -> dict[str, tuple]:
    r, c = shape
    return {"momentum_buffer": (r, c), "second_momentum_buffer": (r, 1) if r >= c else (1, c)}


def adamw_state_shapes(shape) -> dict[str, tuple]:
    return {"exp_avg": tuple(shape), "exp_avg_sq": tuple(shape)}


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
        return state_shapes_of(s.kind, s.param.shape)

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
                g.momentum = float(saved.get("momentum", g.momentum))
                g.weight_decay = float(saved.get("weight_decay", g.weight_decay))


# ----------------------------------------------------------------------------- reference checkpoints
# The reference saves ``optimizer.state_dict()`` per rank (``optim_{step:06d}_rank{r}.pt``): torch's
# layout ``{"state": {index: {...}}, "param_groups": [{options..., "params": [index, ...]}]}``, the
# indices numbering the parameters group after group in setup_optimizer's order. Per rank r of W
# (DistMuonAdamW; MuonAdamW is W = 1):
# - AdamW parameter (state ``step`` int, ``exp_avg``, ``exp_avg_sq``): under 1024 elements, the
#   full state on every rank; else rows ``[r n/W, (r+1) n/W)`` (n % W == 0 is required);
# - Muon group of K matrices: state only on its first parameter's index, ``momentum_buffer``
#   ``[ceil(K/W), R, C]`` and ``second_momentum_buffer`` ``[ceil(K/W), R, 1]`` (R >= C) or
#   ``[ceil(K/W), 1, C]``, holding matrices ``[r ceil(K/W), ...)`` and zero padding past K; no step.
ADAMW_KEYS = ("exp_avg", "exp_avg_sq")
SMALL_NUMEL = 1024  # DistMuonAdamW all-reduces (and replicates the state of) AdamW params below this


def _layout(param_names_shapes: dict) -> tuple[list[dict], dict[str, int]]:
    groups = reference_param_groups(param_names_shapes)
    index = {n: i for i, n in enumerate(n for g in groups for n in g["params"])}
    return groups, index


def _sizes(groups) -> str:
    return ", ".join(f"{g['name']}:{g['kind']}x{len(g['params'])}" for g in groups)


def _check_shards(rank_states, groups, index, world_size):
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CheckpointError(f"world size must be a positive integer, got {world_size!r}")
    if len(rank_states) != world_size:
        raise CheckpointError(f"{len(rank_states)} optimizer shards for world size {world_size}: shards of ranks "
                              f"{list(range(len(rank_states), world_size)) or 'beyond it'} are missing or extra; pass one per rank")
    known = {index[g["params"][0]] for g in groups if g["kind"] == "muon" and g["params"]}
    known |= {index[n] for g in groups if g["kind"] == "adamw" for n in g["params"]}
    for r, sd in enumerate(rank_states):
        if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list)):
            raise CheckpointError(f"optimizer shard of rank {r} is not a torch optimizer state dict (keys 'state', 'param_groups')")
        pgs = sd["param_groups"]
        ok = len(pgs) == len(groups) and all(
            isinstance(pg, dict) and pg.get("kind") == g["kind"] and list(pg.get("params", ())) == [index[n] for n in g["params"]]
            for pg, g in zip(pgs, groups))
        if not ok:
            got = ", ".join(f"{pg.get('kind')}x{len(pg.get('params', ()))}" if isinstance(pg, dict) else "?" for pg in pgs)
            raise CheckpointError(f"optimizer shard of rank {r} has an unknown group layout [{got}]; this model's reference "
                                  f"optimizer has [{_sizes(groups)}] (different model or optimizer version?)")
        extra = sorted(set(sd["state"]) - known, key=str)
        if extra:
            raise CheckpointError(f"optimizer shard of rank {r} holds state for parameter index {extra[0]!r}, which the reference "
                                  f"layout [{_sizes(groups)}] gives no state")


def _pieces(per: list, what: str, keys, shapes: dict) -> list[dict]:
    """Per-rank state entries of one parameter / group, all present (or all absent: [])."""
    have = [r for r, p in enumerate(per) if p is not None]
    if not have:
        return []
    if len(have) != len(per):
        missing = [r for r, p in enumerate(per) if p is None]
        raise CheckpointError(f"optimizer state of {what} is missing on rank(s) {missing}: incomplete shard set (or shards of different steps)")
    for r, p in enumerate(per):
        for k in keys:
            t = p.get(k) if isinstance(p, dict) else None
            if not torch.is_tensor(t) or tuple(t.shape) != shapes[k]:
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise CheckpointError(f"optimizer state {what}/{k} on rank {r} is {got}, expected shape {shapes[k]}")
    return per


def gather_reference_state(rank_states: list[dict], param_names_shapes: dict[str, tuple], world_size: int) -> tuple[dict, dict]:
    """The reference's W per-rank optimizer state dicts -> ``(tensors, meta)`` as
    ``NanochatOptimizer.full_state_dict`` writes them (world-size independent; pass them to
    ``load_full_state_dict``). Values are copied, never computed (dtypes kept). ``meta["step"]``
    is the AdamW step count (the largest, they agree in a real run); Muon matrices, which carry
    no step in the reference, get it when their group has state. CheckpointError on missing
    shards, a group layout other than this model's, or a state tensor of the wrong shape."""
    groups, index = _layout(param_names_shapes)
    _check_shards(rank_states, groups, index, world_size)
    W, tensors, steps, muon_with_state = world_size, {}, {}, []
    for g in groups:
        if g["kind"] == "adamw":
            for n in g["params"]:
                shape = tuple(param_names_shapes[n])
                small = math.prod(shape) < SMALL_NUMEL
                if not small and shape[0] % W:
                    raise CheckpointError(f"{n} has {shape[0]} rows, not divisible by world size {W}: not a reference shard layout")
                want = shape if small else (shape[0] // W, *shape[1:])
                per = _pieces([sd["state"].get(index[n]) for sd in rank_states], n, ADAMW_KEYS, dict.fromkeys(ADAMW_KEYS, want))
                steps[n] = 0
                if not per:
                    continue
                found = {p.get("step") for p in per}
                if len(found) != 1 or not isinstance(next(iter(found)), int) or next(iter(found)) < 1:
                    raise CheckpointError(f"optimizer state of {n} has step {sorted(found, key=str)} across ranks: expected one positive integer")
                steps[n] = found.pop()
                for k in ADAMW_KEYS:
                    tensors[f"{n}/{k}"] = per[0][k].clone() if small else torch.cat([p[k] for p in per])
            continue
        params = g["params"]
        for n in params:
            steps[n] = 0
        if not params:
            continue
        chunk = -(-len(params) // W)
        shapes = {k: (chunk, *s) for k, s in muon_state_shapes(param_names_shapes[params[0]]).items()}
        per = _pieces([sd["state"].get(index[params[0]]) for sd in rank_states], f"Muon group {g['name']}", tuple(shapes), shapes)
        if not per:
            continue
        for k in shapes:
            stacked = torch.cat([p[k] for p in per])
            for j, n in enumerate(params):
                tensors[f"{n}/{k}"] = stacked[j].clone()
        muon_with_state += params
    step = max(steps.values(), default=0)
    if muon_with_state and step == 0:
        raise CheckpointError("the optimizer shards hold Muon state but no AdamW state: the step count cannot be recovered")
    for n in muon_with_state:
        steps[n] = step
    opts = {}
    for g, pg in zip(groups, rank_states[0]["param_groups"]):
        opts[g["name"]] = {k: list(v) if isinstance(v, tuple) else v for k, v in pg.items() if k != "params"}
        opts[g["name"]]["params"] = list(g["params"])
    first = rank_states[0]["param_groups"][0] if groups else {}
    lrm = first["lr"] / first["initial_lr"] if first.get("initial_lr") else 1.0
    meta = {"format": STATE_FORMAT, "step": step, "lrm": lrm, "grad_clip": 0.0, "groups": opts,
            "params": {n: {"group": g["name"], "step": steps[n], "shape": list(param_names_shapes[n])} for g in groups for n in g["params"]}}
    return tensors, meta


def scatter_reference_state(tensors: dict, meta: dict, param_names_shapes: dict[str, tuple], world_size: int = 1) -> list[dict]:
    """The inverse of ``gather_reference_state``: per-rank state dicts in the reference's layout
    for ``world_size`` ranks (loadable by its optimizer's ``load_state_dict``; W = 1 is
    MuonAdamW's). Group options come from ``meta["groups"]``. Values are copied (Muon chunks
    zero-padded past K), so ``gather(scatter(x)) == x`` bitwise. CheckpointError when the state
    does not fit this model, a Muon group has state for only some matrices, or a large AdamW
    tensor's rows do not divide by ``world_size``."""
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"optimizer state has format {got!r}, expected {STATE_FORMAT!r} (a nanochat-optimizer state)")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CheckpointError(f"world size must be a positive integer, got {world_size!r}")
    groups, index = _layout(param_names_shapes)
    saved = meta.get("groups", {})
    # Compared by name, not order: a saved optim.json has its keys sorted; the reference order
    # (that of ``groups``) is what the per-rank param_groups below are written in.
    if {n: saved[n].get("params") for n in saved} != {g["name"]: g["params"] for g in groups}:
        raise CheckpointError(f"optimizer state groups [{', '.join(saved)}] do not match this model's reference groups [{_sizes(groups)}]")
    steps = {n: int(meta.get("params", {}).get(n, {}).get("step", 0)) for n in param_names_shapes}
    expected = {}
    for g in groups:
        for n in g["params"]:
            if steps[n] > 0:
                shapes = adamw_state_shapes(param_names_shapes[n]) if g["kind"] == "adamw" else muon_state_shapes(param_names_shapes[n])
                expected.update({f"{n}/{k}": s for k, s in shapes.items()})
    if set(tensors) != set(expected):
        bad = sorted(set(tensors) ^ set(expected))[0]
        raise CheckpointError(f"optimizer state tensor {bad!r} is {'unexpected' if bad in tensors else 'missing'} for this model")
    for k, s in expected.items():
        if tuple(tensors[k].shape) != s:
            raise CheckpointError(f"optimizer state {k} has shape {tuple(tensors[k].shape)}, expected {s}")
    W = world_size
    out = [{"state": {}, "param_groups": []} for _ in range(W)]
    for g in groups:
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in saved[g["name"]].items() if k != "params"}
        for sd in out:
            sd["param_groups"].append({**opts, "params": [index[n] for n in g["params"]]})
        params = g["params"]
        if g["kind"] == "adamw":
            for n in params:
                if not steps[n]:
                    continue
                shape = tuple(param_names_shapes[n])
                small = math.prod(shape) < SMALL_NUMEL
                if not small and shape[0] % W:
                    raise CheckpointError(f"{n} has {shape[0]} rows, not divisible by world size {W}: the reference cannot shard it over {W} ranks")
                rows = shape[0] // W
                for r, sd in enumerate(out):
                    sd["state"][index[n]] = {"step": steps[n], **{k: (tensors[f"{n}/{k}"] if small else tensors[f"{n}/{k}"][r * rows:(r + 1) * rows]).clone()
                                                                  for k in ADAMW_KEYS}}
            continue
        stepped = [n for n in params if steps[n]]
        if not stepped:
            continue
        if len(stepped) != len(params):
            raise CheckpointError(f"Muon group {g['name']} has state for {len(stepped)} of its {len(params)} matrices: the reference keeps one state per group")
        chunk = -(-len(params) // W)
        per_rank = [{} for _ in range(W)]
        for k in muon_state_shapes(param_names_shapes[params[0]]):
            stacked = torch.stack([tensors[f"{n}/{k}"] for n in params])
            padded = torch.cat([stacked, stacked.new_zeros((chunk * W - len(params), *stacked.shape[1:]))])
            for r in range(W):
                per_rank[r][k] = padded[r * chunk:(r + 1) * chunk].clone()
        for sd, st in zip(out, per_rank):
            sd["state"][index[params[0]]] = st
    return out


VOCAB_ROWS = re.compile(r"(?:wte|lm_head|stage_heads\.\d+|value_embeds\.\d+)\.weight")  # one row per vocabulary id


def resize_vocab_rows(tensors: dict, meta: dict, rows: int) -> tuple[dict, dict]:
    """The state with every vocabulary-indexed parameter's state (wte, lm_head, stage heads, value
    embeddings) cut or zero-padded to ``rows`` rows, and ``meta``'s shapes to match: the
    reference pads its vocabulary to a multiple of 64 (``gather`` / ``scatter`` take the padded
    shapes); poelm keeps ``vocab_size`` rows. The padding rows never get a gradient, so their
    state is zero; cutting rows that are not is a CheckpointError (nothing is silently lost)."""
    out, params = dict(tensors), {n: dict(r) for n, r in meta.get("params", {}).items()}
    for name, rec in params.items():
        if not VOCAB_ROWS.fullmatch(name):
            continue
        rec["shape"] = [rows, *rec["shape"][1:]]
        for k in ADAMW_KEYS:
            t = tensors.get(f"{name}/{k}")
            if t is None:
                continue
            if t.shape[0] > rows and bool(t[rows:].any()):
                raise CheckpointError(f"optimizer state {name}/{k} has non-zero rows past {rows}: not vocabulary padding")
            out[f"{name}/{k}"] = t[:rows].clone() if t.shape[0] >= rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
    return out, {**meta, "params": params}
