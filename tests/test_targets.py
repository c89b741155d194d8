"""poelm.targets: one TARGET grammar for every verb, resolved (and refused) before any compute."""

from __future__ import annotations

import json
import shutil

import pytest

from poelm import cli, targets
from poelm.trajectory import publish


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """A tiny run (steps 1..4) with steps 2 and 4 published; main = step-00004."""
    from poelm.ops import selftest

    root = tmp_path_factory.mktemp("targets")
    from poelm import config
    from poelm.train import loop as train

    run = root / "run"
    train.train(config.load("embedded", selftest.TINY), run, progress=False)
    repo = root / "repo"
    publish.publish(run / "step-00002", repo)
    publish.publish(run / "step-00004", repo)
    export = root / "export"
    publish.checkout(repo, "step-00002", export)
    return {"run": run, "repo": repo, "export": export, "root": root}


def test_every_form_resolves(traj, tmp_path):
    run, repo, export = traj["run"], traj["repo"], traj["export"]
    t = targets.resolve(str(run / "step-00003"))
    assert (t.kind, t.path, t.repo) == ("checkpoint", run / "step-00003", None)
    t = targets.resolve(str(run))  # a run dir: its newest save
    assert (t.kind, t.path.name) == ("checkpoint", "step-00004")
    t = targets.resolve(str(export))
    assert t.kind == "export" and t.path == export
    for text, branch in [(f"{repo}@step-00002", "step-00002"), (f"{repo}@main", "step-00004"), (str(repo), "step-00004")]:
        t = targets.resolve(text, tmp_path / text.replace("/", "_"))
        assert (t.kind, t.repo, t.branch) == ("branch", str(repo), branch), text
        assert json.loads((t.path / "poelm_manifest.json").read_text())["step"] == int(branch[5:])
        assert t.label == f"{repo}@{branch}"
    assert targets.repository(f"{repo}@main") == (str(repo), "step-00004")
    assert targets.repository(str(repo)) == (str(repo), None)


def test_hub_form_goes_through_the_hub_backend(monkeypatch):
    seen = []

    class Fake:
        def refs(self):
            return {"main": "c1", "step-00007": "c1"}

    monkeypatch.setattr(publish, "open_repo", lambda repo, api=None, create=False: seen.append(repo) or Fake())
    monkeypatch.setattr(publish, "read_json", lambda backend, rev, name: {"step": 7})
    assert targets.resolve("hf://org/name@main", want="repo").branch == "step-00007"
    assert targets.resolve("hf://org/name", want="repo").branch == "step-00007"
    assert seen == ["hf://org/name", "hf://org/name"]


@pytest.mark.parametrize("text,match", [
    ("{repo}@step-00003", r"has no branch step-00003 \(nearest: step-00002, step-00004"),
    ("{repo}@step-1", "invalid revision 'step-1'"),
    ("{repo}@main;rm -rf x", "invalid revision"),
    ("{repo}@../etc", "invalid revision"),
    ("{root}/nothing-here", "not found"),
    ("{root}/nothing-here@main", "no such folder or repository"),
    ("{run}/step-00003@main", "not a trajectory repository"),
    ("", "empty TARGET"),
])
def test_bad_targets_are_one_clear_error(traj, text, match):
    text = text.format(**{k: str(v) for k, v in traj.items()})
    with pytest.raises(targets.TargetError, match=match):
        targets.resolve(text)


def test_resume_needs_a_full_checkpoint(traj):
    with pytest.raises(targets.TargetError, match="no optimizer state"):
        targets.resolve(str(traj["export"]), want="checkpoint")
    with pytest.raises(targets.TargetError, match="no optimizer state"):
        targets.resolve(f"{traj['repo']}@main", want="checkpoint")
    assert targets.resolve(str(traj["run"]), want="checkpoint").path.name == "step-00004"


@pytest.mark.parametrize("argv", [
    ["generate", "{repo}@step-00009", "--prompt", "x"],
    ["measure", "{repo}@step-00009"],
    ["export", "{repo}@step-00009", "{root}/out-x"],
    ["checkout", "{repo}@step-00009", "{root}/out-y"],
    ["branches", "{root}/nothing-here"],
    ["report", "{repo}@step-00009"],
    ["train", "--resume", "{export}", "--out", "{root}/out-z"],
    ["continue", "--from", "{repo}@step-00009", "--out", "{root}/out-w"],
])
def test_every_verb_refuses_a_missing_target_before_work(traj, argv, capsys):
    argv = [a.format(**{k: str(v) for k, v in traj.items()}) for a in argv]
    before = sorted(p.name for p in traj["root"].iterdir())
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert sorted(p.name for p in traj["root"].iterdir()) == before  # nothing written


def test_every_verb_accepts_repo_at_main(traj, tmp_path, capsys):
    repo = traj["repo"]
    assert cli.main(["checkout", f"{repo}@main", str(tmp_path / "co")]) == 0
    assert json.loads((tmp_path / "co" / "poelm_manifest.json").read_text())["step"] == 4
    assert cli.main(["checkout", str(repo), "step-00002", str(tmp_path / "co2")]) == 0  # the older form
    assert cli.main(["export", f"{repo}@main", str(tmp_path / "ex")]) == 0
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["step"] == 4
    assert cli.main(["branches", f"{repo}@main"]) == 0
    assert "step-00004" in capsys.readouterr().out
    assert cli.main(["generate", f"{repo}@main", "--prompt", "The", "--max-new-tokens", "3"]) == 0
    shutil.rmtree(tmp_path / "co")
