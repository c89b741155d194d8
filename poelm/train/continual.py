"""What a continual phase is, as configuration: the card's B2 schedule scaled to a length, and
the rule that a continual phase keeps architecture, tokenizer and data mix (SPEC "continual
phase"). Pure functions of configs; ``loop.continue_phase`` runs the phase they describe."""

from __future__ import annotations

from poelm import config as config_mod
from poelm.core.errors import ConfigError
from poelm.schedule import CARD_B2


def continual_phase_config(base_cfg, phase_cfg=None, steps: int | None = None, tokens_budget: int | None = None,
                           default_tokens_per_step: int | None = None):
    """The config of a continual phase: the checkpoint's own config with a new schedule.

    Without a phase config the schedule is the card's B2 shape (warmup 1000 of 50,800 steps, peak
    0.5, warmdown 55%, final 0) scaled to ``steps``: warmup = round(steps * 1000 / 50800). A
    token budget is converted with the phase's global batch (``train.tokens_per_step``, else the
    source run's, ``default_tokens_per_step``)."""
    cfg = phase_cfg if phase_cfg is not None else config_mod.from_dict(base_cfg.to_dict())
    if not cfg.train.tokens_per_step and default_tokens_per_step:
        cfg.train.tokens_per_step = int(default_tokens_per_step)
    tps = cfg.train.tokens_per_step or cfg.train.device_batch_size * cfg.seq_len
    if tokens_budget is not None:
        steps = config_mod.steps_for_tokens(tokens_budget, tps)
    if phase_cfg is None:
        n = steps or CARD_B2["steps"]
        cfg.schedule = config_mod.ScheduleConfig(name="b2", steps=n, warmup=max(1, round(n * CARD_B2["warmup"] / CARD_B2["steps"])),
                                                 peak=CARD_B2["peak"], warmdown_ratio=CARD_B2["warmdown_ratio"], final=CARD_B2["final"])
    elif steps is not None:
        cfg.schedule.steps = steps
    config_mod.validate(cfg)
    return cfg


def check_same_run(base, new, allow: bool, tokenizer_src, tokenizer_new=None):
    """A continual phase keeps architecture, tokenizer and data mix (the card's definition)."""
    if allow:
        return
    if base.model.to_dict() != new.model.to_dict():
        diff = [k for k, v in base.model.to_dict().items() if new.model.to_dict().get(k) != v]
        raise ConfigError(f"continual phase changes the architecture (model.{diff[0]}); a continual phase keeps it (pass --allow-mismatch to override)")
    from poelm.data import corpus as data

    if data.data_fingerprint(base.data) != data.data_fingerprint(new.data):
        raise ConfigError("continual phase changes the data mix ([data]); a continual phase keeps it (pass --allow-mismatch to override)")
    if tokenizer_new is not None and tokenizer_new.fingerprint != tokenizer_src.fingerprint:
        raise ConfigError("continual phase changes the tokenizer; a continual phase keeps it (pass --allow-mismatch to override)")
