"""Checkpoints: one directory per save, written atomically, verified by a manifest.

Layout of ``RUN_DIR/step-XXXXX/`` (nanoGPT's "plain dict" idea, split into safe formats):

- ``model.safetensors``  PoEGPT ``state_dict`` (fp32 master weights);
- ``optim.safetensors`` + ``optim.json``  optimizer state in a world-size-independent layout
  (``"<param>/<state>"`` tensors, see ``optim.full_state_dict``) so a run can resume on another
  number of ranks;
- ``rng.safetensors``  torch CPU and CUDA generator states, every rank's (``runtime.rng_states``);
- ``meta.json``  step, phase, rel_step, lrm, tokens, tokens_in_phase, train_val_bpb, loader state;
- ``config.json``  the resolved config (``Config.to_dict``);
- ``tokenizer.json``;
- ``manifest.json``  sha256 and size of every other file, written last.

The directory is assembled under a temporary name, fsynced and renamed (``fsio.atomic_dir``), so
a crash leaves the previous checkpoints and either a complete new one or none. ``RUN_DIR/latest``
names the newest complete checkpoint. Loading verifies the manifest first, so a truncated or
bit-flipped file is reported (one line, exit 2) instead of being half-read; only safetensors and
JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poelm import config as config_mod
from poelm.core.errors import CheckpointError, ConfigError
from poelm.fsio import atomic_dir, atomic_write_json, atomic_write_text, recover_swaps, sha256_file, sweep_temps
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train.runtime import rng_states

STEP_RE = re.compile(r"^step-(\d{5,})$")


def step_name(step: int) -> str:
    """``step-XXXXX``: zero-padded to 5 digits, more when needed (SPEC "Trajectory")."""
    if step < 0:
        raise ValueError("step must be >= 0")
    return f"step-{step:05d}"


def _state_for_save(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_manifest(d: Path, provenance: dict | None = None) -> dict:
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = p.relative_to(d).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "poelm-checkpoint", "version": 1, "files": files}
    if provenance:  # where an imported checkpoint came from (trajectory/nanochat.py)
        manifest["provenance"] = provenance
    atomic_write_json(d / "manifest.json", manifest)
    return manifest


def save(run_dir, step: int, model: PoEGPT, cfg, tokenizer, meta: dict, optim_state=None, extra_tensors=None,
         provenance=None, rng=None) -> Path:
    """Write ``run_dir/step-XXXXX`` atomically and point ``run_dir/latest`` at it.

    ``optim_state`` is ``optimizer.full_state_dict()`` = (tensors, meta), gathered beforehand
    (a collective under torch.distributed: every rank gathers, only rank 0 saves; see ``train``).
    ``extra_tensors`` ``{file name: {key: tensor}}``: more safetensors files of the checkpoint
    (covered by the manifest); ``provenance``: a json-able dict stored in the manifest; ``rng``:
    the generator states (``runtime.rng_states``, every rank's), default this process's."""
    run_dir = Path(run_dir)
    final = run_dir / step_name(step)
    model_sd = _state_for_save(model.state_dict())
    try:
        _write(final, model_sd, optim_state, cfg, tokenizer, meta, step, extra_tensors, provenance, rng)
    except OSError as e:
        newest = latest(run_dir)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; nothing was replaced (newest complete checkpoint: {newest})") from None
    atomic_write_text(run_dir / "latest", final.name + "\n")
    return final


def _write(final: Path, model_sd, opt, cfg, tokenizer, meta, step, extra=None, provenance=None, rng=None):
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(model_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if opt is not None:
            tensors, ometa = opt
            save_file(_state_for_save(tensors), str(tmp / "optim.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / "optim.json", ometa)
        save_file(rng if rng is not None else rng_states(None), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "meta.json", {**meta, "step": step})
        atomic_write_json(tmp / "config.json", cfg.to_dict())
        tokenizer.save(tmp)
        for name, tensors in (extra or {}).items():
            save_file(_state_for_save(tensors), str(tmp / name), metadata={"format": "pt"})
        write_manifest(tmp, provenance)


def clean_run_dir(run_dir) -> None:
    """At a run's start: finish interrupted overwrites and drop half-written temp dirs."""
    if Path(run_dir).is_dir():
        recover_swaps(run_dir)
        sweep_temps(run_dir, "step-")


def verify(ckpt_dir) -> dict:
    """Check every file against ``manifest.json``; return the manifest or raise one clear line."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d} (give a step-XXXXX directory of a run)")
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {d} has no manifest.json: it is incomplete or not a poelm checkpoint; resume from an earlier one")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {d}: manifest.json is corrupt; resume from an earlier checkpoint") from None
    for name, info in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d} is missing {name}; resume from an earlier checkpoint")
        if p.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"checkpoint {d}: {name} is truncated ({p.stat().st_size} of {info.get('bytes')} bytes); resume from an earlier checkpoint")
        if sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"checkpoint {d}: {name} does not match its manifest hash (corrupted); resume from an earlier checkpoint")
    return manifest


@dataclass
class Checkpoint:
    path: Path
    config: "config_mod.Config"
    meta: dict
    model_state: dict
    optim_tensors: dict | None
    optim_meta: dict | None
    rng: dict | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _load_safetensors(path: Path, what: str) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {str(e).splitlines()[0]} (corrupt or truncated file)") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a checkpoint/export, or one CheckpointError line (missing / not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{what} is not valid JSON: {path}") from None


def load(ckpt_dir, check: bool = True, with_optim: bool = True) -> Checkpoint:
    """Read a checkpoint (verifying its manifest first unless ``check=False``)."""
    d = Path(ckpt_dir)
    if check:
        verify(d)
    elif not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d}")
    try:
        cfg = config_mod.from_saved(read_json(d / "config.json", "checkpoint config"))
        config_mod.validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {d} has an invalid config.json: {e}") from None
    meta = read_json(d / "meta.json", "checkpoint meta")
    model_state = _load_safetensors(d / "model.safetensors", "model weights")
    ot = om = None
    if with_optim and (d / "optim.safetensors").is_file():
        ot = _load_safetensors(d / "optim.safetensors", "optimizer state")
        om = read_json(d / "optim.json", "optimizer meta")
    rng = _load_safetensors(d / "rng.safetensors", "RNG state") if (d / "rng.safetensors").is_file() else None
    return Checkpoint(d, cfg, meta, model_state, ot, om, rng)


def load_state_into(model: PoEGPT, state: dict, where) -> None:
    """Strict load with a one-line error on an architecture mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{where} does not match the model architecture ({what}); check model.* settings")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where} does not match the model architecture: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


def latest(run_dir) -> Path | None:
    """Newest complete checkpoint in ``run_dir`` (by step; incomplete temp dirs are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    recover_swaps(run_dir)
    cands = []
    for p in run_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "manifest.json").is_file():
            cands.append((int(m.group(1)), p))
    return max(cands)[1] if cands else None


def save_dir(path) -> Path:
    """The one folder a "save" names: a checkpoint dir or an exported folder as given, a run dir as
    its newest checkpoint. One home for the rule (load_model, export, average all take a save);
    CheckpointError when it names nothing."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d} (give a step-XXXXX checkpoint dir, a run dir or an exported folder)")
    if not (d / "model.safetensors").is_file():
        newest = latest(d)
        if newest is None:
            raise CheckpointError(f"{d} holds no checkpoint (no model.safetensors and no step-XXXXX checkpoints)")
        d = newest
    return d


