"""Cooldown probes: "what would BPB be if we annealed here?"

At an LR multiplier of 0.5 a model's loss stays high whatever it has learned, so a trajectory's
peak-phase saves cannot say what a cycle is extracting. Hägele et al. 2024 ("Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations", arXiv:2405.18392) show that a short
cooldown from a constant-LR checkpoint recovers the loss a full schedule would reach (the
warmup-stable-decay idea of MiniCPM, Hu et al. 2024; the "river valley" picture of Wen et al.
2024: the decay descends from the hillside to the valley floor the run has been travelling
along). A probe is that cooldown as a throw-away branch: from a full checkpoint (weights,
optimizer state, loader position) continue on the same data stream for ``N`` steps while the
multiplier decays from the checkpoint's current lrm to ``to_lrm`` (``poelm.schedule.cooldown_lrm``:
linear or 1-sqrt), save, measure, compare with the save it started from.

The probe runs on the training loop's own machinery (``loop._make_trainer`` / ``Trainer``, with a
``poelm.schedule.Cooldown`` as its phase), so it is the run itself continued, bit for bit, under
another schedule. Its checkpoint lands in its own directory (default
``<run dir>/cooldowns/cooldown-XXXXX-N/``) and publishes as branch ``cooldown-XXXXX-N``
(``poelm.trajectory.publish``), never as a step branch and never as ``main``. The source
checkpoint is only read.

A TARGET without optimizer state or loader position (an export, a published branch) is refused,
unless ``fresh_optimizer``: then AdamW/Muon start from zero state and the loader skips the rows
that the recorded token count says were consumed (rows = tokens / seq_len: the loader hands out
rows of seq_len targets, and every step takes tokens_per_step / seq_len of them), or starts at the
stream's beginning when no count is known; the manifest records which.

``Prober`` runs a probe at every K-th save of a ``poelm continue`` phase *between saves*,
synchronously, on the same devices: the phase waits for the probe (N steps plus one save per
probe), so its tokens/s drop by about ``N / (K * save_every + N)``, while its trajectory stays
bitwise what it would be without probes (the probe loads the save from disk into its own model
and optimizer, and the global RNG state is restored afterwards). Running it in the background
instead would need a second copy of model and optimizer state on the device and would compete
with the phase for the same compute, for no gain in total time on one machine.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from poelm import config as config_mod
from poelm import track
from poelm.core.errors import CheckpointError, ConfigError
from poelm.schedule import COOLDOWN_SHAPES, Cooldown, lrm
from poelm.train import checkpoint as ckpt_mod
from poelm.train import loop
from poelm.train.runtime import setup_runtime, teardown_runtime

FRESH_HINT = ("cool down from the run's checkpoint dir (its step-XXXXX save), or pass --fresh-optimizer "
              "(fresh AdamW/Muon state, loader position from the token count; recorded in the manifest)")


def probe_name(step: int, steps: int) -> str:
    """``cooldown-XXXXX-N`` (the branch name ``poelm.trajectory.publish.cooldown_branch_name`` gives)."""
    return f"cooldown-{int(step):05d}-{int(steps)}"


def check_args(steps, shape: str, to_lrm: float) -> None:
    """The arguments alone (no IO): N >= 1, a known shape, a finite non-negative target lrm."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"--steps must be a positive number of steps, got {steps}")
    if shape not in COOLDOWN_SHAPES:
        raise ConfigError(f"unknown cooldown shape {shape!r}: use {' or '.join(COOLDOWN_SHAPES)}")
    if not isinstance(to_lrm, (int, float)) or not math.isfinite(to_lrm) or to_lrm < 0:
        raise ConfigError(f"--to-lrm must be a finite number >= 0, got {to_lrm}")


def current_lrm(meta: dict, where) -> float:
    """The LR multiplier a checkpoint was saved at (``meta["lrm"]``, else ``lrm(step, phase)``)."""
    if isinstance(meta.get("lrm"), (int, float)):
        return float(meta["lrm"])
    if isinstance(meta.get("phase"), dict) and meta.get("step") is not None:
        return lrm(int(meta["step"]), loop._phase_from(meta["phase"]))
    raise CheckpointError(f"{where} records neither its LR multiplier (lrm) nor its phase; a cooldown cannot know where to start")


