"""``poelm import nanochat`` and ``poelm export --format nanochat``: the reference's checkpoints.

The card's checkpoints come from the reference implementation (GitHub ``jaepil/nanochat``, a fork
of ``karpathy/nanochat``; facts in ``../shared/reference/nanochat-poe.md``). Its
``checkpoint_manager.save_checkpoint`` writes, per saved step N, into one folder:
``model_{N:06d}.pt`` (the model's state dict), ``meta_{N:06d}.json`` (``model_config``, step,
loader state) and one ``optim_{N:06d}_rank{r}.pt`` per rank (DistMuonAdamW's ZeRO-2 shards).

Import reads those files (``torch.load(..., weights_only=True)``: tensors and plain containers
only, nothing is unpickled), maps every tensor name through :data:`NAME_RULES` (the one
reference <-> poelm name map, used both ways), crops the vocabulary padding rows
(``ceil(V / 64) * 64`` rows: ``wte``, ``lm_head``, every stage head and value-embedding table;
never a prediction target), keeps bf16 tensors as fp32 master weights (exact), gathers the W
optimizer shards into poelm's world-size-independent state (``train/optim_nanochat.py``) and
writes a poelm checkpoint (``train/checkpoint.py``). What poelm does not model is kept so the
way back is exact: the padding rows (weights and optimizer state) in ``nanochat_padding.safetensors``,
the source dtypes (model and optimizer-state tensors) and the reference's own meta JSON in
``meta.json["nanochat"]``; the source files' sha256 and the step in the manifest's ``provenance``.

Optimizer lrs: the reference's base_train multiplies every lr by ``batch_lr_scale =
sqrt(total_batch_size / 2**19)`` (and rescales weight decay) while ``user_config`` keeps the
unscaled CLI values, so with optimizer shards the imported ``optim`` config is derived from the
saved groups' ``initial_lr`` (``train/nanochat_lrs.py``: ``lr_scale`` from the smear group, the
rest by inverting the group rules; every group's lr is reproduced to rounding; this wins over a
``--preset``'s lrs) and Muon's base weight decay from its saved scheduled value (else user_config's,
as the manifest's ``provenance.optim_config`` says). A weights-only import (no shards) keeps
``user_config``'s (or the preset's) values.

Export writes the reference's folder back: ``model``, ``meta`` and a rank-0 optimizer file
(world size 1), padding rows restored (zeros for a checkpoint that never had any), each tensor in
its source dtype when that is exact (bf16 ``wte`` / value embeddings of a GPU run and their
optimizer state) and fp32 otherwise. ``import(export(x))`` equals ``x`` bitwise and ``export(import(ref))`` gives ``ref``'s
tensors bitwise (tests/trajectory/test_nanochat.py).

Every check runs before anything is written: a bad folder, step, shard set, tensor name, stage
layout, tokenizer or an unsupported variant (``dual_head``, ``frozen_layers``, a stage-delta
checkpoint) is one ``CheckpointError`` / ``ConfigError`` line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from poelm import config as config_mod
from poelm.core.errors import CheckpointError, ConfigError
from poelm.core.model import REFERENCE_OPS, ModelConfig, PoEGPT
from poelm.fsio import atomic_write_json, fsync_dir, sha256_file
from poelm.train import checkpoint as ckpt_mod

PAD_TO = 64  # GPT.__init__(pad_vocab_size_to=64)
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper prefix in a state dict saved from a compiled model
PADDING_FILE = "nanochat_padding.safetensors"
MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
OPTIM_RE = re.compile(r"^optim_(\d+)_rank(\d+)\.pt$")

# The one name map, read both ways: reference template <-> poelm template, with the pattern of
# every {field}. Nothing else names a reference tensor.
NAME_RULES = (
    ("transformer.wte.weight", "wte.weight"),
    ("transformer.h.{layer}.attn.{attn}.weight", "blocks.{layer}.attn.{attn}.weight"),
    ("transformer.h.{layer}.mlp.{mlp}.weight", "blocks.{layer}.mlp.{mlp}.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_head_stages.{k}.weight", "stage_heads.{k}.weight"),
    ("value_embeds.{layer}.weight", "value_embeds.{layer}.weight"),
    ("{scalar}", "{scalar}"),
    ("smear_gate.weight", "smear_gate.weight"),
)
FIELDS = {"layer": r"\d+", "k": r"\d+", "attn": "c_q|c_k|c_v|c_proj|ve_gate", "mlp": "c_fc|c_proj",
          "scalar": "resid_lambdas|x0_lambdas|smear_lambda|backout_lambda"}
PADDED_RE = re.compile(r"(?:wte|lm_head|stage_heads\.\d+|value_embeds\.\d+)\.weight")  # poelm names with vocabulary rows


def _pattern(tpl: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>{FIELDS[m.group(1)]})", re.escape(tpl)))


_TO_POELM = [(_pattern(r), t) for r, t in NAME_RULES]
_TO_REF = [(_pattern(t), r) for r, t in NAME_RULES]


def _rename(name: str, rules) -> str | None:
    for rx, tpl in rules:
        m = rx.fullmatch(name)
        if m:
            return tpl.format(**m.groupdict())
    return None


def to_poelm_name(ref: str) -> str | None:
    """poelm's name of a reference tensor (``_orig_mod.`` already stripped), or None if unknown."""
    return _rename(ref, _TO_POELM)


