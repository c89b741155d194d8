"""``poelm export CKPT OUT``: a checkpoint as a Hugging Face folder that loads with no network.

The folder holds:

- ``config.json``: ``PoelmConfig`` (``model_type = "poelm"``, ``auto_map`` strings for AutoConfig
  and AutoModelForCausalLM), every ``ModelConfig`` field, the phase metadata of the checkpoint
  (step, rel_step, phase, phase_name, lrm, tokens, tokens_in_phase, train_val_bpb),
  ``poe_wand_p99_bounds_per_stage_head`` once calibrated, and ``poelm_config`` (the full resolved
  poelm config, so ``poelm continue --from REPO@step-XXXXX`` knows the run's settings);
- ``model.safetensors``: the ``PoEGPT`` state dict with keys prefixed by ``model.`` (the wrapper's
  attribute), so ``poelm.checkpoint.load_model`` reads an export too. Its header metadata carries
  the step and token count, so ``verify`` catches weights moved to another branch even when the
  branch manifest was regenerated to match;
- ``tokenizer.json`` + ``tokenizer_config.json``: the checkpoint's own byte-level BPE for the
  stock ``PreTrainedTokenizerFast`` (no remote code), with a ``TemplateProcessing``
  post-processor so ``encode(text)`` prepends ``<|bos|>`` itself (base models need it and users
  forget it), while ``[bos_token_id] + encode(text, add_special_tokens=False)`` (the card's recipe)
  gives the same ids. ``split_special_tokens`` makes a literal ``<|bos|>`` in user text plain
  text, as in poelm's own tokenizer;
- ``generation_config.json``: BOS, and BOS as EOS (design choice: in poelm's data a document ends
  where the next ``<|bos|>`` begins, so emitting it means "document finished"), ``<|pad|>`` as pad;
- the remote code: ``configuration_poelm.py`` and ``modeling_poelm.py`` (poelm/hf/) and verbatim
  copies of ``poelm/core/model.py``, ``poelm/core/poe.py``, ``poelm/infer/engine.py`` and the poelm modules they
  import (``shipped_modules``; one source of truth);
- ``README.md``: the model card: the text the caller passes (``readme``; the trajectory report's
  card, ``poelm.report.tables.render_card``, once a branch is measured), else a minimal card written
  here. The export never imports the report room: the card reaches it as an argument;
- ``poelm_manifest.json``: step, tokens, lrm, phase and the sha256 and size of every other file
  (written last), so a published trajectory can be audited (``poelm verify``), and the data's
  ``provenance`` (tokens per mixture source, cumulative and in the phase; the batch hashes since
  the previous save; the steps the spike guard skipped).

The folder is built under a temporary name and renamed into place (``fsio.atomic_dir``).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from poelm.train import checkpoint
from poelm.core.errors import CheckpointError, PoelmError
from poelm.fsio import atomic_dir, atomic_write_json, atomic_write_text, sha256_file
from poelm.core.model import ModelConfig, PoEGPT

PKG = Path(__file__).resolve().parents[1]  # the poelm package
HF_CODE = ("configuration_poelm.py", "modeling_poelm.py")  # from poelm/hf/
SHIPPED_ROOMS = ("core", "infer")  # the rooms the remote code runs, shipped verbatim
MANIFEST = "poelm_manifest.json"
BOS, PAD = "<|bos|>", "<|pad|>"
BOUNDS_KEY = "poe_wand_p99_bounds_per_stage_head"
ROUTING_KEY = "poe_routing"
AUTO_MAP = {
    "AutoConfig": "configuration_poelm.PoelmConfig",
    "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM",
}


# ----------------------------------------------------------------------------- reading a source
def read_source(ckpt_dir) -> dict:
    """What an export needs from a checkpoint dir (or a run dir: its newest checkpoint; or an
    earlier export, so a checked-out branch can be re-published): model config dict, poelm config
    dict, meta, state dict (unprefixed), tokenizer.json text, bounds (or None)."""
    d = checkpoint.save_dir(ckpt_dir)
    tok_path = d / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{d} has no tokenizer.json; a checkpoint must carry its tokenizer")
    if checkpoint.is_hf_export(d):
        hf = checkpoint.read_json(d / "config.json", "export config")
        model = {k: hf[k] for k in ModelConfig.__dataclass_fields__ if k in hf}
        meta = {k: hf.get(k) for k in ("step", "rel_step", "phase", "lrm", "tokens", "tokens_in_phase", "train_val_bpb")}
        if (d / MANIFEST).is_file():  # a re-published branch keeps the data provenance it records
            meta["provenance"] = checkpoint.read_json(d / MANIFEST, "export manifest").get("provenance")
        poelm_config = hf.get("poelm_config")
        bounds = hf.get(BOUNDS_KEY)
        routing = hf.get(ROUTING_KEY)
        state = _load_weights(d / "model.safetensors")
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    else:
        checkpoint.verify(d)  # manifest: a truncated or corrupted checkpoint is never exported
        poelm_config = checkpoint.read_json(d / "config.json", "checkpoint config")
        if not isinstance(poelm_config.get("model"), dict):
            raise CheckpointError(f"{d}/config.json has no [model] table: not a poelm checkpoint")
        model = poelm_config["model"]
        meta = checkpoint.read_json(d / "meta.json", "checkpoint meta")
        bounds, routing = poelm_config.get(BOUNDS_KEY), None
        calib = d / "calibration.json"
        if calib.is_file():
            cal = checkpoint.read_json(calib, "calibration")
            bounds, routing = cal.get(BOUNDS_KEY, bounds), cal.get(ROUTING_KEY)
        state = _load_weights(d / "model.safetensors")
    if meta.get("step") is None:
        raise CheckpointError(f"{d} does not record its step (meta.json / config.json)")
    return {
        "path": d,
        "model": ModelConfig.from_dict(model),
        "poelm_config": poelm_config,
        "meta": meta,
        "state": state,
        "tokenizer_json": tok_path.read_text(encoding="utf-8"),
        "bounds": bounds,
        "routing": routing,
    }


def _load_weights(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types on a damaged file
        raise CheckpointError(f"cannot read model weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _check_state(state: dict, cfg: ModelConfig, where) -> None:
    """Keys and shapes must be those of ``PoEGPT(cfg)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        own = PoEGPT(cfg).state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"weights in {where} do not match the model config ({what})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"weights in {where}: {k} has shape {tuple(v.shape)}, config expects {tuple(own[k].shape)}")


