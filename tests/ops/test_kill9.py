"""kill -9 of training / continue / publish at random moments (inside checkpoint writes and
branch publishes included): nothing is lost. POELM_FAULT_TRIALS / POELM_FAULT_SEED raise the
count or change the plan (``poelm selftest faults --trials N`` is the same harness)."""

import os
import shutil
import time


from poelm.train import checkpoint
from poelm.ops import selftest


def test_kill_trials_lose_nothing(fx, tmp_path):
    n = int(os.environ.get("POELM_FAULT_TRIALS", "20"))
    lines = []
    results = selftest.faults(n, seed=int(os.environ.get("POELM_FAULT_SEED", "0")), workdir=tmp_path / "t", fx=fx, out=lines.append)
    print("\n".join(lines))
    lost = [f"trial {t.index} ({t.kind}, {t.point}): {t.problems}" for t in results if not t.ok]
    assert not lost, "\n".join(lost)
    assert lines[-1].startswith(f"{n}/{n} trials lost nothing")
    # the kills really landed mid-run, in checkpoint writes and in publishes, of all three verbs
    assert sum(t.killed for t in results) >= 0.8 * n
    if n >= 20:
        assert {t.kind for t in results} == {"train", "continue", "publish"}
        assert {t.point for t in results if t.killed} >= {"ckpt.tensors", "ckpt.manifest", "ckpt.rename", "publish.commit", "publish.refs"}


def test_plan_is_reproducible_and_covers_points():
    a = [selftest._plan(i, 0) for i in range(40)]
    b = [selftest._plan(i, 0) for i in range(40)]
    assert [(t.kind, t.point, t.nth, t.delay) for t in a] == [(t.kind, t.point, t.nth, t.delay) for t in b]
    assert {t.point for t in a[:20]} >= set(selftest.POINTS) - {"ckpt.overwrite"}


def _kill_at(args, point, marker, nth=1):
    proc = selftest._popen(args, {"point": point, "nth": nth, "marker": str(marker), "sleep": 30}, marker.with_suffix(".log"))
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert marker.exists(), marker.with_suffix(".log").read_text()[-500:]
    finally:
        selftest._kill_group(proc)


def test_kill_between_checkpoint_files_leaves_only_complete_checkpoints(run_copy, tmp_path):
    before = selftest.tree_digest(run_copy / "step-00002")
    _kill_at(["train", "--resume", run_copy / "step-00002", "--quiet"], "ckpt.tensors", tmp_path / "m", nth=2)
    assert sorted(p.name for p in run_copy.glob("step-*")) == ["step-00002"]  # no half step-00003
    assert selftest.tree_digest(run_copy / "step-00002") == before
    assert checkpoint.latest(run_copy).name == "step-00002"
    leftovers = [p.name for p in run_copy.iterdir() if p.name.startswith(".step-00003.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the unfinished temp dir, ignored


def test_kill_while_overwriting_a_checkpoint_keeps_it(fx, tmp_path):
    """``continue --out`` into the source's own run dir re-saves the source step (the seed): a
    kill while the old directory is moved aside must not lose it."""
    run = tmp_path / "run"
    shutil.copytree(fx.ref, run)
    src = run / "step-00004"
    _kill_at(["continue", "--from", src, "--out", run, "--steps", 2, "--save-every", 1, "--quiet"], "ckpt.overwrite", tmp_path / "m")
    assert checkpoint.latest(run) is not None and checkpoint.latest(run).name == "step-00004"
