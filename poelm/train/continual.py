"""What a continual phase is, as configuration: the card's B2 schedule scaled to a length, and
the rule that a continual phase keeps architecture, tokenizer and data mix (SPEC "continual
phase"). Pure functions of configs; ``loop.continue_phase`` runs the phase they describe.
The domain-adaptive variant (``add_data``, ``poelm continue --add-data PATH --replay R``) is the
one sanctioned change of the data mix: the new mixture is derived from the old one and recorded
(``added_data_record``), and the architecture and tokenizer checks still apply."""

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


# ----------------------------------------------------------------------------- domain-adaptive continue
ADDED = "added"  # the name of the new source in the phase's mixture


def check_replay(replay) -> float:
    """The replay share: a float in [0, 1) (1 would be the old mix alone: no new data)."""
    if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0.0 <= float(replay) < 1.0:
        raise ConfigError(f"--replay must be in [0, 1) (the old mix's share of the new mixture), got {replay!r}")
    return float(replay)


def add_data(cfg, path: str, replay: float):
    """``cfg`` (a copy) training on a new mixture: the new source ``added`` at weight ``1 - replay``
    and every source of the old mix at ``replay`` times its own weight: replaying a share of the
    old data limits forgetting (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
    Pre-train Large Language Models", arXiv 2403.08763, study shares of 1% to 50%). Replay 0 trains on the new source alone. The phase's validation split
    is that mixture's (each source's own split, by weight)."""
    from poelm.data import corpus as data

    replay = check_replay(replay)
    data.source_files(data.Source(ADDED, str(path), 1.0))  # a missing corpus (text or shards) fails before any compute
    old = data.resolve_sources(cfg.data)
    if any(s.name == ADDED for s in old):
        raise ConfigError(f"the checkpoint's mix already has a source named '{ADDED}': continue from it without --add-data, or rename that source")
    d = cfg.to_dict()
    srcs = [{"name": s.name, "path": s.path, "weight": replay * s.weight} for s in old] if replay > 0 else []
    d["data"]["sources"] = srcs + [{"name": ADDED, "path": str(path), "weight": 1.0 - replay}]
    return config_mod.validate(config_mod.from_dict(d))


def carry_loader_state(state: dict | None, data_cfg, tokenizer_fingerprint: str) -> dict | None:
    """The old loader position re-expressed for the new mixture: the row counter and every kept
    old source's position carry over (replayed rows are those the old run would have read next),
    the new source starts at its beginning. None (a fresh stream) without a saved state."""
    from poelm.data import corpus as data

    if not state:
        return None
    old = {s["name"]: s for s in state.get("sources", [])}
    fresh = {"epoch": 0, "unit": 0, "doc": 0, "tok": 0, "rows": 0}
    srcs = [{**(old.get(s.name) or fresh), "name": s.name} if s.name != ADDED else {**fresh, "name": s.name}
            for s in data.resolve_sources(data_cfg)]
    return {**state, "data_fingerprint": data.data_fingerprint(data_cfg), "tokenizer_fingerprint": tokenizer_fingerprint,
            "sources": srcs}


def added_data_record(cfg, path: str, replay: float) -> dict:
    """What the phase's record says about its mixture (every save's meta ``added_data``)."""
    from poelm.data import corpus as data

    return {"path": str(path), "replay": replay, "mixture": {s.name: round(s.weight, 12) for s in data.resolve_sources(cfg.data)}}