def check_bounds(bounds, n_stages: int) -> list[float] | None:
    """K-1 finite non-negative WAND bounds, or None."""
    if bounds is None:
        return None
    try:
        out = [float(b) for b in bounds]
    except (TypeError, ValueError):
        raise PoelmError(f"WAND bounds must be numbers, got {bounds!r}") from None
    if len(out) != n_stages - 1 or not all(math.isfinite(b) and b >= 0 for b in out):
        raise PoelmError(f"WAND bounds must be {n_stages - 1} finite non-negative numbers (K={n_stages}), got {out}")
    return out


# ----------------------------------------------------------------------------- weights dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_dtype(dtype: str | None) -> str | None:
    """``bf16 | fp16 | fp32`` (or None: the default); anything else is one ``PoelmError`` line,
    raised before any file is read."""
    if dtype is None or dtype in DTYPES:
        return dtype
    raise PoelmError(f"unknown export dtype {dtype!r}: use bf16, fp16 or fp32")


def default_dtype(src: dict) -> torch.dtype:
    """The dtype a branch is published in when none is asked for.

    A run trained under bf16 autocast (``meta["autocast_dtype"]``, recorded by the training loop,
    or ``train.dtype = "bf16"`` in its config) publishes bf16: the card's users load it with
    ``dtype=torch.bfloat16`` and a branch is then half the bytes of the fp32 master weights, which
    stay in the local checkpoint for resuming. Anything else keeps the stored dtype (fp32 for a
    CPU run; an earlier export keeps its own)."""
    meta, train = src["meta"], ((src.get("poelm_config") or {}).get("train") or {})
    if meta.get("autocast_dtype", train.get("dtype")) == "bf16":
        return torch.bfloat16
    dtypes = {v.dtype for v in src["state"].values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def cast_weights(state: dict, dtype: torch.dtype, where) -> dict:
    """Floating tensors in ``dtype`` (round to nearest even); a weight that overflows the target
    range (fp16's 65504) is refused rather than written as inf."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dtype != dtype:
            w = v.to(dtype)
            if not torch.isfinite(w).all() and torch.isfinite(v).all():
                big = v.abs().max().item()
                raise PoelmError(f"weights in {where}: {k} holds |w| = {big:.4g}, beyond {str(dtype).removeprefix('torch.')}'s range; "
                                 "export with --dtype bf16 or fp32")
            v = w
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the pieces
def shipped_modules() -> list[Path]:
    """The poelm files an export ships verbatim: every module of the ``core/`` and ``infer/``
    rooms (the PoE model, its math and the inference engine), flat, next to the ``hf/`` wrapper.

    Those rooms import nothing outside themselves (tests/core/test_layout.py), and inside an
    exported folder they import each other as flat siblings (``from .model import ...``), which is
    the form transformers' remote-code loader follows when it copies a folder's files."""
    files = []
    for room in SHIPPED_ROOMS:
        files += sorted(p for p in (PKG / room).glob("*.py") if p.name != "__init__.py")
    if not files:
        raise PoelmError(f"poelm installation is incomplete: no modules under {PKG}/core; reinstall poelm")
    names = [p.name for p in files] + list(HF_CODE)
    if len(set(names)) != len(names):  # flat in the export: two rooms must not share a file name
        raise PoelmError(f"poelm installation is inconsistent: shipped file names clash: {sorted(names)}")
    return files


def hf_tokenizer_json(tokenizer_json: str) -> tuple[str, int, int | None]:
    """(tokenizer.json with a BOS-prepending post-processor, bos id, pad id or None)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_str(tokenizer_json)
    bos = tok.token_to_id(BOS)
    if bos is None:
        raise CheckpointError(f"the checkpoint's tokenizer has no {BOS} token: not a poelm tokenizer")
    # Single text: "<|bos|> text". A pair is two documents, each opened by its own BOS.
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos)])
    return tok.to_str(pretty=True), bos, tok.token_to_id(PAD)


