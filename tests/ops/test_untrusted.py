"""Untrusted files: a pickle crafted to run code on load (its ``__reduce__`` creates a marker
file) placed where optimizer state or weights would be, as ``.pt`` / ``.bin`` beside a checkpoint
or export, or as the safetensors files themselves (manifest regenerated to match). poelm reads
only safetensors and JSON, so the code never runs: the load ignores the extra file or fails in
one clean line."""

import io
import pickle
import re
from pathlib import Path

import pytest
import torch

from poelm.train import checkpoint
from poelm.trajectory import export
from poelm.ops import selftest

PKG = Path(checkpoint.__file__).resolve().parents[1]


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"): the file appears iff code ran
        return (open, (self.marker, "w"))


def evil_pickle(marker) -> bytes:
    return pickle.dumps({"state": _Evil(marker)})


def evil_torch_file(marker) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": _Evil(marker)}, buf)  # a real .pt (zip + pickle) that torch.load would run
    return buf.getvalue()


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    m = tmp_path / "ran"
    pickle.loads(evil_pickle(m))
    assert m.exists()  # so its absence below means poelm never unpickled it


def test_no_unpickling_in_poelm_sources():
    """No pickle/torch.load without weights_only=True anywhere in the package (remote code included)."""
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: torch.load({m.group(1)})")
        for pat in (r"\bpickle\.loads?\(", r"\bdill\.", r"\bjoblib\.load", r"\bcloudpickle\.", r"numpy\.load\([^)]*allow_pickle=True", r"(?<![.\w])eval\("):
            if re.search(pat, text):
                bad.append(f"{f.name}: {pat}")
    assert not bad, bad


def test_extra_pickles_beside_a_checkpoint_are_ignored(run_copy, tmp_path):
    m = tmp_path / "ran"
    ck = run_copy / "step-00002"
    for name in ("optim.pt", "optimizer.pt", "training_state.pt", "pytorch_model.bin"):
        (ck / name).write_bytes(evil_torch_file(m))
    (ck / "optim.pkl").write_bytes(evil_pickle(m))
    p = selftest.cli_run(["train", "--resume", ck, "--quiet"])
    assert p.returncode == 0, p.stderr[-500:]
    assert not m.exists()
    assert checkpoint.latest(run_copy).name == "step-00004"


@pytest.mark.parametrize("target,payload", [("optim.safetensors", "pickle"), ("optim.safetensors", "torch"), ("model.safetensors", "torch")])
def test_pickle_in_place_of_safetensors_fails_cleanly(run_copy, tmp_path, target, payload):
    m = tmp_path / "ran"
    ck = run_copy / "step-00002"
    (ck / target).write_bytes(evil_pickle(m) if payload == "pickle" else evil_torch_file(m))
    checkpoint.write_manifest(ck)  # a deliberate swap: the manifest matches it
    before = selftest.tree_digest(run_copy)
    verbs = [["train", "--resume", ck, "--quiet"]]
    if target == "model.safetensors":
        verbs += [["generate", ck, "--prompt", "a", "--max-new-tokens", "2"], ["export", ck, tmp_path / "hf"]]
    for args in verbs:
        p = selftest.cli_run(args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-500:]
        assert re.search(r"cannot read (optimizer state|model weights) .*" + target.replace(".", r"\."), lines[0]), lines[0]
        assert not m.exists()
    assert selftest.tree_digest(run_copy) == before
    assert not (tmp_path / "hf").exists()


def test_export_folder_with_pickled_weights_is_refused(fx, tmp_path):
    """An exported folder whose weights were replaced by pytorch_model.bin (which transformers
    would torch.load) is refused by poelm without unpickling it."""
    m = tmp_path / "ran"
    hf = export.export(fx.ref / "step-00004", tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(evil_torch_file(m))
    p = selftest.cli_run(["generate", hf, "--prompt", "a", "--max-new-tokens", "2"])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr[-500:]
    assert not m.exists()
