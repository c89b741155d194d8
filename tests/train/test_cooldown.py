"""Cooldown probes on a tiny model: the schedule at every step, the source and main untouched,
the branch kind, fresh-optimizer provenance, probes between saves, bad inputs."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from poelm import cli, config
from poelm.core.errors import CheckpointError
from poelm.ops.selftest import TINY, tree_digest
from poelm.schedule import Cooldown, cooldown_lrm, lrm
from poelm.train import checkpoint, cooldown, loop
from poelm.trajectory import publish
from poelm.trajectory import verify

# A constant-LR phase (warmup 1, no warmdown): every save after step 1 sits at lrm 1.0.
# poelm's own optimizer: its hyperparameters are a function of lrm and its own step count, so a
# cooldown at a constant lrm IS the run (test below). The reference's optimizer (the embedded
# default's) keys Muon momentum / weight decay to the phase and a probe freezes them where the
# save left them (optim_nanochat.py), so that identity is poelm-optimizer specific.
CONST = TINY + ["schedule.warmdown_ratio=0", "train.save_every=2", "optim.optimizer=poelm"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cooldown")
    loop.train(config.load("embedded", CONST), root / "run", progress=False)
    repo = root / "repo"
    for s in ("step-00002", "step-00004"):
        publish.publish(root / "run" / s, repo)
    return root


def _train_log(d):
    return [r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _main(repo) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "main"], capture_output=True, text=True, check=True).stdout.strip()


def test_cooldown_lrm_by_hand():
    assert [cooldown_lrm(t, 4, 1.0) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [cooldown_lrm(t, 4, 0.5, 0.1, "1-sqrt") for t in (0, 1, 4, 9)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    c = Cooldown(steps=4, start_step=10, from_lrm=0.5, shape="1-sqrt")
    assert lrm(10, c) == 0.5 and lrm(11, c) == pytest.approx(0.25) and lrm(14, c) == 0.0 and c.end_step == 14
    assert Cooldown.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        cooldown_lrm(0, 4, 1.0, shape="cosine")
    with pytest.raises(ValueError):
        lrm(9, c)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_cooldown_schedule_source_and_main_untouched(run, tmp_path, shape):
    src, repo = run / "run" / "step-00002", run / "repo"
    assert checkpoint.load(src).meta["lrm"] == 1.0
    before, main = tree_digest(src), _main(repo)
    n = 4
    s = cooldown.cooldown(src, tmp_path / "cd", steps=n, shape=shape, progress=False,
                          publisher=lambda: publish.Publisher(str(repo), force=True))
    # every update t = 0..N-1 (logged at step 2 + t + 1) runs at cooldown_lrm(t); the save says 0
    got = [(r["step"], r["lrm"]) for r in _train_log(tmp_path / "cd")]
    want = [(3 + t, 1.0 * (1 - (t / n if shape == "linear" else math.sqrt(t / n)))) for t in range(n)]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-12)
    meta = checkpoint.load(tmp_path / "cd" / "step-00006").meta
    assert meta["lrm"] == 0.0 and meta["step"] == 6 and meta["tokens"] == 6 * meta["tokens_per_step"]
    assert meta["phase"] == {"kind": "cooldown", "name": "cooldown", "start_step": 2, "steps": 4, "from_lrm": 1.0, "to_lrm": 0.0, "shape": shape}
    assert meta["cooldown"]["optimizer"] == "checkpoint" and meta["cooldown"]["loader"] == "checkpoint"
    assert tree_digest(src) == before  # the source checkpoint is byte-identical
    assert s["branches"] == ["cooldown-00002-4"]
    assert _main(repo) == main  # main did not move
    names = {b["branch"] for b in publish.list_branches(repo, cooldowns=True)}
    assert names == {"step-00002", "step-00004", "cooldown-00002-4"}  # never a step-00006
    man = json.loads(subprocess.run(["git", "-C", str(repo), "show", "cooldown-00002-4:poelm_manifest.json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert man["kind"] == "cooldown" and man["step"] == 6
    assert {k: man["cooldown"][k] for k in ("source_branch", "source_step", "from_lrm", "to_lrm", "shape", "steps")} == \
        {"source_branch": "step-00002", "source_step": 2, "from_lrm": 1.0, "to_lrm": 0.0, "shape": shape, "steps": 4}
    assert man["cooldown"]["tokens"] == meta["tokens"]
    assert verify.verify(repo) == []


def _probe_dir(run, tmp_path):
    """The local checkpoint dir of the published ``cooldown-00002-4`` (made here when missing)."""
    repo = run / "repo"
    d = run / "probe-00002-4"
    if not d.is_dir() or "cooldown-00002-4" not in publish.open_repo(repo).refs():
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        cooldown.cooldown(run / "run" / "step-00002", d, steps=4, progress=False,
                          publisher=lambda: publish.Publisher(str(repo), force=True))
    return d


def test_probe_is_measured_on_the_trajectory_slices(run, tmp_path):
    from poelm.measure import run as measure
    from poelm.report import tables as report

    repo = run / "repo"
    _probe_dir(run, tmp_path)
    kw = dict(split_tokens=1024, calib_tokens=512, probe_set=None, progress=False, samples=50)
    seed = measure.measure_target(f"{repo}@step-00002", **kw)
    probe = measure.measure_target(f"{repo}@cooldown-00002-4", against=f"{repo}@step-00002", **kw)
    assert probe["branch"] == "cooldown-00002-4" and probe["step"] == 6 and probe["phase"]["kind"] == "cooldown"
    for key in ("split_tokens", "calib_tokens", "seq_len", "data"):
        assert probe[key] == seed[key], key
    assert probe["bootstrap"]["blocks"] == seed["bootstrap"]["blocks"]
    # the slices are a function of the data config and the tokenizer: both are the source's own
    from poelm.data import corpus
    from poelm.data.tokenizer import Tokenizer

    a, b = checkpoint.load(run / "run" / "step-00002"), checkpoint.load(_probe_dir(run, tmp_path) / "step-00006")
    assert a.config.data == b.config.data and a.config.seq_len == b.config.seq_len
    ta, tb = Tokenizer.load(a.path), Tokenizer.load(b.path)
    assert ta.fingerprint == tb.fingerprint
    assert torch.equal(corpus.val_tokens(a.config.data, ta, 2048, allow_fewer=True), corpus.val_tokens(b.config.data, tb, 2048, allow_fewer=True))
    assert verify.verify(repo) == []  # the measurement commit keeps the branch a cooldown
    recs = report.load_records(repo)
    host = next(r for r in recs if r["branch"] == "step-00002")
    assert [p["branch"] for p in host["cooldown_probes"]] == ["cooldown-00002-4"]
    assert "cooldown-00002-4" not in [r["branch"] for r in recs]


def test_cooldown_continues_the_run_exactly(run, tmp_path):
    """From step 2, a cooldown whose to_lrm equals the phase's lrm (1.0: a constant "decay") is the
    run itself: the same weights at step 4 as the trajectory's own step-00004."""
    cooldown.cooldown(run / "run" / "step-00002", tmp_path / "flat", steps=2, to_lrm=1.0, progress=False)
    a = load_file(str(tmp_path / "flat" / "step-00004" / "model.safetensors"))
    b = load_file(str(run / "run" / "step-00004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_verify_knows_the_kind(run, tmp_path):
    repo = run / "repo"
    g = publish.open_repo(repo)
    _probe_dir(run, tmp_path)
    refs = g.refs()
    g.update_refs([("cooldown-00004-3", refs["step-00002"], None)])  # a step branch's commit under a cooldown name
    try:
        problems = verify.verify(repo)
        assert "cooldown-00004-3: its manifest does not record a cooldown (kind/cooldown missing)" in problems
        assert "cooldown-00004-3: manifest says step 2, a cooldown of 3 from 4 ends at 7" in problems
        assert "cooldown-00004-3: model.safetensors holds the weights of step 2" in problems
        assert not any(p.startswith("main:") for p in problems)  # main still holds the newest step
        g.update_refs([("cooldown-00004-3", refs["step-00004"], refs["step-00002"])])  # now main's commit
        assert "main: points at the cooldown probe cooldown-00004-3; main tracks the newest step branch" in verify.verify(repo)
    finally:
        subprocess.run(["git", "-C", str(repo), "update-ref", "-d", "refs/heads/cooldown-00004-3"], check=True)
    assert verify.verify(repo) == []


def test_fresh_optimizer_from_a_branch(run, tmp_path, monkeypatch, capsys):
    """``REPO@step-00002 --fresh-optimizer``: fresh optimizer state, loader fast-forwarded from the
    manifest's token count to exactly the position the checkpoint recorded."""
    repo = run / "repo"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cooldown", f"{repo}@step-00002", "--steps", "2", "--fresh-optimizer", "--quiet", "--out", "fresh"]) == 0
    assert "checkpoint: fresh/step-00004" in capsys.readouterr().out
    meta = checkpoint.load(tmp_path / "fresh" / "step-00004").meta
    cd = meta["cooldown"]
    assert cd["optimizer"] == "fresh" and cd["fresh_optimizer"] is True and cd["source"] == f"{repo}@step-00002"
    rows = checkpoint.load(run / "run" / "step-00002").meta["loader_state"]["rows"]
    assert cd["loader"].startswith(f"fast-forwarded {rows} rows")
    # after 2 more steps the loader sits where the trajectory's own step 4 left it
    assert meta["loader_state"] == checkpoint.load(run / "run" / "step-00004").meta["loader_state"]


def test_prober_between_saves_leaves_the_phase_unchanged(run, tmp_path):
    src = run / "run" / "step-00004"
    ov = ["train.save_every=1"]
    loop.continue_phase(src, tmp_path / "plain", steps=2, progress=False, overrides=ov)
    prober = cooldown.Prober(every=1, steps=2)
    loop.continue_phase(src, tmp_path / "probed", steps=2, progress=False, overrides=ov, after_save=prober)
    for s in ("step-00005", "step-00006"):
        a = load_file(str(tmp_path / "plain" / s / "model.safetensors"))
        b = load_file(str(tmp_path / "probed" / s / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), s
    # saves after the seed at steps 5 (lrm 0.5) and 6, the phase's annealed end (lrm 0): skipped
    assert [(p["step"], p["from_lrm"]) for p in prober.probes] == [(5, 0.5)]
    for p in prober.probes:
        d = tmp_path / "probed" / "cooldowns" / f"cooldown-{p['step']:05d}-2"
        assert checkpoint.load(d / f"step-{p['step'] + 2:05d}").meta["lrm"] == 0.0
    # the probe (which reuses the phase's loader) is the standalone cooldown of that save, bit for bit
    cooldown.cooldown(tmp_path / "probed" / "step-00005", tmp_path / "alone", steps=2, progress=False)
    a = load_file(str(tmp_path / "alone" / "step-00007" / "model.safetensors"))
    b = load_file(str(tmp_path / "probed" / "cooldowns" / "cooldown-00005-2" / "step-00007" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "probed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "cooldown_skipped"] == [6]


def _cli_rejects(args, capsys, tmp_path, match):
    before = tree_digest(tmp_path)
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert tree_digest(tmp_path) == before  # nothing written


def test_bad_inputs_one_line_exit_2(run, tmp_path, capsys, monkeypatch):
    src, repo = run / "run" / "step-00002", run / "repo"
    monkeypatch.chdir(tmp_path)
    out = ["--out", tmp_path / "x"]
    _cli_rejects(["cooldown", src, "--steps", "0", *out], capsys, tmp_path, "--steps must be a positive number")
    _cli_rejects(["cooldown", src, "--steps", "-3", *out], capsys, tmp_path, "--steps must be a positive number")
    _cli_rejects(["cooldown", src, "--steps", "2", "--shape", "cosine", *out], capsys, tmp_path, "unknown cooldown shape 'cosine'")
    _cli_rejects(["cooldown", src, "--steps", "2", "--to-lrm", "1.5", *out], capsys, tmp_path,
                 "--to-lrm 1.5 is above the checkpoint's current lrm 1 (step 2)")
    _cli_rejects(["cooldown", f"{repo}@step-00002", "--steps", "2", *out], capsys, tmp_path,
                 "the branch carries no optimizer state or loader position (published without --with-optimizer); cool down from the run's checkpoint dir")
    exported = tmp_path.parent / f"{tmp_path.name}-export"
    publish.checkout(repo, "step-00002", exported)
    _cli_rejects(["cooldown", exported, "--steps", "2", *out], capsys, tmp_path, "pass --fresh-optimizer")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        bare = tmp_path.parent / f"{tmp_path.name}-bare"
        import shutil

        shutil.copytree(src, bare / "step-00002")
        (bare / "step-00002" / "optim.safetensors").unlink()
        (bare / "step-00002" / "optim.json").unlink()
        checkpoint.write_manifest(bare / "step-00002")
        cooldown.load_source(bare / "step-00002")
    _cli_rejects(["continue", "--from", src, "--out", tmp_path / "c", "--cooldown-every", "2"], capsys, tmp_path, "go together")
    _cli_rejects(["continue", "--from", src, "--out", tmp_path / "c", "--cooldown-every", "0", "--cooldown-steps", "2"], capsys, tmp_path,
                 "--cooldown-every must be a positive")