def tokenizer_config(max_len: int, has_pad: bool) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": BOS,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    }
    if has_pad:
        cfg["pad_token"] = PAD
    return cfg


def hf_config(src: dict, bounds, dtype: torch.dtype) -> dict:
    """The config.json dict, built through ``PoelmConfig`` so it is what transformers reads back."""
    from poelm.hf.configuration_poelm import PoelmConfig

    meta = src["meta"]
    phase = meta.get("phase")
    cfg = PoelmConfig(
        **src["model"].to_dict(),
        step=int(meta["step"]),
        rel_step=meta.get("rel_step"),
        phase=phase,
        phase_name=phase.get("name") if isinstance(phase, dict) else phase,
        lrm=meta.get("lrm"),
        tokens=meta.get("tokens"),
        tokens_in_phase=meta.get("tokens_in_phase"),
        train_val_bpb=meta.get("train_val_bpb"),
        poe_wand_p99_bounds_per_stage_head=bounds,
        poe_routing=src.get("routing"),  # calibrated stage-0 threshold (tau) for mode "route"
        poelm_config=src["poelm_config"],
        architectures=["PoelmForCausalLM"],
        auto_map=dict(AUTO_MAP),
        dtype=str(dtype).removeprefix("torch."),
    )
    out = json.loads(cfg.to_json_string(use_diff=True))
    # use_diff drops values equal to the class defaults; config.json states every architecture and
    # trajectory field explicitly, whatever the defaults of the poelm version reading it.
    out.update(cfg.to_poelm_dict())
    out.update({k: getattr(cfg, k) for k in ("step", "rel_step", "phase", "phase_name", "lrm", "tokens",
                                            "tokens_in_phase", "train_val_bpb", BOUNDS_KEY)})
    if getattr(cfg, ROUTING_KEY, None) is not None:
        out[ROUTING_KEY] = getattr(cfg, ROUTING_KEY)
    if isinstance(meta.get("tracking"), dict):  # the dashboard run that saved it (poelm.track), without its local dir
        out["poelm_tracking"] = {k: v for k, v in meta["tracking"].items() if k != "dir"}
    return dict(sorted(out.items()))


def generation_config(bos: int, pad: int | None) -> dict:
    from transformers import GenerationConfig

    # No max_length here: generate() warns when it meets both max_length and max_new_tokens.
    g = GenerationConfig(bos_token_id=bos, eos_token_id=bos, pad_token_id=bos if pad is None else pad)
    g.validate()
    return g.to_diff_dict()


def minimal_card(cfg: dict) -> str:
    """A short model card: what the model is, where it is in its trajectory, how to load it."""
    name = cfg.get("_name_or_path") or "poelm model"
    stages = cfg["stage_layers"]
    bounds = cfg.get(BOUNDS_KEY)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [poelm, product-of-experts, per-stage-heads]",
        "---",
        "",
        f"# {name}",
        "",
        f"A Product-of-Experts per-stage-head language model trained with poelm: depth {cfg['depth']}, "
        f"n_embd {cfg['n_embd']}, K={len(stages)} stages with stage_layers={tuple(stages)}, vocabulary {cfg['vocab_size']}, "
        f"max_seq_len {cfg['max_seq_len']}. Every stage boundary is a complete next-token predictor; the "
        "model's logits are the renormalised geometric mean of the stage distributions (full K).",
        "",
        "| step | phase | rel_step | lrm | tokens |",
        "|---|---|---|---|---|",
        f"| {cfg.get('step')} | {cfg.get('phase_name')} | {cfg.get('rel_step')} | {cfg.get('lrm')} | {cfg.get('tokens')} |",
        "",
        f"WAND p99 bounds (`{BOUNDS_KEY}`): {bounds if bounds is not None else 'not calibrated yet'}.",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True).eval()',
        "# the tokenizer is the stock PreTrainedTokenizerFast; trust_remote_code only lets transformers",
        "# read this folder's config.json (which names the model's remote code) without asking",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "# encode() prepends <|bos|> itself; [bos_token_id] + encode(text, add_special_tokens=False) is the same",
        'ids = tokenizer("The capital of France is", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        "PoE helpers on the model: `model(ids, stages=0)` (single stage), `model(ids, stages=range(2))` "
        "(prefix K'=2), `model.generate_wand(ids, max_new_tokens)` (adaptive depth with this branch's "
        "bounds), `model.generate_speculative(ids, max_new_tokens, m=4)` (stage-0 draft, full-K verify).",
        "",
    ]
    return "\n".join(lines)