def load_source(path, fresh_optimizer: bool = False) -> ckpt_mod.Checkpoint:
    """The checkpoint a probe starts from. A training checkpoint must hold optimizer state and a
    loader position unless ``fresh_optimizer``; an exported folder (a checked-out branch) holds
    neither and needs ``fresh_optimizer``. One ``CheckpointError`` line otherwise."""
    d = Path(path)
    if d.is_dir() and not (d / "model.safetensors").is_file():
        d = ckpt_mod.latest(d) or d
    if ckpt_mod.is_hf_export(d):
        if not fresh_optimizer:
            raise CheckpointError(f"{d} is an exported folder: it has no optimizer state and no loader position; {FRESH_HINT}")
        hf = ckpt_mod.read_json(d / "config.json", "export config")
        if not isinstance(hf.get("poelm_config"), dict):
            raise CheckpointError(f"{d}/config.json has no poelm_config: the run's settings (data, optimizer) are unknown")
        try:
            cfg = config_mod.validate(config_mod.from_saved(hf["poelm_config"]))
        except ConfigError as e:
            raise CheckpointError(f"{d} has an invalid poelm_config: {e}") from None
        state = ckpt_mod._load_safetensors(d / "model.safetensors", "model weights")
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        meta = {k: hf.get(k) for k in ("step", "rel_step", "phase", "lrm", "tokens", "tokens_in_phase", "train_val_bpb")}
        meta["tokens_per_step"] = cfg.train.tokens_per_step or None
        if meta["step"] is None:
            raise CheckpointError(f"{d}/config.json does not record its step")
        return ckpt_mod.Checkpoint(d, cfg, meta, state, None, None, None)
    src = ckpt_mod.load(d, with_optim=True)
    missing = [what for what, have in (("optimizer state (optim.safetensors)", src.optim_tensors is not None),
                                       ("loader position (meta.json loader_state)", src.meta.get("loader_state") is not None)) if not have]
    if missing and not fresh_optimizer:
        raise CheckpointError(f"{d} has no {' and no '.join(missing)}; {FRESH_HINT}")
    if fresh_optimizer:  # asked for: start the optimizer from zero state even when the checkpoint has one
        src.optim_tensors = src.optim_meta = None
    return src


def plan(src: ckpt_mod.Checkpoint, steps: int, shape: str = "linear", to_lrm: float = 0.0) -> Cooldown:
    """The probe's schedule from ``src``: ``Cooldown(steps, src.step, current lrm -> to_lrm, shape)``."""
    check_args(steps, shape, to_lrm)
    if isinstance(src.meta.get("phase"), dict) and src.meta["phase"].get("kind") == Cooldown.kind:
        raise ConfigError(f"{src.path} is itself a cooldown probe (lrm {src.meta.get('lrm')}); probe a save of the trajectory instead")
    start = current_lrm(src.meta, src.path)
    if to_lrm > start:
        raise ConfigError(f"--to-lrm {to_lrm:g} is above the checkpoint's current lrm {start:g} (step {src.step}); a cooldown only decays")
    return Cooldown(steps=steps, start_step=src.step, from_lrm=start, to_lrm=float(to_lrm), shape=shape)


def default_out(src_path, step: int, steps: int) -> Path:
    """``<run dir>/cooldowns/cooldown-XXXXX-N`` beside the source save (its run dir)."""
    return Path(src_path).parent / "cooldowns" / probe_name(step, steps)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; a probe writes a new directory (pass --out)")


def _probe_config(src_cfg):
    """The source run's config, unchanged but for saving: one save at the end, no periodic eval."""
    cfg = config_mod.from_dict(src_cfg.to_dict())
    cfg.train.save_every = 0
    cfg.train.eval_every = 0
    cfg.train.keep_last = 0
    return config_mod.validate(cfg)


def _fast_forward(loader, rows: int, chunk: int = 256) -> None:
    """Advance the loader by ``rows`` global rows (the data a fresh-optimizer probe skips)."""
    loader.skip(rows)  # rows not materialised, nor counted into the first step's batch hash


def _build(src, cool: Cooldown, out: Path, rt, publisher, progress: bool, source_label, fresh: bool, tracking=None):
    """The probe's ``Trainer`` (``loop._make_trainer`` with the cooldown as its phase)."""
    cfg = _probe_config(src.config)
    trainer = loop._make_trainer(cfg, out, rt, None, publisher, progress, phase=cool, init_ckpt=src, tracking=tracking)
    loader_from = "checkpoint"
    if src.meta.get("loader_state") is None:
        tokens = src.meta.get("tokens")
        if isinstance(tokens, int) and tokens > 0:
            rows = tokens // cfg.seq_len
            _fast_forward(trainer.loader, rows)
            loader_from = f"fast-forwarded {rows} rows (tokens {tokens} / seq_len {cfg.seq_len})"
        else:
            loader_from = "stream start (token count unknown)"
    trainer.tokens_in_phase = 0
    trainer.extra_meta = {"cooldown": {
        "source": str(source_label or src.path), "source_step": src.step, "source_phase": src.meta.get("phase"),
        "source_tokens": src.meta.get("tokens"), "from_lrm": cool.from_lrm, "to_lrm": cool.to_lrm, "shape": cool.shape,
        "steps": cool.steps, "tokens_in_cooldown": cool.steps * trainer.tokens_per_step,
        "optimizer": "fresh" if src.optim_tensors is None else "checkpoint", "loader": loader_from,
        "fresh_optimizer": bool(fresh)}}
    return trainer


