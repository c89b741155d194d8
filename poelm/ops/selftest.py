"""``poelm selftest``: fault injection and the bad-input suite, as counts a person can read.

Two harnesses, both on a tiny model (vocab 320, depth 2, K=2, n_embd 32) so they run on 2 CPU
cores in about two minutes, and both drive the real CLI in subprocesses (``python -m poelm``):

``faults(trials)``: each trial starts ``train --resume``, ``continue`` or ``publish`` (chosen by
the trial's seed) with ``save_every = 1`` and a trajectory repository, and kills its whole
process group with SIGKILL at a random moment. To make the dangerous moments likely, the child
runs through ``python -m poelm`` with ``$POELM_SELFTEST_FAULT`` set (``poelm/__main__.py`` calls
``install_fault`` below before the CLI), which wraps one library function
(the ``POINTS`` table: inside the safetensors writes of a checkpoint, before its manifest, before
its directory rename, before ``latest``, after the export / object hashing / commit of a publish,
before the ref transaction) so that its n-th call touches a marker file and sleeps; the harness
kills at a random delay after the marker appears ("random" trials kill at a random wall time).
The library itself has no fault hooks. After each kill the trial checks that

1. every ``step-XXXXX`` directory verifies against its manifest and the newest one loads;
2. no checkpoint that existed before the kill is gone;
3. the trajectory repository verifies (``verify.verify``: no half branch, no staging branch,
   ``main`` at the newest complete branch);
4. ``--resume`` from the newest checkpoint continues to the end of the phase, publishing to the
   same repository (so a stale git lock would show), and the final model and optimizer state are
   bitwise equal to an uninterrupted run's;
5. after publishing any checkpoint the kill left unpublished, the repository holds every step
   and verifies.

A trial "lost nothing" when all five hold. ``faults`` prints "N/N trials lost nothing".

``bad_inputs()``: each case is one CLI call on a prepared bad input; it is rejected cleanly when
the exit code is 2, stderr is exactly one line starting with ``error:`` that matches the case's
expected message, there is no traceback, and every file that existed before is byte-identical
after. ``bad_inputs`` prints "N/N bad inputs rejected cleanly".
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# The tiny model every harness uses (the figures); phases are 4 steps, saved every step.
TINY = [
    "model.vocab_size=320", "model.depth=2", "model.stage_layers=[1,1]", "model.n_embd=32", "model.n_head=2",
    "model.n_kv_head=1", "model.intermediate=64", "model.max_seq_len=64", "train.seq_len=32",
    "train.device_batch_size=2", "train.eval_tokens=1024", "train.eval_every=0", "train.log_every=1",
    "data.tokenizer_train_chars=100000", "schedule.steps=4", "schedule.warmup=1", "train.save_every=1",
]
END, SEED_STEP, CONT_STEPS = 4, 2, 2
FAULT_ENV = "POELM_SELFTEST_FAULT"
SLEEP = 0.4  # seconds a hooked call stalls; kills land uniformly in [0, 1.2 x SLEEP] after the marker

# point -> (module, attribute, when the marker is touched relative to the real call)
POINTS = {
    "ckpt.tensors": ("poelm.train.checkpoint", "save_file", "after"),  # inside atomic_dir, between files
    "ckpt.manifest": ("poelm.train.checkpoint", "write_manifest", "before"),
    "ckpt.rename": ("poelm.fsio", "fsync_tree", "after"),  # fsynced, not yet renamed into place
    "ckpt.latest": ("poelm.train.checkpoint", "atomic_write_text", "before"),  # renamed, `latest` not yet moved
    "publish.export": ("poelm.trajectory.export", "export", "after"),
    "publish.hash": ("poelm.trajectory.gitrepo.GitRepo", "hash_files", "after"),  # objects written, no commit
    "publish.commit": ("poelm.trajectory.gitrepo.GitRepo", "commit", "after"),  # commit written, refs not moved
    "publish.refs": ("poelm.trajectory.gitrepo.GitRepo", "update_refs", "before"),  # the ref transaction itself
    # atomic_dir(overwrite=True) has moved the old directory aside, the new one is not in place yet
    "ckpt.overwrite": ("os", "replace", "after"),
}
# only the os.replace calls that move an existing directory aside count for "ckpt.overwrite"
_FILTERS = {"ckpt.overwrite": lambda a, k: str(a[1]).endswith(".old")}
KIND_POINTS = {
    "train": [p for p in POINTS if p != "ckpt.overwrite"] + ["random"],
    "continue": [p for p in POINTS if p != "ckpt.overwrite"] + ["random"],
    "publish": [p for p in POINTS if p.startswith("publish.")] + ["random"],
}


# ----------------------------------------------------------------------------- the child side
def install_fault(spec: dict) -> None:
    """Wrap ``POINTS[spec["point"]]``: on its ``nth`` call touch ``spec["marker"]``, then either
    sleep ``spec["sleep"]`` seconds (``mode = "stall"``) or raise ``OSError(ENOSPC)``
    (``mode = "enospc"``, a full disk)."""
    import importlib

    mod_name, attr, when = POINTS[spec["point"]]
    if mod_name.endswith(".GitRepo"):
        owner = getattr(importlib.import_module(mod_name.rsplit(".", 1)[0]), "GitRepo")
    else:
        owner = importlib.import_module(mod_name)
    real = getattr(owner, attr)
    calls = [0]

    def fire():
        Path(spec["marker"]).write_text(spec["point"])
        if spec.get("mode") == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        time.sleep(float(spec.get("sleep", SLEEP)))

    keep = _FILTERS.get(spec["point"], lambda a, k: True)

    def wrapped(*a, **k):
        if not keep(a, k):
            return real(*a, **k)
        calls[0] += 1
        hit = calls[0] == int(spec.get("nth", 1))
        if hit and when == "before":
            fire()
        out = real(*a, **k)
        if hit and when == "after":
            fire()
        return out

    setattr(owner, attr, wrapped)


# ----------------------------------------------------------------------------- helpers
def _child_env(fault: dict | None) -> dict:
    # One intra-op thread: on a busy 2-core machine torch's OpenMP workers spin-wait on every
    # tiny matmul and a 4-step run takes a minute instead of a second.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if fault:
        env[FAULT_ENV] = json.dumps(fault)
    return env


def cli_run(args, cwd=None, fault: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m poelm ARGS`` (through the fault child when ``fault``) to completion."""
    env = _child_env(fault)
    return subprocess.run([sys.executable, "-m", "poelm", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _popen(args, fault: dict | None, log: Path) -> subprocess.Popen:
    env = _child_env(fault)
    with open(log, "wb") as f:
        # own session: SIGKILL goes to the whole group (git children included), like a node dying
        return subprocess.Popen([sys.executable, "-m", "poelm", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tree_digest(root) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (files vanishing meanwhile skipped)."""
    root, out = Path(root), {}
    for p in sorted(root.rglob("*")):
        try:
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            pass
    return out


def _tensors_equal(a_path: Path, b_path: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- shared fixture
@dataclass
class Fixture:
    root: Path
    ref: Path  # uninterrupted run, steps 1..END
    ref_cont: Path  # uninterrupted continual phase from ref/step-SEED_STEP, CONT_STEPS steps
    seed_run: Path  # only step-SEED_STEP (+ tokenizer.json): what a train trial resumes
    seed_repo: Path  # trajectory repo holding branch step-SEED_STEP


def prepare(root) -> Fixture:
    """Train the reference runs once (in process) and build the seed run and repository."""
    from poelm import config
    from poelm.trajectory import publish
    from poelm.train import loop as train

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "ref"
    train.train(config.load("embedded", TINY), ref, progress=False)
    ref_cont = root / "ref-cont"
    train.continue_phase(ref / f"step-{SEED_STEP:05d}", ref_cont, steps=CONT_STEPS, progress=False, overrides=["train.save_every=1"])
    seed_run = root / "seed-run"
    shutil.copytree(ref / f"step-{SEED_STEP:05d}", seed_run / f"step-{SEED_STEP:05d}")
    shutil.copy(ref / "tokenizer.json", seed_run / "tokenizer.json")
    seed_repo = root / "seed-repo"
    publish.publish(seed_run / f"step-{SEED_STEP:05d}", seed_repo)
    return Fixture(root, ref, ref_cont, seed_run, seed_repo)


# ----------------------------------------------------------------------------- kill trials
@dataclass
class Trial:
    index: int
    kind: str
    point: str
    nth: int
    delay: float
    killed: bool = False
    problems: list = field(default_factory=list)
    leftovers: list = field(default_factory=list)  # temp dirs a kill left (garbage, not loss)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _order(seed: int) -> list[tuple[str, str]]:
    """Every (verb, point) combination once: first one per point (so any 9 trials hit every
    point), then the rest, each part shuffled by ``seed``; trials cycle through it."""
    rng = random.Random(seed)
    combos = [(k, p) for k in KIND_POINTS for p in KIND_POINTS[k]]
    points = sorted({p for _, p in combos})
    rng.shuffle(points)
    first = [(rng.choice([k for k, q in combos if q == p]), p) for p in points]
    rest = [c for c in combos if c not in first]
    rng.shuffle(rest)
    return first + rest


def _plan(index: int, seed: int) -> Trial:
    order = _order(seed)
    kind, point = order[index % len(order)]
    rng = random.Random(seed * 1_000_003 + index)
    nth = 1 if kind == "publish" or point == "random" else rng.randint(1, 2)
    delay = rng.uniform(1.0, 4.0) if point == "random" else rng.uniform(0.0, 1.2 * SLEEP)
    return Trial(index, kind, point, nth, delay)


def _check_checkpoints(run: Path, must_keep: list[str], t: Trial):
    """Steps 1-2: every step dir verifies; the newest loads; nothing that existed is gone."""
    from poelm.train import checkpoint

    for name in must_keep:
        if not (run / name).is_dir():
            t.problems.append(f"{name} existed before the kill and is gone")
    for p in sorted(run.glob("step-*")):
        try:
            checkpoint.verify(p)
        except Exception as e:
            t.problems.append(f"{p.name} does not verify after the kill: {e}")
    t.leftovers += sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    newest = checkpoint.latest(run)
    if newest is not None:
        try:
            checkpoint.load_model(newest)
        except Exception as e:
            t.problems.append(f"newest checkpoint {newest.name} does not load: {e}")
    return newest


def _check_repo(repo: Path, t: Trial, when: str, complete_to: int | None = None):
    """Step 3/5: the repository verifies; ``complete_to``: it must hold every step up to it."""
    from poelm.trajectory import publish, verify

    if not repo.exists():
        return
    try:
        branches = [r["branch"] for r in publish.list_branches(repo)]
        problems = [p for p in verify.verify(repo) if not (p.endswith("holds no step-XXXXX branches") and complete_to is None)]
    except Exception as e:
        t.problems.append(f"repository unreadable {when}: {e}")
        return
    t.problems += [f"repository {when}: {p}" for p in problems]
    if complete_to is not None:
        want = {publish.branch_name(s) for s in range(SEED_STEP, complete_to + 1)}
        if missing := sorted(want - set(branches)):
            t.problems.append(f"repository {when}: missing {', '.join(missing)}")


def _resume_and_compare(fx: Fixture, run: Path, repo: Path, newest, reference: Path, t: Trial, restart):
    """Step 4-5: resume to the end (publishing), compare with the reference, fill holes."""
    from poelm.train import checkpoint
    from poelm.trajectory import publish
    from poelm.train import loop as train

    try:
        if newest is None:
            restart()
        else:
            cfg = checkpoint.load(newest, with_optim=False).config
            train.train(cfg, run, resume=newest, publisher=partial(publish.Publisher, str(repo)), progress=False)
    except Exception as e:
        t.problems.append(f"resume failed: {type(e).__name__}: {e}")
        return
    final = run / f"step-{END:05d}"
    for name in ("model.safetensors", "optim.safetensors"):
        if not (final / name).is_file() or not _tensors_equal(final / name, reference / f"step-{END:05d}" / name):
            t.problems.append(f"resumed run's {name} at step {END} differs from the uninterrupted run")
    have = {r["branch"] for r in publish.list_branches(repo)} if repo.exists() else set()
    for p in sorted(run.glob("step-*")):
        if p.name not in have:  # a checkpoint saved but not yet published when killed
            try:
                publish.publish(p, repo)
            except Exception as e:
                t.problems.append(f"publishing {p.name} after the kill failed: {e}")
    _check_repo(repo, t, "after resume", complete_to=END)


def run_trial(fx: Fixture, t: Trial, work: Path) -> Trial:
    from poelm.trajectory import publish
    from poelm.train import loop as train

    t0 = time.time()
    work.mkdir(parents=True)
    marker = work / "marker"
    fault = None if t.point == "random" else {"point": t.point, "nth": t.nth, "marker": str(marker), "sleep": SLEEP}
    if t.kind == "train":
        run, repo = work / "run", work / "repo"
        shutil.copytree(fx.seed_run, run)
        shutil.copytree(fx.seed_repo, repo)
        args = ["train", "--resume", run / f"step-{SEED_STEP:05d}", "--publish", repo, "--quiet"]
        must_keep, reference = [f"step-{SEED_STEP:05d}"], fx.ref
    elif t.kind == "continue":
        run, repo = work / "cont", work / "cont-repo"
        src = fx.ref / f"step-{SEED_STEP:05d}"
        args = ["continue", "--from", src, "--out", run, "--steps", CONT_STEPS, "--save-every", 1, "--publish", repo, "--quiet"]
        must_keep, reference = [], fx.ref_cont
    else:
        run, repo = None, work / "repo"
        shutil.copytree(fx.seed_repo, repo)
        args = ["publish", fx.ref / f"step-{END:05d}", repo]
    proc = _popen(args, fault, work / "child.log")
    try:
        if fault is None:
            deadline = time.time() + t.delay
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
        else:
            while not marker.exists() and proc.poll() is None:
                time.sleep(0.005)
            if marker.exists():
                time.sleep(t.delay)
        t.killed = proc.poll() is None
    finally:
        _kill_group(proc)
    if not t.killed and proc.returncode != 0:
        t.problems.append(f"the child exited {proc.returncode} before the kill: {(work / 'child.log').read_text()[-300:]}")
    if t.kind == "publish":
        _check_repo(repo, t, "after the kill")
        if t.ok:
            try:
                if publish.branch_name(END) not in {r["branch"] for r in publish.list_branches(repo)}:
                    publish.publish(fx.ref / f"step-{END:05d}", repo)
                from poelm.trajectory.gitrepo import GitRepo

                g = GitRepo(repo)
                refs = g.refs()
                if refs.get("main") != refs.get(publish.branch_name(END)):
                    t.problems.append(f"main does not hold step {END} after the publish completed")
            except Exception as e:
                t.problems.append(f"publishing again after the kill failed: {e}")
            _check_repo(repo, t, "after publishing again")
    else:
        run.mkdir(parents=True, exist_ok=True)
        newest = _check_checkpoints(run, must_keep, t)
        _check_repo(repo, t, "after the kill")

        def restart():  # killed before the continual phase saved its seed: start it again
            train.continue_phase(fx.ref / f"step-{SEED_STEP:05d}", run, steps=CONT_STEPS, publisher=partial(publish.Publisher, str(repo)), progress=False,
                                 overrides=["train.save_every=1"])

        if t.ok:
            _resume_and_compare(fx, run, repo, newest, reference, t, restart)
    t.seconds = time.time() - t0
    return t


def faults(trials: int = 20, seed: int = 0, workdir=None, keep: bool = False, out=print, fx: Fixture | None = None) -> list[Trial]:
    """Run ``trials`` kill trials; print one line per trial and "N/N trials lost nothing"."""
    import torch

    torch.set_num_threads(1)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="poelm-selftest-"))
    t0 = time.time()
    try:
        fx = fx or prepare(root / "fixture")
        out(f"fixture ready: reference runs to step {END} ({time.time() - t0:.1f}s)")
        results = []
        for i in range(trials):
            t = run_trial(fx, _plan(i, seed), root / f"trial-{i:03d}")
            results.append(t)
            status = "ok" if t.ok else "LOST: " + "; ".join(t.problems)
            what = "killed" if t.killed else "finished before the kill"
            extra = f", left {len(t.leftovers)} temp dir(s)" if t.leftovers else ""
            out(f"trial {i:3d} {t.kind:<8} {t.point:<14} n={t.nth} +{t.delay:.2f}s {what}{extra} ({t.seconds:.1f}s): {status}")
        n_ok = sum(t.ok for t in results)
        killed = sum(t.killed for t in results)
        out(f"{n_ok}/{len(results)} trials lost nothing ({killed} killed mid-run, {time.time() - t0:.1f}s)")
        return results
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