def prune(run_dir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    import shutil

    run_dir = Path(run_dir)
    steps = sorted((int(STEP_RE.match(p.name).group(1)), p) for p in run_dir.iterdir() if STEP_RE.match(p.name) and p.is_dir())
    for _, p in steps[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def is_hf_export(d: Path) -> bool:
    cfg = d / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "poelm"
    except ValueError:
        return False


def load_model(path, device="cpu", check: bool = True):
    """(model in eval mode, tokenizer, meta) from a checkpoint dir, a run dir (its newest
    checkpoint) or an exported Hugging Face folder (``model.`` prefixed keys, config.json with
    ``model_type = "poelm"``). For an export, ``meta`` holds the config.json fields (phase
    metadata, ``poe_wand_p99_bounds_per_stage_head``)."""
    from poelm.data.tokenizer import Tokenizer

    d = save_dir(path)
    if is_hf_export(d):
        hf = read_json(d / "config.json", "export config")
        mcfg = ModelConfig.from_dict(hf)
        state = _load_safetensors(d / "model.safetensors", "model weights")
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        meta = dict(hf)
        meta.setdefault("step", hf.get("step", 0))
        meta["config"] = hf.get("poelm_config")
    else:
        ck = load(d, check=check, with_optim=False)
        mcfg, state, meta = ck.config.model, ck.model_state, dict(ck.meta)
        meta["config"] = ck.config.to_dict()
        calib = d / "calibration.json"
        if calib.is_file():
            meta.update(read_json(calib, "calibration"))
    model = PoEGPT(mcfg)
    load_state_into(model, state, f"weights in {d}")
    model.to(device).eval()
    tok = Tokenizer.load(d)
    if tok.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"tokenizer in {d} has {tok.vocab_size} tokens but the model expects {mcfg.vocab_size}")
    meta["path"] = str(d)
    return model, tok, meta
