"""Branches of a size people publish: the weights' dtype of an export / publish (bf16 for a run
trained under bf16 autocast, ``--dtype`` otherwise; the checkpoint keeps its fp32 master
weights), and weight files stored in the local git backend without zlib (readable by plain git)."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from poelm import cli
from poelm.core.errors import PoelmError
from poelm.train import checkpoint
from poelm.trajectory import export as export_mod
from poelm.trajectory import publish
from poelm.trajectory import verify
from poelm.trajectory.gitrepo import GitRepo

from test_export import make_ckpt


def _dtypes(path: Path) -> set:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One checkpoint of a bf16-autocast run (meta ``autocast_dtype``) and one of an fp32 run."""
    root = tmp_path_factory.mktemp("dtype")
    model, tok = make_ckpt(root / "bf16-run")
    meta = json.loads((root / "bf16-run" / "meta.json").read_text())
    (root / "bf16-run" / "meta.json").write_text(json.dumps({**meta, "autocast_dtype": "bf16"}))
    checkpoint.write_manifest(root / "bf16-run")
    make_ckpt(root / "fp32-run")
    return root, model


def test_bf16_run_exports_bf16_by_default_and_keeps_fp32_master(ckpts, tmp_path):
    root, model = ckpts
    out = export_mod.export(root / "bf16-run", tmp_path / "hf")
    assert _dtypes(out / "model.safetensors") == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _dtypes(root / "bf16-run" / "model.safetensors") == {"F32"}  # the local checkpoint is untouched
    # the values are the fp32 weights rounded to nearest bf16
    from safetensors.torch import load_file

    w = load_file(str(out / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(w[f"model.{k}"], v.to(torch.bfloat16)), k
    # about half the bytes of the fp32 export
    fp32 = export_mod.export(root / "bf16-run", tmp_path / "hf32", dtype="fp32")
    assert _dtypes(fp32 / "model.safetensors") == {"F32"}
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"
    ratio = (out / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.55, ratio


def test_fp32_run_exports_fp32_by_default_and_any_dtype_on_request(ckpts, tmp_path):
    root, _ = ckpts
    out = export_mod.export(root / "fp32-run", tmp_path / "a")
    assert _dtypes(out / "model.safetensors") == {"F32"}
    out = export_mod.export(root / "fp32-run", tmp_path / "b", dtype="fp16")
    assert _dtypes(out / "model.safetensors") == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # a re-export of an export keeps its dtype
    again = export_mod.export(out, tmp_path / "c")
    assert _dtypes(again / "model.safetensors") == {"F16"}


def test_bf16_branch_loads_with_transformers_in_bf16(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model = ckpts
    out = export_mod.export(root / "bf16-run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[0, 5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        got = torch.log_softmax(hf(ids).logits.float(), -1)
        ref = model(ids)  # poelm's fp32 PoE log-probs
    diff = (got - ref).abs().max().item()
    assert 0 < diff < 0.1, diff  # bf16 weights and activations: close to fp32, not identical
    gen = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)


def test_refusals_come_before_any_work(ckpts, tmp_path):
    root, _ = ckpts
    with pytest.raises(PoelmError, match="unknown export dtype 'int8'"):
        export_mod.export(tmp_path / "does-not-exist", tmp_path / "x", dtype="int8")
    with pytest.raises(PoelmError, match="unknown export dtype"):
        publish.publish(tmp_path / "does-not-exist", tmp_path / "repo", dtype="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "repo").exists()
    # a weight beyond fp16's range is refused, not written as inf
    big = tmp_path / "big"
    make_ckpt(big)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(big / "model.safetensors"))
    sd["lm_head.weight"][0, 0] = 1e6
    save_file(sd, str(big / "model.safetensors"), metadata={"format": "pt"})
    checkpoint.write_manifest(big)
    with pytest.raises(PoelmError, match="lm_head.weight holds .*beyond float16's range"):
        export_mod.export(big, tmp_path / "y", dtype="fp16")
    assert not (tmp_path / "y").exists()


def test_cli_dtype_flags(ckpts, tmp_path, capsys):
    root, _ = ckpts
    assert cli.main(["export", str(root / "fp32-run"), str(tmp_path / "e"), "--dtype", "bf16"]) == 0
    assert _dtypes(tmp_path / "e" / "model.safetensors") == {"BF16"}
    assert cli.main(["publish", str(root / "fp32-run"), str(tmp_path / "repo"), "--dtype", "fp16"]) == 0
    publish.checkout(tmp_path / "repo", "step-00100", tmp_path / "co")
    assert _dtypes(tmp_path / "co" / "model.safetensors") == {"F16"}
    assert verify.verify(tmp_path / "repo") == []
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["publish", str(root / "fp32-run"), str(tmp_path / "repo2"), "--dtype", "int4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --dtype: invalid choice: 'int4'")
    assert not (tmp_path / "repo2").exists()
    p = cli.build_parser()
    assert p.parse_args(["train", "--publish", "r", "--publish-dtype", "bf16"]).publish_dtype == "bf16"
    assert p.parse_args(["continue", "--from", "x", "--out", "y", "--publish-dtype", "fp32"]).publish_dtype == "fp32"


def test_background_publisher_passes_the_dtype(ckpts, tmp_path):
    root, _ = ckpts
    with publish.Publisher(tmp_path / "repo", dtype="fp16") as pub:
        pub.submit(root / "bf16-run")
    publish.checkout(tmp_path / "repo", "step-00100", tmp_path / "co")
    assert _dtypes(tmp_path / "co" / "model.safetensors") == {"F16"}
    with publish.Publisher(tmp_path / "repo2") as pub:  # default: the run's autocast dtype
        pub.submit(root / "bf16-run")
    publish.checkout(tmp_path / "repo2", "step-00100", tmp_path / "co2")
    assert _dtypes(tmp_path / "co2" / "model.safetensors") == {"BF16"}


def _loose_object(repo: GitRepo, sha: str) -> Path:
    return Path(repo.git_dir) / "objects" / sha[:2] / sha[2:]


def test_git_objects_are_stored_without_zlib_and_read_by_plain_git(tmp_path):
    repo = GitRepo(tmp_path / "r", create=True)
    cfg = subprocess.run(["git", "--git-dir", repo.git_dir, "config", "core.compression"], capture_output=True, text=True)
    assert cfg.stdout.strip() == "0"  # git gc / repack will not deflate them later either
    data = b"weights " * 50_000  # deflate would shrink this 400 kB to about 1 kB
    sha = repo.hash_bytes(data)
    raw = _loose_object(repo, sha).read_bytes()
    assert len(raw) >= len(data)  # stored, not deflated ...
    assert zlib.decompress(raw) == b"blob %d\0" % len(data) + data  # ... in git's own (zlib-framed) object format
    assert subprocess.run(["git", "--git-dir", repo.git_dir, "cat-file", "blob", sha], capture_output=True).stdout == data
    # a repository created elsewhere keeps its config, and poelm's writes are still stored
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "plain")], check=True)
    plain = GitRepo(tmp_path / "plain")
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    (sha2,) = plain.hash_files([f])
    assert sha2 == sha and len(_loose_object(plain, sha2).read_bytes()) >= len(data)
    assert subprocess.run(["git", "--git-dir", plain.git_dir, "fsck", "--strict"], capture_output=True).returncode == 0
