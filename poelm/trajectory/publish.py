"""Trajectory publishing: every save becomes branch ``step-XXXXX`` of a repository; ``main``
tracks the newest step (SPEC "Trajectory").

A repository is a local path (a bare git repository, created on first publish; ``gitrepo.py``)
or ``hf://org/name`` on the Hugging Face Hub (``hubrepo.py``). Each branch holds one exported
Hugging Face folder (``export.py``) whose ``poelm_manifest.json`` records step, tokens, lrm, phase
and the sha256 of every file, so a trajectory can be audited (``poelm/trajectory/verify.py``).

Rules (the ones public trajectories have broken):
- all-or-nothing: a failed or killed publish leaves no branch behind and ``main`` untouched;
- ``main`` only moves forward: to a step >= the step it holds;
- an existing step branch is never replaced unless ``force``;
- branch names are ``step-\\d{5,}`` (or ``main`` when reading); anything else (``..``, ``/``,
  spaces, shell metacharacters) is refused before any git or Hub call;
- a cooldown probe (``poelm cooldown``, ``poelm.train.cooldown``) is published as
  ``cooldown-XXXXX-N`` (XXXXX = the step it starts from, N = its steps), forked from its source
  step branch, with a ``cooldown`` block in its manifest; it never becomes a step branch, never
  moves ``main``, and is not part of the step trajectory (``verify`` checks it on its own).

``Publisher`` runs publishes on a background thread so training never waits for them; a failed
publish is logged and reported by ``close()``, and never touches the local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import struct
import tempfile
import threading
from pathlib import Path

from poelm.trajectory import export as export_mod
from poelm.trajectory import trainstate
from poelm.core.errors import PublishError
from poelm.fsio import atomic_dir, atomic_write_json, sha256_file
from poelm.trajectory.gitrepo import GitRepo
from poelm.trajectory.hubrepo import STAGING, HubRepo

log = logging.getLogger("poelm.trajectory.publish")

# fullmatch throughout: "$" would accept a trailing newline.
STEP_BRANCH = re.compile(r"step-(\d{5,})")
COOLDOWN_BRANCH = re.compile(r"cooldown-(\d{5,})-([1-9]\d*)")
AVERAGE_BRANCH = re.compile(r"avg-(\d{5,})-([1-9]\d*)")  # poelm average: the mean of N saves ending at step XXXXX
MANIFEST = export_mod.MANIFEST
MEASURE = "poelm_measure.json"
HUB_PREFIX = "hf://"
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------- names
def branch_name(step: int) -> str:
    """``step-XXXXX``: zero-padded to 5 digits, more when needed."""
    if int(step) < 0:
        raise PublishError(f"step must be >= 0, got {step}")
    return f"step-{int(step):05d}"


def check_branch(name: str, allow_main: bool = True, allow_cooldown: bool = True) -> str:
    """Accept ``step-\\d{5,}`` (and ``main`` when reading, ``cooldown-XXXXX-N`` unless told
    otherwise); refuse everything else in one line."""
    if isinstance(name, str) and (STEP_BRANCH.fullmatch(name) or (allow_main and name == "main")
                                  or (allow_cooldown and (COOLDOWN_BRANCH.fullmatch(name) or AVERAGE_BRANCH.fullmatch(name)))):
        return name
    allowed = "step-XXXXX (5+ digits) or main" if allow_main else "step-XXXXX (5+ digits)"
    if allow_cooldown:
        allowed += " or cooldown-XXXXX-N or avg-XXXXX-N"
    raise PublishError(f"invalid branch {name!r}: expected {allowed}")


def cooldown_branch_name(step: int, steps: int) -> str:
    """``cooldown-XXXXX-N``: a cooldown probe of N steps from step XXXXX (5+ digits)."""
    if int(step) < 0 or int(steps) < 1:
        raise PublishError(f"a cooldown branch needs step >= 0 and steps >= 1, got {step}, {steps}")
    return f"cooldown-{int(step):05d}-{int(steps)}"


def cooldown_of(name: str) -> tuple[int, int] | None:
    """``(source step, steps)`` of a ``cooldown-XXXXX-N`` name; None for any other name."""
    m = COOLDOWN_BRANCH.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def average_of(name: str) -> tuple[int, int] | None:
    """``(newest averaged step, number of saves)`` of an ``avg-XXXXX-N`` name; None for any other name
    (``poelm.trajectory.average`` writes these branches)."""
    m = AVERAGE_BRANCH.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def branch_step(name: str) -> int:
    return int(STEP_BRANCH.fullmatch(name).group(1))


def open_repo(repo, create: bool = False, api=None):
    """A ``GitRepo`` for a local path, a ``HubRepo`` for ``hf://org/name``."""
    repo = str(repo)
    if repo.startswith(HUB_PREFIX):
        repo_id = repo[len(HUB_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id) or ".." in repo_id:
            raise PublishError(f"invalid Hub repository {repo!r}: expected hf://org/name")
        return HubRepo(repo_id, api=api, create=create)
    if not repo:
        raise PublishError("no repository given: pass a local path or hf://org/name")
    return GitRepo(repo, create=create)


# ----------------------------------------------------------------------------- reading branches
def read_json(backend, rev: str, name: str) -> dict | None:
    data = backend.read(rev, name)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def step_branches(refs: dict) -> list[str]:
    return sorted((b for b in refs if STEP_BRANCH.fullmatch(b)), key=branch_step)


def cooldown_branches(refs: dict) -> list[str]:
    return sorted((b for b in refs if COOLDOWN_BRANCH.fullmatch(b)), key=cooldown_of)


def average_branches(refs: dict) -> list[str]:
    return sorted((b for b in refs if AVERAGE_BRANCH.fullmatch(b)), key=average_of)


def list_branches(repo, api=None, cooldowns: bool = False) -> list[dict]:
    """The trajectory: one dict per step branch, by step: ``branch, step, tokens, lrm, phase,
    rel_step, bpb`` (full-K BPB from ``poelm_measure.json`` when measured, else None), ``main``
    (whether main holds this step) and ``commit``. ``cooldowns``: the cooldown probes follow, one
    dict each with ``kind = "cooldown"``, ``source_step`` and ``steps`` (``step`` is where the
    probe ends); they are never part of the step trajectory."""
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    if cooldowns:
        return (list_branches(repo, api=api) + [_cooldown_row(backend, refs, b) for b in cooldown_branches(refs)]
                + [_cooldown_row(backend, refs, b, average_of(b), "average") for b in average_branches(refs)])
    main = read_json(backend, "main", MANIFEST) if "main" in refs else None
    rows = []
    for b in step_branches(refs):
        man = read_json(backend, b, MANIFEST) or {}
        rec = read_json(backend, b, MEASURE)
        bpb = None
        if rec:
            bpb = ((rec.get("bpb") or {}).get("full") or {}).get("value")
        rows.append({
            "branch": b, "step": branch_step(b), "tokens": man.get("tokens"), "lrm": man.get("lrm"),
            "phase": man.get("phase"), "rel_step": man.get("rel_step"), "bpb": bpb,
            "main": bool(main) and main.get("step") == branch_step(b), "commit": refs[b],
            "tokens_by_source": (man.get("provenance") or {}).get("tokens_by_source"),
            "with_state": isinstance(man.get("train_state"), dict),
        })
    return rows


def _cooldown_row(backend, refs, b: str, of=None, kind: str = "cooldown") -> dict:
    man = read_json(backend, b, MANIFEST) or {}
    rec = read_json(backend, b, MEASURE) or {}
    src, n = of or cooldown_of(b)
    return {"branch": b, "kind": kind, "source_step": src, "steps": n, "step": man.get("step"), "tokens": man.get("tokens"),
            "lrm": man.get("lrm"), "phase": man.get("phase"), "rel_step": man.get("rel_step"),
            "bpb": ((rec.get("bpb") or {}).get("full") or {}).get("value"), "main": False, "commit": refs[b]}


def read_cooldown_records(repo, api=None) -> list[dict]:
    """Every cooldown branch's ``poelm_measure.json`` (by source step, then N); unmeasured ones
    are skipped. Kept apart from ``read_records``: a probe is not a save of the trajectory."""
    backend = open_repo(repo, api=api)
    return _branch_records(backend, cooldown_branches(backend.refs()))


def _branch_records(backend, branches) -> list[dict]:
    """The measurement records of ``branches`` (unmeasured ones skipped), each naming its branch."""
    out = []
    for b in branches:
        rec = read_json(backend, b, MEASURE)
        if rec is not None:
            rec.setdefault("branch", b)
            out.append(rec)
    return out


def read_records(repo, api=None) -> list[dict]:
    """Every step branch's ``poelm_measure.json``, sorted by step; unmeasured branches are skipped.
    Measured cooldown probes are not records of the trajectory: each rides on the record of the
    step it starts from, in ``cooldown_probes`` (on the first record, in
    ``cooldown_probes_unmatched``, when that step is not measured; ``poelm.report.cooldown``); a
    measured weight average (``avg-XXXXX-N``) rides the same way on ``averages`` of step XXXXX
    (``averages_unmatched``; ``poelm.report.averages``)."""
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    out = sorted(_branch_records(backend, step_branches(refs)), key=lambda r: int(r.get("step", branch_step(r["branch"]))))
    by_step = {int(r["step"]): r for r in out if isinstance(r.get("step"), int)}
    for probe in _branch_records(backend, cooldown_branches(refs)) if out else []:
        host = by_step.get(cooldown_of(probe["branch"])[0])
        (host or out[0]).setdefault("cooldown_probes" if host else "cooldown_probes_unmatched", []).append(probe)
    for r in out:  # the data each save saw, for the report's Branches table (train/provenance.py)
        prov = (read_json(backend, r["branch"], MANIFEST) or {}).get("provenance") or {}
        if prov.get("tokens_by_source") is not None:
            r.setdefault("tokens_by_source", prov["tokens_by_source"])
    for avg in _branch_records(backend, average_branches(refs)) if out else []:  # the same for weight averages
        host = by_step.get(average_of(avg["branch"])[0])
        (host or out[0]).setdefault("averages" if host else "averages_unmatched", []).append(avg)
    return out


def checkout(repo, branch: str, out_dir, api=None, with_state: bool = False) -> Path:
    """Materialise ``branch`` as a plain folder (transformers loads it) and check it against the
    branch manifest; the folder appears complete or not at all. ``with_state``: also its
    ``train_state/`` folder (optimizer state, loader position, RNG; ``trainstate.py``), which is
    left out otherwise (the model loads without it)."""
    check_branch(branch)
    backend = open_repo(repo, api=api)
    if branch not in backend.refs():
        raise PublishError(f"{repo} has no branch {branch} (see `poelm branches {repo}`)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"{out} exists and is not empty; check out into a new folder")
    with atomic_dir(out, overwrite=True) as tmp:
        backend.materialise(branch, tmp, skip=None if with_state else trainstate.STATE_DIR)
        problems = _check_folder(tmp, branch, with_state)
        if problems:
            raise PublishError(problems[0])
    return out


def _check_folder(folder: Path, branch: str, with_state: bool = True) -> list[str]:
    man_path = folder / MANIFEST
    if not man_path.is_file():
        return [f"{branch}: no {MANIFEST}"]
    man = json.loads(man_path.read_text())
    problems = []
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    listed = {n for n in man.get("files", {}) if with_state or not n.startswith(trainstate.STATE_DIR + "/")}
    for name in sorted(files ^ listed):
        problems.append(f"{branch}: {name} is {'not in the manifest' if name in files else 'missing'}")
    for name in sorted(files & listed):
        if sha256_file(folder / name) != man["files"][name]["sha256"]:
            problems.append(f"{branch}: {name} does not match its manifest sha256")
    return problems


# ----------------------------------------------------------------------------- writing branches
def main_step_of(backend, refs) -> int | None:
    if "main" not in refs:
        return None
    man = read_json(backend, "main", MANIFEST)
    return None if man is None or man.get("step") is None else int(man["step"])


def publish(ckpt_dir, repo, force: bool = False, readme: str | None = None, api=None, dtype: str | None = None,
            with_optimizer: bool | None = None, shard_bytes: int = trainstate.SHARD_BYTES) -> str:
    """Export ``ckpt_dir`` and publish it as branch ``step-XXXXX`` of ``repo``; return the branch.

    ``main`` moves to it when its step is >= the step main holds. Refused (``PublishError``) when
    the branch exists, unless ``force``. The checkpoint itself is only read. A write error (disk
    full ...) is one ``PublishError`` line; the refs are untouched then (they move last).
    ``dtype``: the branch's weights, bf16 | fp16 | fp32 (default: ``export.default_dtype``).
    ``with_optimizer``: the branch also carries the training state (``trainstate.py``); None: the
    repository's setting, i.e. what its ``main`` was published with (off for a new repository),
    so the choice, once made, holds for every later save of the trajectory."""
    export_mod.check_dtype(dtype)
    try:
        return _publish(ckpt_dir, repo, force, readme, api, dtype, with_optimizer, shard_bytes)
    except OSError as e:
        raise PublishError(f"cannot publish {ckpt_dir} to {repo}: {e.strerror or e}; the repository is unchanged and the checkpoint is kept") from None


def repo_with_state(backend, refs) -> bool:
    """The repository-level setting: whether its ``main`` carries the training state."""
    return "main" in refs and isinstance((read_json(backend, "main", MANIFEST) or {}).get("train_state"), dict)


def _publish(ckpt_dir, repo, force, readme, api, dtype=None, with_optimizer=None, shard_bytes=trainstate.SHARD_BYTES) -> str:
    cool = _cooldown_source(ckpt_dir)
    if cool is not None:  # a cooldown probe: its own kind of branch, never a step branch, never main
        return _publish_cooldown(ckpt_dir, repo, force, readme, api, dtype, *cool)
    if with_optimizer:
        trainstate.check_source(ckpt_dir)  # before the repository is created
    backend = open_repo(repo, create=True, api=api)
    with tempfile.TemporaryDirectory(prefix="poelm-publish-") as tmp:
        folder = Path(tmp) / "export"
        export_mod.export(ckpt_dir, folder, readme=readme, dtype=dtype)
        cfg = json.loads((folder / "config.json").read_text())
        branch = check_branch(branch_name(cfg["step"]), allow_main=False)
        refs = backend.refs()
        if with_optimizer if with_optimizer is not None else repo_with_state(backend, refs):
            exact = trainstate.weights_exact(ckpt_dir, folder / "model.safetensors")
            trainstate.add_to_manifest(folder, MANIFEST, trainstate.write_state(ckpt_dir, folder, exact, shard_bytes))
        old = refs.get(branch)
        if old is not None and not force:
            raise PublishError(f"{branch} already exists in {repo}; pass --force to replace it")
        main_step = main_step_of(backend, refs)
        move_main = main_step is None or branch_step(branch) >= main_step
        earlier = [b for b in step_branches(refs) if branch_step(b) < branch_step(branch)]
        parent = old or (refs[earlier[-1]] if earlier else None)
        message = f"{branch}: step {cfg['step']}, tokens {cfg.get('tokens')}, lrm {cfg.get('lrm')}, phase {cfg.get('phase_name')}"
        backend.write_branch(folder, branch, parent, old, move_main, refs.get("main"), message)
    log.info("published %s to %s%s", branch, repo, " (main)" if move_main else "")
    return branch


# ----------------------------------------------------------------------------- cooldown branches
def _cooldown_source(ckpt_dir) -> tuple[dict, dict] | None:
    """``(cooldown phase dict, provenance)`` when ``ckpt_dir`` holds a cooldown probe (its phase
    has ``kind = "cooldown"``: a checkpoint's meta.json, a checked-out branch's config.json)."""
    from poelm.train import checkpoint

    d = Path(ckpt_dir)
    if d.is_dir() and not (d / "model.safetensors").is_file():
        d = checkpoint.latest(d) or d
    if (d / "meta.json").is_file():  # a training checkpoint
        meta = checkpoint.read_json(d / "meta.json", "checkpoint meta")
        phase, prov = meta.get("phase"), meta.get("cooldown")
    elif (d / MANIFEST).is_file() and (d / "config.json").is_file():  # an exported folder
        phase = checkpoint.read_json(d / "config.json", "export config").get("phase")
        prov = checkpoint.read_json(d / MANIFEST, "export manifest").get("cooldown")
    else:
        return None
    if isinstance(phase, dict) and phase.get("kind") == "cooldown":
        return phase, prov if isinstance(prov, dict) else {}
    return None


def check_cooldown_source(repo, source_step: int, api=None) -> str:
    """The step branch a cooldown probe of ``source_step`` forks from; one ``PublishError`` line
    when ``repo`` does not hold it (a probe sits next to a published save)."""
    source = branch_name(source_step)
    try:
        refs = open_repo(repo, api=api).refs()
    except PublishError as e:
        raise PublishError(f"cannot publish a cooldown of step {source_step} to {repo}: {e}") from None
    if source not in refs:
        raise PublishError(f"{repo} has no branch {source}: a cooldown branch forks from its source step; "
                           f"publish step {source_step} first (`poelm publish`) or omit --publish")
    return source


def _publish_cooldown(ckpt_dir, repo, force, readme, api, dtype, phase: dict, prov: dict) -> str:
    branch = cooldown_branch_name(phase["start_step"], phase["steps"])
    source = check_cooldown_source(repo, int(phase["start_step"]), api=api)
    backend = open_repo(repo, api=api)
    with tempfile.TemporaryDirectory(prefix="poelm-publish-") as tmp:
        folder = Path(tmp) / "export"
        export_mod.export(ckpt_dir, folder, readme=readme, dtype=dtype)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("step") != int(phase["start_step"]) + int(phase["steps"]):
            raise PublishError(f"{ckpt_dir}: a cooldown of {phase['steps']} steps from step {phase['start_step']} "
                               f"must end at step {int(phase['start_step']) + int(phase['steps'])}, not {cfg.get('step')}")
        refs = backend.refs()
        old = refs.get(branch)
        if old is not None and not force:
            raise PublishError(f"{branch} already exists in {repo}; pass --force to replace it")
        man = json.loads((folder / MANIFEST).read_text())
        man["kind"] = "cooldown"
        man["cooldown"] = {**prov, "source_branch": source, "source_step": int(phase["start_step"]), "steps": int(phase["steps"]),
                           "from_lrm": phase.get("from_lrm"), "to_lrm": phase.get("to_lrm"), "shape": phase.get("shape"),
                           "tokens": cfg.get("tokens")}
        atomic_write_json(folder / MANIFEST, man)
        message = (f"{branch}: cooldown of {phase['steps']} steps from {source}, lrm {phase.get('from_lrm')} -> "
                   f"{phase.get('to_lrm')} ({phase.get('shape')}), tokens {cfg.get('tokens')}")
        backend.write_branch(folder, branch, old or refs[source], old, False, refs.get("main"), message)
    log.info("published %s to %s", branch, repo)
    return branch


def update_branch_files(repo, branch: str, files: dict[str, bytes], api=None) -> None:
    """A new commit on ``branch`` replacing (or adding) ``files`` and refreshing its manifest;
    ``main`` follows when it holds that branch. Used by measure (bounds in config.json,
    ``poelm_measure.json``). Manifest entries of unchanged files are carried over (their blobs are
    unchanged); those of the given files are recomputed."""
    check_branch(branch, allow_main=False)
    for name in files:
        if not FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise PublishError(f"invalid file name {name!r} for a branch (a flat name, not {MANIFEST})")
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    if branch not in refs:
        raise PublishError(f"{repo} has no branch {branch} (see `poelm branches {repo}`)")
    old = refs[branch]
    man = read_json(backend, branch, MANIFEST)
    if man is None:
        raise PublishError(f"{branch} in {repo} has no {MANIFEST}: not a poelm branch")
    cfg = json.loads(files["config.json"]) if "config.json" in files else read_json(backend, branch, "config.json") or {}
    entries = dict(man.get("files", {}))
    for name, data in files.items():
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    new_man = export_mod.manifest_dict({**cfg, "phase_name": cfg.get("phase_name", man.get("phase"))}, dict(sorted(entries.items())))
    # a cooldown / average branch stays one; the training state and provenance stay recorded
    new_man.update({k: man[k] for k in ("kind", "cooldown", "average", "train_state", "provenance") if k in man})
    payload = dict(files)
    payload[MANIFEST] = (json.dumps(new_man, indent=2, sort_keys=True) + "\n").encode()
    if isinstance(backend, GitRepo):
        main_follows = refs.get("main") == old
    else:  # on the Hub main is a copy of the newest branch, not the same commit
        main_follows = STEP_BRANCH.fullmatch(branch) is not None and main_step_of(backend, refs) == branch_step(branch)
    backend.write_files(branch, payload, old, main_follows, f"{branch}: update {', '.join(sorted(files))}")


# ----------------------------------------------------------------------------- background publishing
class Publisher:
    """Publish checkpoints on a background thread, in submission order.

    ``submit(ckpt_dir)`` returns at once; ``close()`` waits for the queue to drain and raises one
    ``PublishError`` naming every failed checkpoint (each failure is also logged when it happens).
    A failure never touches the checkpoint directory and does not stop later publishes. The
    checkpoint must stay on disk until its publish ran (``close`` or ``pending == 0``)."""

    def __init__(self, repo, force: bool = False, api=None, publish_fn=None, dtype: str | None = None,
                 with_optimizer: bool | None = None):
        self.repo, self.force, self.api = repo, force, api
        self._kw = {"dtype": export_mod.check_dtype(dtype)} if dtype else {}  # the branches' weights dtype
        if with_optimizer is not None:  # None: the repository's setting (publish)
            self._kw["with_optimizer"] = with_optimizer
        self._publish = publish_fn or publish
        self._queue: queue.Queue = queue.Queue()
        self.published: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._work, name="poelm-publisher", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, ckpt_dir) -> None:
        if self._closed:
            raise PublishError("publisher is closed")
        self._queue.put(str(ckpt_dir))

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def _work(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                try:
                    self.published.append(self._publish(item, self.repo, force=self.force, api=self.api, **self._kw))
                except Exception as e:  # reported by close(); training goes on
                    line = str(e).splitlines()[0] if str(e) else type(e).__name__
                    log.error("publishing %s to %s failed: %s", item, self.repo, line)
                    self.failures.append((item, line))
            finally:
                self._queue.task_done()

    def close(self, raise_errors: bool = True) -> list[str]:
        """Wait for every submitted publish; return the branches published."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self.failures and raise_errors:
            first = self.failures[0]
            raise PublishError(f"{len(self.failures)} publish(es) to {self.repo} failed, first {first[0]}: {first[1]} (the checkpoints are intact; rerun `poelm publish`)")
        return list(self.published)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(raise_errors=exc_type is None)
