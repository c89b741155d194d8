"""``poelm selftest``: fault injection and the bad-input suite, as counts a person can read.

Two harnesses, both on a tiny model (vocab 320, depth 2, K=2, n_embd 32) so they run on 2 CPU
cores in about two minutes, and both drive the real CLI in subprocesses (``python -m poelm``):

``faults(trials)``: each trial starts ``train --resume``, ``continue`` or ``publish`` (chosen by
the trial's seed) with ``save_every = 1`` and a trajectory repository, and kills its whole
process group with SIGKILL at a random moment. To make the dangerous moments likely, the child
runs through ``python -m poelm.selftest`` (``_child`` below), which wraps one library function
(the ``POINTS`` table: inside the safetensors writes of a checkpoint, before its manifest, before
its directory rename, before ``latest``, after the export / object hashing / commit of a publish,
before the ref transaction) so that its n-th call touches a marker file and sleeps; the harness
kills at a random delay after the marker appears ("random" trials kill at a random wall time).
The library itself has no fault hooks. After each kill the trial checks that

1. every ``step-XXXXX`` directory verifies against its manifest and the newest one loads;
2. no checkpoint that existed before the kill is gone;
3. the trajectory repository verifies (``publish.verify``: no half branch, no staging branch,
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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    "ckpt.tensors": ("poelm.checkpoint", "save_file", "after"),  # inside atomic_dir, between files
    "ckpt.manifest": ("poelm.checkpoint", "write_manifest", "before"),
    "ckpt.rename": ("poelm.fsio", "fsync_tree", "after"),  # fsynced, not yet renamed into place
    "ckpt.latest": ("poelm.checkpoint", "atomic_write_text", "before"),  # renamed, `latest` not yet moved
    "publish.export": ("poelm.export", "export", "after"),
    "publish.hash": ("poelm.gitrepo.GitRepo", "hash_files", "after"),  # objects written, no commit
    "publish.commit": ("poelm.gitrepo.GitRepo", "commit", "after"),  # commit written, refs not moved
    "publish.refs": ("poelm.gitrepo.GitRepo", "update_refs", "before"),  # the ref transaction itself
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


def _child(argv: list[str]) -> int:
    """``python -m poelm.selftest ARGS``: the real CLI with the fault of ``$POELM_SELFTEST_FAULT``."""
    spec = os.environ.get(FAULT_ENV)
    if spec:
        install_fault(json.loads(spec))
    from . import cli

    return cli.main(argv)


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
    mod = "poelm.selftest" if fault else "poelm"
    return subprocess.run([sys.executable, "-m", mod, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _popen(args, fault: dict | None, log: Path) -> subprocess.Popen:
    env = _child_env(fault)
    with open(log, "wb") as f:
        # own session: SIGKILL goes to the whole group (git children included), like a node dying
        return subprocess.Popen([sys.executable, "-m", "poelm.selftest", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
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
    from . import config, publish, train

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
    from . import checkpoint

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
    from . import publish

    if not repo.exists():
        return
    try:
        branches = [r["branch"] for r in publish.list_branches(repo)]
        problems = [p for p in publish.verify(repo) if not (p.endswith("holds no step-XXXXX branches") and complete_to is None)]
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
    from . import checkpoint, publish, train

    try:
        if newest is None:
            restart()
        else:
            cfg = checkpoint.load(newest, with_optim=False).config
            train.train(cfg, run, resume=newest, publish=str(repo), progress=False)
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
    from . import publish, train

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
                from .gitrepo import GitRepo

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
            train.continue_phase(fx.ref / f"step-{SEED_STEP:05d}", run, steps=CONT_STEPS, publish=str(repo), progress=False,
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


# ----------------------------------------------------------------------------- bad inputs
@dataclass
class Case:
    name: str
    args: list
    expect: str  # regex the one stderr line must match (after "error: ")
    rc: int | None = None
    stderr: str = ""
    changed: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rewrite_manifest(d: Path) -> None:
    from .checkpoint import write_manifest

    write_manifest(d)


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_bad_inputs(fx: Fixture, root: Path) -> list[Case]:
    """Prepare every bad input under ``root`` and return the cases (CLI args, expected message)."""
    from safetensors.torch import load_file, save_file

    from . import config
    from .tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    good = fx.ref / f"step-{END:05d}"
    T = [a for o in TINY for a in ("--set", o)]
    cases = []

    trunc = _copy_ckpt(good, root / "trunc" / "step-00004")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases.append(Case("truncated safetensors (resume)", ["train", "--resume", trunc, "--quiet"], r"checkpoint .* model\.safetensors is truncated"))
    cases.append(Case("truncated safetensors (export)", ["export", trunc, root / "trunc-export"], r"model\.safetensors is truncated"))

    flip = _copy_ckpt(good, root / "flip" / "step-00004")
    f = flip / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x10  # a bit inside the last tensor's data
    f.write_bytes(bytes(data))
    cases.append(Case("bit-flipped tensor (manifest hash)", ["generate", flip, "--prompt", "a", "--max-new-tokens", "2"], r"model\.safetensors does not match its manifest hash"))

    arch = _copy_ckpt(good, root / "arch" / "step-00004")  # weights of depth 3 under a depth-2 config
    sd = load_file(str(arch / "model.safetensors"))
    sd["blocks.2.mlp.c_fc.weight"] = sd["blocks.1.mlp.c_fc.weight"].clone()
    save_file(sd, str(arch / "model.safetensors"), metadata={"format": "pt"})
    _rewrite_manifest(arch)
    cases.append(Case("checkpoint of another architecture", ["train", "--resume", arch, "--quiet"], r"does not match the model architecture \(unexpected blocks\.2\.mlp\.c_fc\.weight\)"))
    arch2 = _copy_ckpt(good, root / "arch2" / "step-00004")
    sd = load_file(str(arch2 / "model.safetensors"))
    sd["wte.weight"] = sd["wte.weight"][:, :16].contiguous()
    save_file(sd, str(arch2 / "model.safetensors"), metadata={"format": "pt"})
    _rewrite_manifest(arch2)
    cases.append(Case("checkpoint of another width", ["generate", arch2, "--prompt", "a"], r"wte\.weight has shape \(320, 16\), model expects \(320, 32\)"))

    from .data import tokenizer_texts

    small = train_tokenizer(tokenizer_texts(config.load("embedded", TINY).data, 20_000), 300)
    vocab = _copy_ckpt(good, root / "vocab" / "step-00004")
    small.save(vocab)
    _rewrite_manifest(vocab)
    cases.append(Case("tokenizer of another vocabulary (generate)", ["generate", vocab, "--prompt", "a"], r"tokenizer in .* has 300 tokens but the model expects 320"))
    cases.append(Case("tokenizer of another vocabulary (resume)", ["train", "--resume", vocab, "--quiet"], r"saved with a different tokenizer"))

    (root / "bad.toml").write_text("[model]\ndepth = = 3\n")
    cases.append(Case("malformed TOML", ["train", "--config", root / "bad.toml", "--out", root / "o1", "--quiet"], r"malformed TOML in .*bad\.toml"))
    (root / "unknown.toml").write_text("[model]\ndepht = 3\n")
    cases.append(Case("unknown config key (file)", ["train", "--config", root / "unknown.toml", "--out", root / "o2", "--quiet"], r"unknown config key model\.depht"))
    cases.append(Case("unknown config key (--set)", ["train", *T, "--set", "train.sav_every=3", "--out", root / "o3", "--quiet"], r"unknown config key train\.sav_every"))
    cases.append(Case("stage_layers not summing to depth", ["train", *T, "--set", "model.stage_layers=[1,2]", "--out", root / "o4", "--quiet"],
                      r"model\.stage_layers \[1, 2\] sums to 3 but model\.depth is 2"))

    repo = fx.seed_repo
    for bad in ("../step-00002", "step-00002..main", "refs/heads/main", "step 00002", "step-00002;touch pwned", "$(touch pwned)"):
        cases.append(Case(f"branch name {bad!r}", ["checkout", repo, bad, root / "co"], r"invalid branch .*: expected step-XXXXX"))
    cases.append(Case("revision that does not exist", ["checkout", repo, "step-99999", root / "co"], r"has no branch step-99999"))
    cases.append(Case("revision that does not exist (REPO@)", ["continue", "--from", f"{repo}@step-99999", "--out", root / "o5", "--quiet"], r"has no branch step-99999"))

    # NaN: a continual phase whose scalar LR explodes after the lrm=0 first update
    cases.append(Case("NaN/inf loss during training", ["continue", "--from", good, "--set", "optim.scalar_lr=1e30", "--steps", "4", "--save-every", "1",
                                                       "--out", root / "nan", "--quiet"], r"(loss|BPB) became nan at step \d+"))
    (root / "empty.txt").write_text("")
    cases.append(Case("empty corpus file", ["train", *T, "--set", f"data.path={root / 'empty.txt'}", "--out", root / "o6", "--quiet"], r"the training split is empty"))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    cases.append(Case("binary corpus file", ["train", *T, "--set", f"data.path={root / 'binary.txt'}", "--out", root / "o7", "--quiet"], r"binary\.txt looks binary"))
    return cases


def _digest(watch: list[Path]) -> dict[str, str]:
    return {f"{i}:{k}": v for i, w in enumerate(watch) for k, v in tree_digest(w).items()}


def run_case(c: Case, watch: list[Path], before: dict | None = None) -> Case:
    """Run one case (in ``watch[0]``); every file under ``watch`` that is in ``before`` (default:
    a snapshot now) must be byte-identical after it. The suite passes the snapshot taken before
    any case ran, so cases running side by side never see each other's new files as changes."""
    before = _digest(watch) if before is None else before
    p = cli_run(c.args, cwd=watch[0])
    c.rc, c.stderr = p.returncode, p.stderr
    after = _digest(watch)
    c.changed = sorted(k for k in before if after.get(k) != before[k])
    lines = p.stderr.strip().splitlines()
    if p.returncode != 2:
        c.problems.append(f"exit code {p.returncode}, expected 2")
    if "Traceback" in p.stderr:
        c.problems.append("traceback on stderr")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        c.problems.append(f"stderr is not one 'error:' line: {lines[-3:]}")
    elif not re.search(c.expect, lines[0]):
        c.problems.append(f"message does not match /{c.expect}/: {lines[0]}")
    if c.changed:
        c.problems.append(f"changed existing files: {c.changed[:3]}")
    if (watch[0] / "pwned").exists():
        c.problems.append("a shell metacharacter in a name was executed")
    return c


def bad_inputs(workdir=None, keep: bool = False, fx: Fixture | None = None, out=print, workers: int = 2) -> list[Case]:
    """Run the bad-input suite; print one line per case and "N/N bad inputs rejected cleanly"."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="poelm-selftest-"))
    t0 = time.time()
    try:
        fx = fx or prepare(root / "fixture")
        cases = build_bad_inputs(fx, root / "inputs")
        from concurrent.futures import ThreadPoolExecutor

        # two at a time: each case is mostly interpreter start-up; new files of one case never
        # touch the files another case watches, so the byte-identity checks stay per case
        with ThreadPoolExecutor(max_workers=workers) as pool:
            watch = [root, fx.root]  # the inputs and the fixture runs/repository they point into
            before = _digest(watch)
            for c in pool.map(lambda c: run_case(c, watch, before), cases):
                last = c.stderr.strip().splitlines()[-1] if c.stderr.strip() else "(no stderr)"
                out(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {last}" + ("" if c.ok else "  <- " + "; ".join(c.problems)))
        out(f"{sum(c.ok for c in cases)}/{len(cases)} bad inputs rejected cleanly ({time.time() - t0:.1f}s)")
        return cases
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
