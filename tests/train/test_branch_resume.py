"""Continuing from a published branch (``--with-optimizer``): the branch's ``train_state/``
folder (optimizer shards, loader position, RNG) makes ``train --resume REPO@step-XXXXX`` and
``continue --from REPO@step-XXXXX`` bitwise equal to resuming from the local checkpoint of the
same save, on 1 rank and on 2 gloo ranks; a clone without the state still loads the model; a
branch without it is refused in one line pointing to ``--fresh-optimizer``."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from poelm import cli, config
from poelm.train import checkpoint
from poelm.train import loop as train
from poelm.trajectory import publish as P
from poelm.trajectory import trainstate, verify
from poelm.trajectory.gitrepo import GitRepo
from test_distributed import ENV, _records, _run_dir, corpus  # noqa: F401  (the 3-source corpus fixture)

SHARD = 40_000  # bytes per optimizer shard here: the tiny model's state (~0.6 MB) spreads over many shards


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):  # noqa: F811
    """8 steps, saves at 3, 6 and 8; step-00003 and step-00006 published with the state."""
    out = _run_dir(corpus, tmp_path_factory.mktemp("runs") / "base")
    cfg = config.load(str(corpus / "run.toml"), ["schedule.steps=8"])
    train.train(cfg, out, progress=False)
    repo = out.parent / "repo"
    assert P.publish(out / "step-00003", repo, with_optimizer=True, shard_bytes=SHARD) == "step-00003"
    assert P.publish(out / "step-00006", repo, shard_bytes=SHARD) == "step-00006"  # the repository's setting carries on
    return out, repo


def _same_run(a, b, last):
    """Bitwise: every logged loss and grad norm, the final weights, optimizer state and loader position."""
    ra, rb = _records(a, "train"), _records(b, "train")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in ra] == [(r["step"], r["loss"], r["grad_norm"]) for r in rb]
    for name in ("model.safetensors", "optim.safetensors"):
        ta, tb = (load_file(str(d / last / name)) for d in (a, b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    ma, mb = (json.loads((d / last / "meta.json").read_text()) for d in (a, b))
    assert ma["loader_state"] == mb["loader_state"] and ma["tokens"] == mb["tokens"]
    return ra


def test_branch_carries_the_state_in_its_own_folder(run, tmp_path):
    out, repo = run
    man = P.read_json(P.open_repo(repo), "step-00003", P.MANIFEST)
    block = man["train_state"]
    assert block["master_weights"] is False  # an fp32 run: the branch's weights are the master weights
    assert len(block["optim_shards"]) > 1 and block["loader_rows"] == 3 * 16
    listed = [n for n in man["files"] if n.startswith("train_state/")]
    assert sorted(listed) == sorted([f"train_state/{n}" for n in block["optim_shards"]]
                                    + [f"train_state/{n}" for n in trainstate.COPIED])
    # the shards hold exactly the checkpoint's optimizer state
    full = load_file(str(out / "step-00003" / "optim.safetensors"))
    co = P.checkout(repo, "step-00003", tmp_path / "full", with_state=True)
    parts = {}
    for n in block["optim_shards"]:
        parts.update(load_file(str(co / "train_state" / n)))
    assert parts.keys() == full.keys() and all(torch.equal(parts[k], full[k]) for k in full)
    assert verify.verify(repo) == []
    # a clone without the state: no train_state/, the model loads
    light = P.checkout(repo, "step-00003", tmp_path / "light")
    assert not (light / "train_state").exists()
    model, _, meta = checkpoint.load_model(light)
    assert meta["step"] == 3
    # verify checks the state's files: a replaced shard (manifest left as it was) is named
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    g = GitRepo(bad)
    shard = f"train_state/{block['optim_shards'][0]}"
    g.write_files("step-00003", {shard: b"not the state"}, g.refs()["step-00003"], False, "tamper")
    assert verify.verify(bad) == [f"step-00003: {shard} does not match its manifest (sha256/size): corrupted or replaced"]


def test_resume_from_branch_is_bitwise_like_the_local_checkpoint(run, tmp_path):
    out, repo = run
    assert cli.main(["train", "--resume", str(out / "step-00003"), "--out", str(tmp_path / "local"), "--quiet"]) == 0
    assert cli.main(["train", "--resume", f"{repo}@step-00003", "--out", str(tmp_path / "branch"), "--quiet"]) == 0
    recs = _same_run(tmp_path / "local", tmp_path / "branch", "step-00008")
    assert [r["step"] for r in recs] == [4, 5, 6, 7, 8]  # 5 steps
    straight = {r["step"]: r["loss"] for r in _records(out, "train")}
    assert [r["loss"] for r in recs] == [straight[s] for s in range(4, 9)]  # and both equal the run itself


def test_continue_from_branch_is_bitwise_like_the_local_checkpoint(run, tmp_path):
    out, repo = run
    for name, src in (("local", str(out / "step-00006")), ("branch", f"{repo}@step-00006")):
        assert cli.main(["continue", "--from", src, "--steps", "5", "--out", str(tmp_path / name), "--quiet"]) == 0
    _same_run(tmp_path / "local", tmp_path / "branch", "step-00011")
    meta = json.loads((tmp_path / "branch" / "step-00011" / "meta.json").read_text())
    assert meta["continued_from"] == f"{repo}@step-00006"


def test_two_ranks_resume_from_branch_like_the_local_checkpoint(run, tmp_path):
    out, repo = run
    for name, src in (("local", str(out / "step-00003")), ("branch", f"{repo}@step-00003")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "poelm",
               "train", "--resume", src, "--out", str(tmp_path / name), "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in _same_run(tmp_path / "local", tmp_path / "branch", "step-00008")] == [4, 5, 6, 7, 8]


def test_branch_without_state_is_one_line_pointing_to_fresh_optimizer(run, tmp_path, capsys):
    out, _ = run
    bare = tmp_path / "bare"
    P.publish(out / "step-00008", bare)
    assert "train_state" not in P.read_json(P.open_repo(bare), "step-00008", P.MANIFEST)
    for args in (["continue", "--from", f"{bare}@step-00008", "--out", str(tmp_path / "c")],
                 ["train", "--resume", f"{bare}@step-00008", "--out", str(tmp_path / "t")]):
        capsys.readouterr()
        assert cli.main(args + ["--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "--fresh-optimizer" in err[0] and "--with-optimizer" in err[0], err
        assert not (tmp_path / "c").exists() and not (tmp_path / "t").exists()
    # with the state asked for, a source without optimizer state is refused before anything is written
    co = P.checkout(bare, "step-00008", tmp_path / "export")
    with pytest.raises(P.PublishError, match="no optimizer state"):
        P.publish(co, tmp_path / "r2", with_optimizer=True)
    assert not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------- provenance
def test_manifest_records_tokens_per_source_and_batch_hashes(run, capsys):
    out, repo = run
    man = P.read_json(P.open_repo(repo), "step-00006", P.MANIFEST)
    prov = man["provenance"]
    rows = {s["name"]: s["rows"] for s in json.loads((out / "step-00006" / "meta.json").read_text())["loader_state"]["sources"]}
    assert prov["tokens_by_source"] == {n: r * 32 for n, r in rows.items()} and sum(prov["tokens_by_source"].values()) == man["tokens"]
    assert prov["tokens_by_source_in_phase"] == prov["tokens_by_source"]  # the base phase began at step 0
    hashes = {r["step"]: r["hash"] for r in _records(out, "batch")}
    assert prov["batch_hashes"] == [[s, hashes[s]] for s in (4, 5, 6)]  # since the previous save (step 3)
    assert cli.main(["branches", str(repo)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step-00006")][0]
    assert "optim" in line and all(f"{n} {t}" in line for n, t in prov["tokens_by_source"].items())
