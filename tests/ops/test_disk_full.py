"""A full disk (OSError ENOSPC from a writer) while saving a checkpoint or publishing: the previous
checkpoint survives untouched, no half checkpoint or branch is left, and the CLI says what
happened in one line with exit code 2. The failing writer is injected into the real CLI by
``poelm.selftest`` (the library has no fault hooks)."""

import pytest

from poelm.train import checkpoint
from poelm.trajectory import publish
from poelm.trajectory import verify
from poelm.ops import selftest

ENOSPC = {"mode": "enospc", "nth": 1}


def _one_error_line(p):
    lines = p.stderr.strip().splitlines()
    return p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0]


@pytest.fixture(params=["ckpt.tensors", "ckpt.manifest"])
def full_disk_save(request, run_copy, tmp_path):
    before = selftest.tree_digest(run_copy)
    p = selftest.cli_run(["train", "--resume", run_copy / "step-00002", "--quiet"],
                         fault={**ENOSPC, "point": request.param, "marker": str(tmp_path / "m")})
    assert (tmp_path / "m").exists()  # the fault fired
    return run_copy, before, p


def test_full_disk_keeps_previous_checkpoint(full_disk_save):
    run, before, p = full_disk_save
    assert p.returncode != 0 and "No space left on device" in p.stderr
    after = selftest.tree_digest(run)
    assert {k: v for k, v in after.items() if k.startswith("step-00002/")} == {k: v for k, v in before.items() if k.startswith("step-00002/")}
    assert sorted(q.name for q in run.iterdir() if q.name.startswith(("step-", ".step-"))) == ["step-00002"]  # nothing half-written
    checkpoint.verify(run / "step-00002")
    assert checkpoint.latest(run).name == "step-00002"


def test_full_disk_is_one_error_line(full_disk_save):
    run, before, p = full_disk_save
    assert _one_error_line(p), p.stderr[-400:]


def test_full_disk_while_publishing_is_one_error_line(fx, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(fx.seed_repo, repo)
    refs = publish.open_repo(repo).refs()
    p = selftest.cli_run(["publish", fx.ref / "step-00004", repo], fault={**ENOSPC, "point": "publish.export", "marker": str(tmp_path / "m")})
    assert publish.open_repo(repo).refs() == refs and verify.verify(repo) == []
    assert _one_error_line(p), p.stderr[-400:]


def test_full_disk_in_background_publish(fx, run_copy, tmp_path):
    """Training goes on when a publish fails; the run ends with exit 2 and one 'error:' line
    naming the failed checkpoint; the checkpoints and the repository are intact."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(fx.seed_repo, repo)
    p = selftest.cli_run(["train", "--resume", run_copy / "step-00002", "--publish", repo, "--quiet"],
                         fault={**ENOSPC, "point": "publish.export", "marker": str(tmp_path / "m")})
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last.startswith("error: 1 publish(es)") and "step-00003" in last and "No space left on device" in last
    for s in (2, 3, 4):
        checkpoint.verify(run_copy / f"step-{s:05d}")
    assert [r["branch"] for r in publish.list_branches(repo)] == ["step-00002", "step-00004"]
    assert verify.verify(repo) == []
    assert publish.publish(run_copy / "step-00003", repo) == "step-00003"  # the hole can be filled later
    assert verify.verify(repo) == []
