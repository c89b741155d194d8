"""What a TARGET string means, for every verb that takes one (the one home of that grammar).

``generate``, ``measure``, ``export``, ``checkout``, ``branches``, ``report``, ``eval``,
``train --resume`` and ``continue --from`` all resolve their TARGET here, before any compute. A
branch published with ``--with-optimizer`` is also a full training checkpoint (``want =
"checkpoint"``): its ``train_state/`` is checked out and rebuilt into a local checkpoint
(``trajectory/trainstate.py``), so ``train --resume REPO@step-XXXXX`` continues it exactly.

===============================  =======================================================
TARGET                           means
===============================  =======================================================
``DIR`` (a checkpoint)           ``DIR/model.safetensors`` + ``meta.json``: that save
``DIR`` (a run dir)              its newest ``step-XXXXX`` checkpoint
``DIR`` (an exported folder)     ``DIR/model.safetensors`` + a poelm ``config.json``
``REPO``                         a trajectory repository (local git repo): its ``main``
``REPO@main``                    the step branch ``main`` points to (results written there)
``REPO@step-XXXXX``              that step branch
``REPO@cooldown-XXXXX-N``        a cooldown probe: N steps of LR decay from step XXXXX
``REPO@avg-XXXXX-N``             a weight average of N saves ending at step XXXXX
``hf://org/name[@rev]``          the same on the Hugging Face Hub (``rev`` default ``main``)
===============================  =======================================================

``main`` is never an answer of its own: it is resolved to the ``step-XXXXX`` branch holding the
same step (``main`` is a copy of the newest step branch), so a measurement of ``REPO@main`` lands
on that step branch, which is what a reader of the trajectory looks at.

A TARGET that does not resolve is one :class:`TargetError` line naming what was tried and what
exists (the nearest branches, or the folder's contents), raised before anything is computed or
written. Revisions are checked against ``step-\\d{5,}`` / ``main`` / ``cooldown-\\d{5,}-N``
first, so shell metacharacters or ``..`` never reach git.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from poelm.core.errors import CheckpointError, PoelmError
from poelm.train import checkpoint
from poelm.trajectory import publish, trainstate

HUB = publish.HUB_PREFIX
REVISION = re.compile(r"main|step-\d{5,}|cooldown-\d{5,}-[1-9]\d*|avg-\d{5,}-[1-9]\d*")


class TargetError(PoelmError):
    """A TARGET that names nothing usable (exit code 2)."""


@dataclass(frozen=True)
class Target:
    """A resolved TARGET. ``path`` is a local folder holding a checkpoint or an export (None for a
    repository that was not materialised); ``repo``/``branch`` are set for trajectory targets
    (``branch`` is a ``step-XXXXX`` name, ``main`` resolved, or a ``cooldown-XXXXX-N`` probe)."""

    text: str
    kind: str  # "checkpoint" | "export" | "branch" | "repo"
    path: Path | None = None
    repo: str | None = None
    branch: str | None = None

    @property
    def label(self) -> str:
        """How reports and logs name it: ``REPO@step-XXXXX`` for a branch, else the folder."""
        if self.repo and self.branch:
            return f"{self.repo}@{self.branch}"
        return str(self.path if self.path is not None else self.repo)


# ----------------------------------------------------------------------------- syntax
def split(text: str) -> tuple[str, str | None]:
    """``TARGET`` -> ``(location, revision or None)`` by syntax alone (no IO). An ``@`` splits
    only when the whole string is not an existing local path (a folder may contain ``@``)."""
    text = str(text)
    if not text:
        raise TargetError("empty TARGET: give a checkpoint dir, a run dir, an exported folder, REPO, REPO@step-XXXXX, REPO@main or hf://org/name[@rev]")
    if "@" not in text or (not text.startswith(HUB) and Path(text).exists()):
        return text, None
    where, rev = text.rsplit("@", 1)
    if not where:
        raise TargetError(f"{text!r}: nothing before '@'; give REPO@{rev}")
    if not REVISION.fullmatch(rev):
        raise TargetError(f"invalid revision {rev!r} in {text!r}: expected main, step-XXXXX (5+ digits), cooldown-XXXXX-N or avg-XXXXX-N")
    return where, rev


def _is_repo(path: Path) -> bool:
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "refs").is_dir())


def _nearest(branches: list[str], rev: str, n: int = 3) -> str:
    for of, kind in ((publish.cooldown_of, "cooldown"), (publish.average_of, "average")):
        if of(rev):
            probes = sorted((b for b in branches if of(b)), key=of)
            return f"it has {kind} branches {', '.join(probes)}" if probes else f"it has no {kind} branches"
    steps = [b for b in branches if publish.STEP_BRANCH.fullmatch(b)]
    if not steps:
        return "it has no step branches"
    if publish.STEP_BRANCH.fullmatch(rev):
        want = publish.branch_step(rev)
        steps = sorted(steps, key=lambda b: (abs(publish.branch_step(b) - want), publish.branch_step(b)))[:n]
        steps.sort(key=publish.branch_step)
        return "nearest: " + ", ".join(steps)
    return f"it has {len(steps)} step branches ({steps[0]} .. {steps[-1]})"


def _open(where: str, text: str, api=None):
    if not where.startswith(HUB):
        p = Path(where)
        if not p.exists():
            raise TargetError(f"{text}: no such folder or repository {where!r} (give a checkpoint dir, a run dir, an exported folder or a trajectory repo)")
        if not _is_repo(p):
            raise TargetError(f"{text}: {where} is not a trajectory repository (no git repo there); drop '@...' to use it as a folder")
    return publish.open_repo(where, api=api)


def resolve_branch(where: str, rev: str, text: str | None = None, api=None) -> str:
    """The ``step-XXXXX`` branch ``where@rev`` names (``main`` -> the step branch main holds)."""
    text = text or f"{where}@{rev}"
    backend = _open(where, text, api)
    refs = backend.refs()
    if rev == "main":
        if "main" not in refs:
            raise TargetError(f"{text}: {where} has no main branch ({_nearest(list(refs), rev)})")
        man = publish.read_json(backend, "main", publish.MANIFEST) or {}
        if "step" not in man:
            raise TargetError(f"{text}: main of {where} has no poelm manifest; run `poelm verify {where}`")
        rev = publish.branch_name(int(man["step"]))
        if rev not in refs:
            raise TargetError(f"{text}: main holds step {man['step']} but {where} has no branch {rev}; run `poelm verify {where}`")
        return rev
    if rev not in refs:
        raise TargetError(f"{text}: {where} has no branch {rev} ({_nearest(list(refs), rev)}; see `poelm branches {where}`)")
    return rev


# ----------------------------------------------------------------------------- resolving
def repository(text: str, api=None) -> tuple[str, str | None]:
    """For verbs that read a whole trajectory (``branches``, ``report``, ``verify``, ``eval`` of
    every branch): ``(repo, step branch or None)``. ``REPO`` -> (REPO, None); ``REPO@rev`` ->
    (REPO, its step branch)."""
    where, rev = split(text)
    backend = _open(where, text, api)
    del backend
    return where, (resolve_branch(where, rev, text, api) if rev else None)


def resolve(text: str, workdir=None, *, want: str = "model", api=None, hint: str | None = None) -> Target:
    """Resolve ``text`` to a :class:`Target`; materialise a branch under ``workdir`` (a fresh
    temporary folder if None; the caller owns it).

    ``want``: ``"model"`` (anything loadable: checkpoint, export, branch), ``"checkpoint"`` (a
    full training checkpoint with optimizer state and loader position: ``train --resume``), or
    ``"repo"`` (a trajectory repository, not materialised). ``hint``: what to do instead, in the
    error for a ``want="checkpoint"`` TARGET that holds weights only (default: the resume advice)."""
    where, rev = split(text)
    local = None if where.startswith(HUB) else Path(where)
    if rev is None and local is not None and local.is_dir() and not _is_repo(local):
        return _folder(text, local, want, hint)
    if rev is None and local is not None and not local.exists():
        raise TargetError(f"{text}: not found (give a checkpoint dir, a run dir, an exported folder, REPO, REPO@step-XXXXX or REPO@main)")
    if rev is None and local is not None and local.is_file():
        raise TargetError(f"{text}: is a file; give the folder that holds the checkpoint")
    branch = resolve_branch(where, rev or "main", text, api)
    if want == "repo":
        return Target(text, "repo", None, where, branch)
    work = Path(workdir or tempfile.mkdtemp(prefix="poelm-target-"))
    if want == "checkpoint":
        return _branch_checkpoint(text, where, branch, work, api, hint)
    out = work / branch
    if out.is_dir() and checkpoint.is_hf_export(out):
        return Target(text, "branch", out, where, branch)
    return Target(text, "branch", publish.checkout(where, branch, out, api=api), where, branch)


def _branch_checkpoint(text: str, where: str, branch: str, work: Path, api, hint: str | None) -> Target:
    """A branch published with its training state (``--with-optimizer``) as a local training
    checkpoint under ``work`` (``trainstate.rebuild``); one line for a branch without it."""
    backend = publish.open_repo(where, api=api)
    man = publish.read_json(backend, branch, publish.MANIFEST) or {}
    if not isinstance(man.get("train_state"), dict):
        raise TargetError(f"{text}: the branch carries no optimizer state or loader position (published without --with-optimizer); "
                          + (hint or f"start a new phase from its weights with `poelm continue --from {text} --fresh-optimizer`, "
                                     "or resume from the run's checkpoint dir"))
    folder = publish.checkout(where, branch, work / branch, api=api, with_state=True)
    try:
        ckpt = trainstate.rebuild(folder, work / "checkpoint" / branch, f"{where}@{branch}")
    except PoelmError as e:
        raise TargetError(f"{text}: its training state cannot be read: {e}") from None
    return Target(text, "checkpoint", ckpt, where, branch)


def _folder(text: str, p: Path, want: str, hint: str | None = None) -> Target:
    if want == "repo":
        raise TargetError(f"{text}: not a trajectory repository (no git repo there)")
    try:
        d = checkpoint.save_dir(p)  # the save-folder rule's one home: the folder itself, or a run dir's newest save
    except CheckpointError as e:
        have = sorted(x.name for x in p.iterdir())[:6]
        raise TargetError(f"{e}; it has {have or 'nothing'}") from None
    if checkpoint.is_hf_export(d):
        if want == "checkpoint":
            raise TargetError(f"{text}: an exported folder holds weights only (no optimizer state or loader position); "
                              + (hint or "resume from the run's checkpoint dir, or start a new phase with `poelm continue --from`"))
        return Target(text, "export", d)
    return Target(text, "checkpoint", d)
