"""The training state of a published branch (``--with-optimizer``): what continues it exactly.

A step branch is an exported Hugging Face folder (``export.py``). Published with the state, it
also holds ``train_state/``, a separate folder of the branch, so a clone or a
``from_pretrained`` that skips it (``huggingface_hub`` ``allow_patterns``, ``poelm checkout``
without ``--with-optimizer``) still loads the model; the Pythia / OLMo maintainers' objection
(optimizer state ~6x the weights) then costs only those who ask for it:

- ``optim-NNNNN-of-MMMMM.safetensors`` + ``optim.json``: the optimizer state in the local
  checkpoint's world-size-independent layout (``"<param>/<state>"`` tensors,
  ``optim.full_state_dict``), cut into shards of at most ``SHARD_BYTES`` by tensor (the Hub caps a
  file at 50 GB; a cut by rank would tie the branch to the world size it was saved on, which
  the layout exists to avoid); any number of ranks reads it back (``load_full_state_dict``);
- ``rng.safetensors``: the generator states of the save (CPU and CUDA, every rank's: ``runtime.rng_states``);
- ``meta.json``: the checkpoint's meta, the loader position (``loader_state``) included;
- ``config.json`` and ``tokenizer.json``: the checkpoint's own (the exported tokenizer gains a
  BOS post-processor, and the loader state is tied to the training tokenizer's fingerprint);
- ``model.safetensors``: the fp32 master weights, only when the branch's weights are not
  bit-identical to them (a bf16 branch of a bf16-autocast run), so resuming stays exact.

Every file is in the branch manifest's sha256 list (``poelm verify`` checks them) and the
manifest's ``train_state`` block names the folder. ``rebuild`` turns a checked-out branch with
its state back into a local checkpoint directory (``checkpoint.py``'s layout, its manifest
written last), which ``train --resume`` / ``continue --from`` then load through the one code path
they use for local checkpoints: the same bytes give the same run, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poelm.core.errors import CheckpointError, PublishError
from poelm.fsio import atomic_dir, atomic_write_json, sha256_file
from poelm.train import checkpoint

STATE_DIR = "train_state"
SHARD_BYTES = 4 << 30  # per optimizer shard (the Hub's per-file limit is 50 GB; 4 GiB keeps uploads resumable)
FORMAT = "poelm-train-state"
COPIED = ("optim.json", "rng.safetensors", "meta.json", "config.json", "tokenizer.json")


def shard_names(n: int) -> list[str]:
    return [f"optim-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def split_shards(tensors: dict, shard_bytes: int) -> list[dict]:
    """Tensors in key order, a new shard whenever the next one would pass ``shard_bytes`` (a
    tensor larger than that gets a shard of its own)."""
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + n
    return shards + [cur] if cur or not shards else shards


def check_source(ckpt_dir) -> Path:
    """The checkpoint dir ``ckpt_dir`` names, when it holds a training state to publish; one
    ``PublishError`` line otherwise (checked before the repository is opened or created)."""
    d = checkpoint.save_dir(ckpt_dir)
    if checkpoint.is_hf_export(d) or not (d / "optim.safetensors").is_file():
        raise PublishError(f"{d} holds no optimizer state (an exported folder or a weights-only import): "
                           "publish it without --with-optimizer, or publish the run's own checkpoint")
    if checkpoint.read_json(d / "meta.json", "checkpoint meta").get("loader_state") is None:
        raise PublishError(f"{d} records no loader position (meta.json loader_state): it cannot be continued exactly; "
                           "publish it without --with-optimizer")
    return d


def write_state(ckpt_dir, folder: Path, weights_exact: bool, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write ``folder/train_state/`` from the training checkpoint ``ckpt_dir``; return the
    manifest's ``train_state`` block. ``weights_exact``: the branch's weights are the master
    weights bit for bit (else the fp32 master weights go in too). One ``PublishError`` line when
    the source holds no optimizer state (an exported folder, a weights-only import)."""
    d = check_source(ckpt_dir)
    meta = checkpoint.read_json(d / "meta.json", "checkpoint meta")
    out = folder / STATE_DIR
    out.mkdir()
    optim = load_file(str(d / "optim.safetensors"))
    names = []
    for name, part in zip(shard_names(len(shards := split_shards(optim, shard_bytes))), shards):
        save_file(part, str(out / name), metadata={"format": "pt"})
        names.append(name)
    for name in COPIED:
        if (d / name).is_file():
            shutil.copyfile(d / name, out / name)
    if not weights_exact:
        shutil.copyfile(d / "model.safetensors", out / "model.safetensors")
    return {"format": FORMAT, "version": 1, "folder": STATE_DIR, "optim_shards": names, "master_weights": not weights_exact,
            "step": meta.get("step"), "loader_rows": (meta.get("loader_state") or {}).get("rows")}


def weights_exact(ckpt_dir, exported_weights: Path) -> bool:
    """Whether the exported ``model.`` tensors equal the checkpoint's weights bit for bit."""
    d = checkpoint.save_dir(ckpt_dir)
    if checkpoint.is_hf_export(d):
        return True
    master = load_file(str(d / "model.safetensors"))
    exp = load_file(str(exported_weights))
    return all(k in master and master[k].dtype == v.dtype and torch.equal(master[k], v)
               for k, v in ((k[len("model."):], v) for k, v in exp.items())) and len(master) == len(exp)


def add_to_manifest(folder: Path, manifest_name: str, block: dict) -> dict:
    """The branch manifest with ``train_state/*`` in its file list and the ``train_state`` block."""
    man = json.loads((folder / manifest_name).read_text())
    files = dict(man.get("files", {}))
    for p in sorted((folder / STATE_DIR).iterdir()):
        files[f"{STATE_DIR}/{p.name}"] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    man["files"] = dict(sorted(files.items()))
    man["train_state"] = block
    atomic_write_json(folder / manifest_name, man)
    return man


def rebuild(branch_folder, out_dir, label: str) -> Path:
    """A local training checkpoint (``checkpoint.py``'s layout) at ``out_dir`` from a checked-out
    branch with its ``train_state/``; ``label`` names the branch in errors."""
    src = Path(branch_folder)
    st = src / STATE_DIR
    man = checkpoint.read_json(src / "poelm_manifest.json", "branch manifest")
    block = man.get("train_state") if isinstance(man.get("train_state"), dict) else None
    if block is None or not st.is_dir():
        raise CheckpointError(f"{label} carries no training state")
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        optim = {}
        for name in block.get("optim_shards", []):
            optim.update(load_file(str(st / name)))
        save_file(optim, str(tmp / "optim.safetensors"), metadata={"format": "pt"})
        for name in COPIED:
            if (st / name).is_file():
                shutil.copyfile(st / name, tmp / name)
        if (st / "model.safetensors").is_file():
            shutil.copyfile(st / "model.safetensors", tmp / "model.safetensors")
        else:  # the branch's weights are the master weights (checked when it was published)
            w = load_file(str(src / "model.safetensors"))
            save_file({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        checkpoint.write_manifest(tmp, {"branch": label})
    return Path(out_dir)