def to_ref_name(name: str) -> str | None:
    """The reference's name of a poelm parameter, or None if the reference has no such tensor."""
    return _rename(name, _TO_REF)


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // PAD_TO) * PAD_TO


# ----------------------------------------------------------------------------- the reference folder
@dataclass
class RefFolder:
    """One step of a reference checkpoint folder, its files checked to exist."""

    dir: Path
    step: int
    model: Path
    meta_path: Path
    optim: list[Path] = field(default_factory=list)  # rank order
    meta: dict = field(default_factory=dict)


def locate(directory, step: int | None = None) -> RefFolder:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"nanochat checkpoint folder not found: {d} (give the folder holding model_XXXXXX.pt, e.g. base_checkpoints/d32)")
    steps = sorted(int(m.group(1)) for p in d.iterdir() if (m := MODEL_RE.match(p.name)))
    if not steps:
        raise CheckpointError(f"{d} holds no model_XXXXXX.pt: not a nanochat checkpoint folder")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{d} has no step {step} (model_{step:06d}.pt); steps there: {', '.join(map(str, steps[-8:]))}")
    ref = RefFolder(d, step, d / f"model_{step:06d}.pt", d / f"meta_{step:06d}.json")
    if not ref.meta_path.is_file():
        raise CheckpointError(f"{d} has model_{step:06d}.pt but no meta_{step:06d}.json (the model config lives there)")
    try:
        ref.meta = json.loads(ref.meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{ref.meta_path} is not valid JSON") from None
    ranks = {}
    for p in d.iterdir():
        m = OPTIM_RE.match(p.name)
        if m and int(m.group(1)) == step:
            ranks[int(m.group(2))] = p
    if ranks:
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        if missing:
            raise CheckpointError(f"{d}: optimizer shards of step {step} are missing for rank(s) {', '.join(map(str, missing))} "
                                  f"(found {len(ranks)} of {max(ranks) + 1}); copy every optim_{step:06d}_rank*.pt, or none for a weights-only import")
        ref.optim = [ranks[r] for r in range(len(ranks))]
    return ref


def _model_config(ref: RefFolder) -> dict:
    mc = ref.meta.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{ref.meta_path} has no model_config: not a nanochat base checkpoint meta")
    if "base_model_dir" in ref.meta:
        raise CheckpointError(f"{ref.meta_path} is a stage-delta checkpoint (it points to base {ref.meta['base_model_dir']}): "
                              "import the full model it extends; deltas are not supported")
    if mc.get("dual_head"):
        raise CheckpointError(f"{ref.meta_path}: dual_head checkpoints (a specialist lm_head_stage) are not supported; import a per-stage-head base checkpoint")
    if int(mc.get("frozen_layers", 0) or 0):
        raise CheckpointError(f"{ref.meta_path}: frozen_layers = {mc['frozen_layers']} (a specialist stage run) is not supported; import a base checkpoint")
    if not mc.get("per_stage_head", False):
        raise CheckpointError(f"{ref.meta_path}: per_stage_head is false (one shared head, no stage heads): poelm imports per-stage-head PoE checkpoints only")
    for key in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
        if not isinstance(mc.get(key), int) or isinstance(mc.get(key), bool) or mc[key] <= 0:
            raise CheckpointError(f"{ref.meta_path}: model_config.{key} must be a positive integer, got {mc.get(key)!r}")
    return mc


def stage_layout(mc: dict, given=None) -> tuple[int, ...]:
    """``--stage-layers`` if given (checked to sum to ``n_layer``), else a ``stage_layers`` key of
    the model config (what ``export`` writes for a layout ``poe_every`` cannot say), else the
    public code's rule: a head after layer i when ``(i + 1) % poe_every == 0`` or i is the last."""
    n = mc["n_layer"]
    if given is None:
        given = mc.get("stage_layers")
    if given is not None:
        layers = tuple(int(x) for x in given)
        if not layers or min(layers) <= 0 or sum(layers) != n:
            raise ConfigError(f"stage layers {','.join(map(str, layers))} sum to {sum(layers)} but the checkpoint has n_layer {n}: give positive counts summing to {n}")
        return layers
    every = int(mc.get("poe_every", 1) or 1)
    ends = [i + 1 for i in range(n) if (i + 1) % every == 0 or i == n - 1]
    return tuple(b - a for a, b in zip([0] + ends[:-1], ends))


def model_config(mc: dict, layers: tuple[int, ...]) -> ModelConfig:
    """poelm's ModelConfig for a reference ``model_config`` with the reference's five ops
    (qk scale 1.2, gate ``3 sigmoid`` over 12 channels, smear over 24, sliding windows, RoPE base
    100,000), its init and its backout parameter. A config without ``window_pattern`` predates
    sliding windows and means ``"L"`` (``checkpoint_manager._patch_missing_config_keys``)."""
    return ModelConfig(
        vocab_size=mc["vocab_size"], depth=mc["n_layer"], n_embd=mc["n_embd"], n_head=mc["n_head"], n_kv_head=mc["n_kv_head"],
        intermediate=int(mc.get("intermediate_size", 0) or 0) or 4 * mc["n_embd"], max_seq_len=mc["sequence_len"],
        stage_layers=layers, value_embeds=True, softcap=15.0, objective="poe", alpha_train=0.0,
        window_pattern=str(mc.get("window_pattern", "L")))


def reference_model_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """The reference's ``model_config`` of a poelm model (``base``: the source's, kept where poelm
    has no opinion); an error if the model does not use the reference's ops."""
    want = {k: v for k, v in REFERENCE_OPS.items() if k not in ("window_pattern", "init")}
    want.update(short_window=0, softcap=15.0, value_embeds=True, objective="poe")
    for key, v in want.items():
        if getattr(cfg, key, None) != v:
            raise CheckpointError(f"the model has model.{key} = {getattr(cfg, key, None)!r}, the reference needs {v!r}: "
                                  "only a model with the reference's ops (configs/cognica-3b.toml, or an import) exports to nanochat")
    mc = dict(base or {})
    mc.update(sequence_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.depth, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
              n_embd=cfg.n_embd, window_pattern=cfg.window_pattern, dual_head=False, frozen_layers=0, per_stage_head=True)
    mc["intermediate_size"] = 0 if cfg.intermediate == 4 * cfg.n_embd and not mc.get("intermediate_size") else cfg.intermediate
    every = cfg.stage_layers[0]
    if stage_layout({"n_layer": cfg.depth, "poe_every": every}) == tuple(cfg.stage_layers):
        mc["poe_every"] = every
        mc.pop("stage_layers", None)
    else:  # the card's (16,6,5,5) is not a poe_every layout: said explicitly (the later, non-public code's key)
        mc.setdefault("poe_every", every)
        mc["stage_layers"] = list(cfg.stage_layers)
    return mc


# ----------------------------------------------------------------------------- tensors
def read_model(path: Path) -> tuple[dict, bool]:
    """The reference state dict (prefix stripped) and whether it carried ``_orig_mod.``."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"cannot read {path} as tensors only: {str(e).splitlines()[0][:200]} (a corrupt file, or not a state dict)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    prefixed = any(k.startswith(COMPILED_PREFIX) for k in sd)
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in sd.items()}, prefixed


def check_names(sd: dict, model: PoEGPT, vpad: int, where: Path) -> dict:
    """``{poelm name: reference name}`` after checking every name and shape (padded rows)."""
    own = model.state_dict()
    names = {}
    for ref in sd:
        name = to_poelm_name(ref)
        if name is None or name not in own:
            raise CheckpointError(f"{where}: unknown tensor {ref!r} for this model_config (stage layout {list(model.config.stage_layers)}); "
                                  "is it a nanochat per-stage-head checkpoint of the model its meta describes?")
        names[name] = ref
    missing = sorted(set(own) - set(names))
    if missing:
        raise CheckpointError(f"{where}: tensor {to_ref_name(missing[0]) or missing[0]!r} is missing (the stage layout or model_config does not match the file)")
    for name, ref in names.items():
        want = list(own[name].shape)
        if PADDED_RE.fullmatch(name):
            want[0] = vpad
        if list(sd[ref].shape) != want:
            raise CheckpointError(f"{where}: {ref} has shape {list(sd[ref].shape)}, model_config implies {want}")
    return names


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- import
def _tokenizer(path, ref: RefFolder, vocab_size: int):
    from poelm.data.tokenizer import BOS, Tokenizer

    cands = [Path(path)] if path else [ref.dir / "tokenizer.json", ref.dir.parent / "tokenizer" / "tokenizer.json",
                                       ref.dir.parent.parent / "tokenizer" / "tokenizer.json"]
    found = next((c for c in cands if c.is_file() or (c.is_dir() and (c / "tokenizer.json").is_file())), None)
    if found is None:
        raise CheckpointError(f"no tokenizer.json for {ref.dir}: give --tokenizer PATH (a Hugging Face tokenizer.json of the run's tokenizer; "
                              "nanochat's tokenizer.pkl is a pickle and is never read)")
    if found.suffix == ".pkl":
        raise CheckpointError(f"{found} is a pickle: give the Hugging Face tokenizer.json of the same tokenizer instead (poelm never unpickles)")
    tok = Tokenizer.load(found)
    if tok.vocab_size != vocab_size:
        raise CheckpointError(f"tokenizer {found} has {tok.vocab_size} tokens but the checkpoint's vocab_size is {vocab_size}: give the run's own tokenizer")
    bos = ref.meta.get("bos_token_id", (ref.meta.get("user_config") or {}).get("bos_token_id"))
    if bos is not None and int(bos) != tok.bos_id:
        raise CheckpointError(f"tokenizer {found} has {BOS} at id {tok.bos_id} but the checkpoint's is {bos}: give the run's own tokenizer")
    return tok, found


def _poelm_config(mcfg: ModelConfig, ref: RefFolder, preset: str | None):
    d = config_mod.load_dict(preset) if preset else {}
    own = mcfg.to_dict()
    differs = sorted(k for k, v in (d.get("model") or {}).items() if k in own and v != own[k] and not (k == "stage_layers" and list(v) == own[k]))
    d["model"] = own
    d.setdefault("optim", {})["optimizer"] = "nanochat"
    if not preset:  # the run's own settings where its meta has them (base_train's CLI arguments)
        uc = ref.meta.get("user_config") or {}
        for key in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay"):
            if isinstance(uc.get(key), (int, float)) and not isinstance(uc.get(key), bool):
                d["optim"][key] = float(uc[key])
        tr = d.setdefault("train", {})
        if isinstance(ref.meta.get("device_batch_size"), int):
            tr["device_batch_size"] = ref.meta["device_batch_size"]
        if isinstance(ref.meta.get("max_seq_len"), int) and ref.meta["max_seq_len"] <= mcfg.max_seq_len:
            tr["seq_len"] = ref.meta["max_seq_len"]
        if isinstance(ref.meta.get("total_batch_size"), int):
            tr["tokens_per_step"] = ref.meta["total_batch_size"]
    cfg = config_mod.from_dict(d)
    return config_mod.validate(cfg), differs


def _check_out(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty: give a new run directory for the import")


def import_nanochat(directory, out, step: int | None = None, tokenizer=None, stage_layers=None, preset: str | None = None) -> dict:
    """Import one step of a reference checkpoint folder as ``out/step-XXXXX`` (see the module
    docstring). Returns a summary (path, step, world size, weights-only, tensors, bytes)."""
    from poelm.schedule import lrm as lrm_of

    out = Path(out)
    ref = locate(directory, step)
    mc = _model_config(ref)
    layers = stage_layout(mc, stage_layers)
    mcfg = model_config(mc, layers)
    cfg, differs = _poelm_config(mcfg, ref, preset)
    tok, tok_path = _tokenizer(tokenizer, ref, mc["vocab_size"])
    _check_out(out)
    sd, prefixed = read_model(ref.model)
    V, vpad = mc["vocab_size"], padded_vocab(mc["vocab_size"])
    with torch.device("meta"):
        shell = PoEGPT(mcfg)
    names = check_names(sd, shell, vpad, ref.model)
    state, padding, dtypes = {}, {}, {}
    for name, rname in names.items():
        t = sd[rname]
        dtypes[name] = _dtype_name(t)
        if PADDED_RE.fullmatch(name):
            if vpad > V:
                padding[f"model/{name}"] = t[V:]
            t = t[:V]
        state[name] = t.float()  # bf16 -> fp32 is exact
    optim_state, world, optim_dtypes = None, len(ref.optim), {}
    optim_note = {"lrs": "user_config / preset (weights-only import: no saved lrs)"}
    if ref.optim:
        from poelm.train import optim_nanochat

        shapes = {n: tuple(sd[names[n]].shape) for n in shell.state_dict()}  # padded rows: the shards' layout
        ranks = [_read_optim(p) for p in ref.optim]
        tensors, ometa = optim_nanochat.gather_reference_state(ranks, shapes, world)
        optim_dtypes = {k: _dtype_name(t) for k, t in tensors.items()}  # restored on export (bf16 state on GPU runs)
        tensors = _crop_optim(tensors, ometa, V, vpad, padding)
        optim_state = (tensors, ometa)
        from poelm.train.nanochat_lrs import apply_saved_optim

        optim_note = apply_saved_optim(cfg.optim, ometa["groups"], shapes, ref.step, cfg.schedule.steps)
        cfg = config_mod.validate(cfg)
    # The checked shell takes the tensors as they are (assign): no random init of a second model,
    # no copy (the rotary tables are non-persistent buffers: the saved state never holds them).
    shell.load_state_dict(state, strict=True, assign=True)
    model = shell
    phase = cfg.schedule.phase(start_step=0)
    tps = cfg.train.tokens_per_step or None
    files = [ref.model, ref.meta_path, *ref.optim]
    provenance = {
        "source": "nanochat", "dir": str(ref.dir.resolve()), "step": ref.step, "world_size": world,
        "optimizer": f"gathered from {world} rank shard(s)" if world else "none: weights-only import (continue needs --fresh-optimizer)",
        "optim_config": optim_note,
        "tokenizer": {"path": str(tok_path), "sha256": sha256_file(tok_path if tok_path.is_file() else tok_path / "tokenizer.json")},
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    meta = {
        "phase": {"name": phase.name, "start_step": 0, "steps": phase.steps, "warmup": phase.warmup, "peak": phase.peak,
                  "warmdown_ratio": phase.warmdown_ratio, "final": phase.final},
        "rel_step": ref.step, "lrm": lrm_of(ref.step, phase), "tokens": ref.step * tps if tps else 0, "tokens_in_phase": ref.step * tps if tps else 0,
        "tokens_per_step": tps, "train_val_bpb": ref.meta.get("val_bpb"), "train_val_bpb_stages": None, "loader_state": None,
        "world_size": world or 1, "autocast_dtype": "bf16" if "bfloat16" in dtypes.values() else "fp32",
        "weights_only": not world,
        "nanochat": {"dtypes": dtypes, "optim_dtypes": optim_dtypes, "prefixed": prefixed, "padded_vocab": vpad, "meta": ref.meta},
    }
    extra = {PADDING_FILE: padding} if padding else None
    path = ckpt_mod.save(out, ref.step, model, cfg, tok, meta, optim_state=optim_state, extra_tensors=extra, provenance=provenance)
    nbytes = sum(p.stat().st_size for p in files)
    return {"path": str(path), "step": ref.step, "world_size": world, "weights_only": not world, "tensors": len(names), "source_bytes": nbytes,
            "preset_differs": differs}


def _crop_optim(tensors: dict, ometa: dict, V: int, vpad: int, padding: dict) -> dict:
    """Drop the padding rows of the vocabulary tables' optimizer state (kept in ``padding``)."""
    out = {}
    for key, t in tensors.items():
        pname = key.rsplit("/", 1)[0]
        if PADDED_RE.fullmatch(pname):
            if vpad > V:
                padding[f"optim/{key}"] = t[V:]
            t = t[:V]
            ometa["params"][pname]["shape"] = [V, *ometa["params"][pname]["shape"][1:]]
        out[key] = t
    return out


def _read_optim(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as tensors only: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError(f"{path} is not an optimizer state dict (no state / param_groups)")
    return sd


# ----------------------------------------------------------------------------- export
def _restore(t: torch.Tensor, key: str, padding: dict, vpad: int, dtype: str | None) -> torch.Tensor:
    if vpad > t.shape[0]:
        pad = padding.get(key)
        rows = vpad - t.shape[0]
        if pad is None or list(pad.shape) != [rows, *t.shape[1:]]:
            pad = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
        t = torch.cat([t, pad.to(t.dtype)])
    low_dtype = getattr(torch, dtype, None) if dtype in ("bfloat16", "float16") else None
    if low_dtype is not None:
        low = t.to(low_dtype)
        if torch.equal(low.float(), t.float()):  # exact: keep the reference's storage dtype
            return low
    return t.float() if t.is_floating_point() else t


def export_nanochat(ckpt_dir, out) -> dict:
    """Write ``out/model_XXXXXX.pt``, ``meta_XXXXXX.json`` and (with optimizer state)
    ``optim_XXXXXX_rank0.pt`` for a poelm checkpoint (see the module docstring)."""
    src = Path(ckpt_dir)
    if src.is_dir() and not (src / "model.safetensors").is_file():
        newest = ckpt_mod.latest(src)
        if newest is None:
            raise CheckpointError(f"{src} holds no poelm checkpoint (no model.safetensors and no step-XXXXX checkpoints)")
        src = newest
    ck = ckpt_mod.load(src)
    cfg = ck.config.model
    nano = ck.meta.get("nanochat") or {}
    base_meta = dict(nano.get("meta") or {})
    mc = reference_model_config(cfg, base_meta.get("model_config"))
    out = Path(out)
    step = ck.step
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: give a folder for the nanochat checkpoint")
    padding = ckpt_mod._load_safetensors(src / PADDING_FILE, "padding rows") if (src / PADDING_FILE).is_file() else {}
    vpad, dtypes, odtypes = padded_vocab(cfg.vocab_size), nano.get("dtypes") or {}, nano.get("optim_dtypes") or {}
    model_sd = {}
    for name, t in ck.model_state.items():
        rname = to_ref_name(name)
        if rname is None:
            raise CheckpointError(f"parameter {name} has no nanochat counterpart")
        key = f"model/{name}"
        model_sd[(COMPILED_PREFIX if nano.get("prefixed") else "") + rname] = _restore(t, key, padding, vpad if PADDED_RE.fullmatch(name) else 0, dtypes.get(name))
    optim_sd = None
    if ck.optim_tensors is not None:
        from poelm.train import optim_nanochat

        tensors = {}
        for key, t in ck.optim_tensors.items():
            pname = key.rsplit("/", 1)[0]
            tensors[key] = _restore(t, f"optim/{key}", padding, vpad if PADDED_RE.fullmatch(pname) else 0, odtypes.get(key))
        shapes = {n: tuple(t.shape) for n, t in ck.model_state.items()}
        shapes.update({n: (vpad, *shapes[n][1:]) for n in shapes if PADDED_RE.fullmatch(n)})
        ometa = json.loads(json.dumps(ck.optim_meta))
        for n, rec in ometa.get("params", {}).items():
            if n in shapes:
                rec["shape"] = list(shapes[n])
        optim_sd = optim_nanochat.scatter_reference_state(tensors, ometa, shapes, world_size=1)[0]
    meta = dict(base_meta)
    meta.update(step=step, model_config=mc)
    if base_meta.get("step") != step:  # not the imported save itself: its validation and loader state no longer apply
        meta.update(val_bpb=ck.meta.get("train_val_bpb"), dataloader_state_dict=None, loop_state=None)
    meta.setdefault("user_config", {})
    meta.setdefault("max_seq_len", ck.config.seq_len)
    meta.setdefault("device_batch_size", ck.config.train.device_batch_size)
    meta.setdefault("total_batch_size", ck.meta.get("tokens_per_step") or ck.config.train.tokens_per_step)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"model_{step:06d}.pt", out / f"meta_{step:06d}.json"]
    _atomic_torch_save(model_sd, written[0])
    atomic_write_json(written[1], meta)
    if optim_sd is not None:
        written.append(out / f"optim_{step:06d}_rank0.pt")
        _atomic_torch_save(optim_sd, written[2])
    return {"dir": str(out), "step": step, "files": [p.name for p in written]}


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