def write_manifest(folder: Path, info: dict, provenance: dict | None = None) -> dict:
    """``poelm_manifest.json``: trajectory metadata and the sha256/size of every other file;
    ``provenance``: the data the save has seen (``poelm.train.provenance``)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = manifest_dict(info, files)
    if provenance:
        manifest["provenance"] = provenance
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_dict(cfg: dict, files: dict) -> dict:
    return {
        "schema": 1,
        "format": "poelm-hf-export",
        "step": cfg.get("step"),
        "tokens": cfg.get("tokens"),
        "lrm": cfg.get("lrm"),
        "phase": cfg.get("phase_name"),
        "rel_step": cfg.get("rel_step"),
        "files": files,
    }


def weights_metadata(path) -> dict:
    """The header metadata of an exported model.safetensors (step and tokens as strings)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _sort_header_metadata(path: Path) -> None:
    """Make the safetensors header byte-deterministic: safetensors writes ``__metadata__`` from a
    hash map whose order changes between processes, so the same weights would hash differently.
    The header is re-serialised with sorted metadata in the same compact JSON form, hence the same
    length, and written over the old one in place (the tensor bytes are not touched)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) != len(raw.rstrip(b" ")):
            return  # an unexpected layout: keep the file as safetensors wrote it
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


# ----------------------------------------------------------------------------- export
def export(ckpt_dir, out_dir, bounds=None, readme: str | None = None, dtype: str | None = None) -> Path:
    """Write the Hugging Face folder of ``ckpt_dir`` to ``out_dir`` (atomically); return it.

    ``bounds`` (K-1 floats) override the checkpoint's calibrated WAND bounds; ``readme`` is the
    model card's text (the caller renders it; None: a minimal card); ``dtype`` (bf16 | fp16 |
    fp32) the weights' dtype, default ``default_dtype`` (bf16 for a run trained under bf16
    autocast). The checkpoint's fp32 master weights are only read."""
    want = check_dtype(dtype)
    src = read_source(ckpt_dir)
    cfg_model: ModelConfig = src["model"]
    _check_state(src["state"], cfg_model, src["path"])
    bounds = check_bounds(src["bounds"] if bounds is None else bounds, cfg_model.n_stages)
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or checkpoint.is_hf_export(out))):
        raise PoelmError(f"{out} exists and is not an earlier poelm export; choose a new output folder")
    code = shipped_modules()

    dtype = DTYPES[want] if want is not None else default_dtype(src)
    src["state"] = cast_weights(src["state"], dtype, src["path"])
    cfg = hf_config(src, bounds, dtype)
    tok_json, bos, pad = hf_tokenizer_json(src["tokenizer_json"])
    meta = src["meta"]
    with atomic_dir(out, overwrite=True) as tmp:
        state = {f"model.{k}": v.contiguous() for k, v in src["state"].items()}
        wmeta = {"format": "pt", "poelm_step": str(int(meta["step"])), "poelm_tokens": str(meta.get("tokens"))}
        save_file(state, str(tmp / "model.safetensors"), metadata=wmeta)
        _sort_header_metadata(tmp / "model.safetensors")
        atomic_write_json(tmp / "config.json", cfg)
        atomic_write_text(tmp / "tokenizer.json", tok_json)
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(cfg_model.max_seq_len, pad is not None))
        atomic_write_json(tmp / "generation_config.json", generation_config(bos, pad))
        for name in HF_CODE:
            shutil.copyfile(PKG / "hf" / name, tmp / name)
        for path in code:
            shutil.copyfile(path, tmp / path.name)
        atomic_write_text(tmp / "README.md", readme if readme is not None else minimal_card(cfg))
        write_manifest(tmp, cfg, provenance_of(meta))
    return out


def provenance_of(meta: dict) -> dict | None:
    """The manifest's ``provenance``: tokens per source, batch hashes since the previous save
    (``poelm.train.provenance``) and the updates the spike guard skipped (``train/spikes.py``)."""
    prov = dict(meta.get("provenance") or {})
    prov.pop("phase_start_rows", None)  # bookkeeping of the run, not of the branch
    if isinstance(meta.get("spike_guard"), dict):
        prov["skipped_steps"] = list(meta["spike_guard"].get("skipped_steps", []))
    return prov or None
