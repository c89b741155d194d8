"""The ``optim`` settings of a reference run, read back from its saved optimizer groups.

The reference's ``scripts/base_train.py`` (karpathy/nanochat a3ca42a) calls ``setup_optimizer``
with every lr times ``batch_lr_scale = sqrt(total_batch_size / 2**19)`` and a rescaled weight
decay, and saves each group's ``initial_lr``; its meta's ``user_config`` keeps the unscaled CLI
values. A continued run must use the saved lrs (the reference's own resume does), so the importer
inverts the group rules of ``optim_nanochat.reference_param_groups`` here: ``lr_scale`` from the
fixed-lr smear group (0.2 x scale), ``matrix_lr`` / ``embedding_lr`` / ``unembedding_lr`` /
``scalar_lr`` from the matrix / embedding / unembedding / x0 groups, and every group is checked
to come out at its saved ``initial_lr`` (relative 1e-6).
"""

from __future__ import annotations

from types import SimpleNamespace

from poelm.core.errors import CheckpointError
from poelm.train.nanochat_rules import reference_weight_decay
from poelm.train.optim_nanochat import SETUP_DEFAULTS, SMEAR_LR, reference_param_groups

REL_TOL = 1e-6


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def optim_lrs_from_groups(saved: dict, param_names_shapes: dict) -> dict:
    """``{"lr_scale", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr"}`` under which
    ``reference_param_groups`` gives every saved group (``{name: options}``, as
    ``gather_reference_state``'s meta holds them) its ``initial_lr``. CheckpointError naming the
    group when one has no ``initial_lr`` or its lr cannot be expressed by the group rules."""
    init = {}
    for name, g in saved.items():
        v = g.get("initial_lr") if isinstance(g, dict) else None
        if not _number(v) or v < 0:
            raise CheckpointError(f"optimizer group {name} has initial_lr {v!r}: the shards do not record the run's lrs (not a base_train checkpoint?)")
        init[name] = float(v)
    width = param_names_shapes.get("wte.weight") or param_names_shapes.get("lm_head.weight")
    s = (width[1] / 768) ** -0.5
    # Without a smear group no lr is fixed: the scale then stays 1 and is folded into the others.
    scale = init["smear"] / SMEAR_LR if init.get("smear") else 1.0
    out = {"lr_scale": scale}
    muon = sorted(n for n in init if n.startswith("matrix_"))
    out["matrix_lr"] = init[muon[0]] / scale if muon else SETUP_DEFAULTS["matrix_lr"]
    for key, group, scaled in (("embedding_lr", "embedding", True), ("unembedding_lr", "unembedding", True), ("scalar_lr", "x0", False)):
        out[key] = init[group] / (scale * (s if scaled else 1.0)) if group in init else SETUP_DEFAULTS[key]
    rules = reference_param_groups(param_names_shapes, SimpleNamespace(**out, weight_decay=0.0))
    for g in rules:
        want = init.get(g["name"])
        if want is None:
            raise CheckpointError(f"the optimizer shards have no group {g['name']}: not this model's reference optimizer")
        if not _close(g["lr"], want):
            raise CheckpointError(f"optimizer group {g['name']}'s initial_lr {want!r} cannot be expressed by the nanochat group rules "
                                  f"(they give {g['lr']!r} from the other groups' lrs): this optimizer state cannot be continued exactly; import the folder without its optim_*_rank*.pt files (weights-only) and set optim lrs by hand")
    return out


def base_weight_decay(saved: dict, step: int, steps: int) -> float | None:
    """Muon's base weight decay from the groups' saved scheduled value, or None when it cannot
    be recovered (no Muon group, or the schedule's factor is zero there).

    base_train sets ``weight_decay = base x (1 + cos(pi it / num_iterations)) / 2`` before the
    update of step ``it`` and saves step N before that step's update, so a save at N > 0 holds
    the value of ``it = N - 1`` (at N = 0, setup_optimizer's base value). ``steps`` is the
    schedule's length (the imported config's ``schedule.steps``)."""
    wds = [float(g["weight_decay"]) for g in saved.values() if isinstance(g, dict) and g.get("kind") == "muon" and _number(g.get("weight_decay"))]
    if not wds:
        return None
    if any(not _close(w, wds[0]) for w in wds):
        raise CheckpointError(f"the Muon groups' saved weight_decay values differ ({sorted(set(wds))}): not one reference schedule")
    factor = 1.0 if step <= 0 else reference_weight_decay(step - 1, steps, 1.0)
    if abs(factor) < 1e-12:
        return None
    return wds[0] / factor


def apply_saved_optim(optim_cfg, saved: dict, param_names_shapes: dict, step: int, steps: int) -> dict:
    """Set ``optim_cfg``'s lrs (and Muon's weight decay where it can be recovered) from the saved
    groups; returns what was set and from where (for the import's manifest)."""
    lrs = optim_lrs_from_groups(saved, param_names_shapes)
    for key, value in lrs.items():
        setattr(optim_cfg, key, value)
    note = {"lrs": "the optimizer shards' initial_lr", **lrs}
    wd = base_weight_decay(saved, step, steps)
    if wd is None:
        note["weight_decay"] = optim_cfg.weight_decay
        note["weight_decay_from"] = (f"user_config / preset: the shards' scheduled Muon weight decay cannot be inverted at step {step} "
                                     f"of {steps} (no Muon group, or the cosine factor is zero)")
    else:
        optim_cfg.weight_decay = wd
        note["weight_decay"] = wd
        note["weight_decay_from"] = f"the Muon groups' saved weight_decay / the cosine schedule's factor at step {max(step - 1, 0)} of {steps}"
    return note