def cooldown(source, out_dir=None, steps: int = 0, shape: str = "linear", to_lrm: float = 0.0, publisher=None,
             progress: bool = True, fresh_optimizer: bool = False, source_label=None, tracking=None) -> dict:
    """Run one cooldown probe from ``source`` (a checkpoint dir, a run dir or, with
    ``fresh_optimizer``, an exported folder; or a ``load_source`` result; ``poelm.targets``
    resolves TARGETs) and save it
    under ``out_dir`` (default ``default_out``). ``publisher``: a zero-argument factory of a
    ``Publisher`` (rank 0 only), which publishes the probe as ``cooldown-XXXXX-N``.

    Everything is validated before any compute: N, shape, the source's state, ``to_lrm`` against
    the current lrm, a fresh output directory. Returns the training summary plus ``ckpt`` (the
    probe's checkpoint), ``cooldown`` (its provenance), ``branches`` (published) and ``elapsed_s``."""
    check_args(steps, shape, to_lrm)
    src = source if isinstance(source, ckpt_mod.Checkpoint) else load_source(source, fresh_optimizer)
    cool = plan(src, steps, shape, to_lrm)
    out = Path(out_dir) if out_dir is not None else default_out(src.path, src.step, steps)
    check_out(out)
    track.check(src.config.train.trackers)  # a tracker not installed: one error line before any compute
    rt = setup_runtime(_probe_config(src.config))
    try:
        trainer = _build(src, cool, out, rt, publisher, progress, source_label, fresh_optimizer, tracking)
        try:
            summary = trainer.run()
        finally:
            loop._finish(trainer)
        branches = list(trainer.publisher.published) if trainer.publisher is not None else []
    finally:
        teardown_runtime(rt)
    return {**summary, "ckpt": str(out / ckpt_mod.step_name(cool.end_step)), "cooldown": trainer.extra_meta["cooldown"],
            "lrm_end": lrm(cool.end_step, cool), "branches": branches}


class Prober:
    """``Trainer.after_save`` hook of ``poelm continue --cooldown-every K --cooldown-steps N``: a
    probe from every K-th save after the seed, run between saves (module docstring), written to
    ``<phase dir>/cooldowns/cooldown-XXXXX-N`` and handed to the phase's publisher (so it
    publishes after its step branch). A save whose lrm is already <= ``to_lrm`` (the phase's
    annealed end) is skipped and logged. ``probes`` lists what ran, with the seconds each took."""

    def __init__(self, every: int, steps: int, shape: str = "linear", to_lrm: float = 0.0):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ConfigError(f"--cooldown-every must be a positive number of saves, got {every}")
        check_args(steps, shape, to_lrm)
        self.every, self.steps, self.shape, self.to_lrm = every, steps, shape, float(to_lrm)
        self.saves = 0
        self.probes: list[dict] = []

    def __call__(self, trainer, path) -> None:
        self.saves += 1
        if self.saves % self.every:
            return
        step, phase = trainer.step, trainer.phase
        at = lrm(step, phase)
        if at <= self.to_lrm:
            trainer.log({"kind": "cooldown_skipped", "step": step, "lrm": at, "reason": f"lrm {at:g} <= to_lrm {self.to_lrm:g}"})
            return
        t0 = time.time()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            src = load_source(trainer.out_dir / ckpt_mod.step_name(step))  # every rank reads the save just written
            cool = plan(src, self.steps, self.shape, self.to_lrm)
            out = trainer.out_dir / "cooldowns" / probe_name(step, self.steps)
            check_out(out)
            probe = _build(src, cool, out, trainer.rt, None, False, f"{trainer.out_dir.name}/{ckpt_mod.step_name(step)}", False)
            probe.publisher = trainer.publisher  # same queue: published after the step branch it forks from
            probe._val = trainer._val  # same data and tokenizer: the validation tokens are shared
            if trainer.loader.state_dict() == probe.loader.state_dict():
                # the phase's loader stands exactly where the save left it: a copy keeps its
                # tokenised unit, so the probe does not tokenise the corpus again
                probe.loader = copy.deepcopy(trainer.loader)
            try:
                summary = probe.run()
            finally:
                if probe.tracker is not None:  # the probe's own run (poelm.track: tagged with its source step)
                    probe.tracker.finish()
            del probe, src
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        dt = time.time() - t0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        val = (summary.get("val_bpb") or {}).get("full")
        rec = {"kind": "cooldown", "step": step, "steps": self.steps, "shape": self.shape, "from_lrm": cool.from_lrm,
               "to_lrm": self.to_lrm, "out": str(out), "val_bpb": val, "elapsed_s": dt}
        trainer.log(rec)
        self.probes.append(rec)
