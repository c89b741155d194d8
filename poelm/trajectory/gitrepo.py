"""Git plumbing for trajectory repositories: branches written without a work tree.

A local trajectory repository is a bare git repository (``git init --bare``; an existing
repository of either kind is accepted). A branch is written by hashing the exported files into
the object store (``git hash-object -w``), building its tree (``git mktree``) and commit
(``git commit-tree``), and only then moving the refs, all of them in ONE ``git update-ref
--stdin`` transaction with the expected old values. Until that transaction commits, the new
objects are unreferenced (``git gc`` drops them), so a kill at any moment leaves the branches as
they were: never a half-written branch, never ``main`` moved without its branch. The expected
old values also make a concurrent writer fail instead of being overwritten.

git itself is run through ``subprocess`` (the files here are plain git objects that any git
client, ``git clone`` included, reads).

Objects are stored without zlib (``core.compression=0``, which also sets loose and pack
compression): weights are near-incompressible floats, and deflating them is where git spent its
time. Measured on a 512 MiB file of bf16 N(0, 0.02) values (2-core machine under load):
``git hash-object -w`` took 39 s with git's default loose compression (level 1), 126 s when
the file goes to a pack at the default level (files over ``core.bigFileThreshold``, 512 MiB: any
3B branch), and 6-12 s at level 0; the deflated object was 21% smaller (404 vs 513 MB). The
flag is passed on every object write (repositories created elsewhere keep their own config) and
written into the config of repositories created here, so ``git gc`` does not deflate them later.
The objects stay plain git objects: any git reads them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from poelm.core.errors import PublishError

ZERO = "0" * 40
STORE = ("-c", "core.compression=0")  # object writes: no zlib (see the module docstring)
_ENV = {
    # Commits need an identity; a machine without git config must still publish.
    "GIT_AUTHOR_NAME": "poelm",
    "GIT_AUTHOR_EMAIL": "poelm@localhost",
    "GIT_COMMITTER_NAME": "poelm",
    "GIT_COMMITTER_EMAIL": "poelm@localhost",
    "GIT_TERMINAL_PROMPT": "0",
}


class GitRepo:
    """A local git repository holding one folder per branch (flat, plus ``train_state/`` when published with it)."""

    def __init__(self, path, create: bool = False):
        self.path = Path(path)
        if create and (not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))):
            self.path.mkdir(parents=True, exist_ok=True)
            self._run(["git", "init", "--bare", "-q", "--initial-branch=main", str(self.path)], what="git init")
            self._run(["git", f"--git-dir={self.path}", "config", "core.compression", "0"], what="git config")
        if not self.path.is_dir():
            raise PublishError(f"trajectory repository not found: {self.path} (publish a checkpoint to create it)")
        proc = subprocess.run(["git", "-C", str(self.path), "rev-parse", "--absolute-git-dir"], capture_output=True, env=self._env())
        if proc.returncode != 0:
            raise PublishError(f"{self.path} is not a git repository; give a new or empty folder, or an existing trajectory repository")
        self.git_dir = proc.stdout.decode().strip()

    # ------------------------------------------------------------------ running git
    @staticmethod
    def _env() -> dict:
        return {**os.environ, **_ENV}

    def _run(self, args, input: bytes | None = None, what: str = "git") -> bytes:
        proc = subprocess.run(args, input=input, capture_output=True, env=self._env())
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise PublishError(f"{what} failed in {self.path}: {msg[-1] if msg else f'exit {proc.returncode}'}")
        return proc.stdout

    def git(self, *args, input: bytes | None = None, what: str | None = None) -> bytes:
        return self._run(["git", f"--git-dir={self.git_dir}", *args], input=input, what=what or f"git {args[0]}")

    # ------------------------------------------------------------------ reading
    def refs(self) -> dict[str, str]:
        """Branch name -> commit id."""
        out = self.git("for-each-ref", "--format=%(refname:strip=2) %(objectname)", "refs/heads/").decode()
        return dict(line.split(" ", 1) for line in out.splitlines() if line)

    def tree(self, rev: str) -> dict[str, str]:
        """File path -> blob id of ``rev`` (recursive: ``train_state/...`` for a branch published
        with its training state, ``trainstate.py``)."""
        out = self.git("ls-tree", "-r", "-z", rev, what=f"reading {rev}").decode()
        entries = {}
        for item in out.split("\0"):
            if item:
                meta, name = item.split("\t", 1)
                mode, kind, sha = meta.split()
                if kind == "blob":
                    entries[name] = sha
        return entries

    def read(self, rev: str, name: str) -> bytes | None:
        sha = self.tree(rev).get(name)
        return None if sha is None else self.git("cat-file", "blob", sha)

    @contextlib.contextmanager
    def stream(self, rev: str, name: str):
        """A binary stream of one file (large weights are never held in memory)."""
        sha = self.tree(rev).get(name)
        if sha is None:
            raise PublishError(f"{rev} has no {name}")
        proc = subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "blob", sha], stdout=subprocess.PIPE, env=self._env())
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()

    def materialise(self, rev: str, out: Path, skip: str | None = None) -> None:
        """Write every file of ``rev`` into the existing directory ``out`` (those under the folder
        ``skip`` left out)."""
        for name, sha in self.tree(rev).items():
            if skip and name.startswith(skip + "/"):
                continue
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with open(out / name, "wb") as f:
                proc = subprocess.run(["git", f"--git-dir={self.git_dir}", "cat-file", "blob", sha], stdout=f, env=self._env())
            if proc.returncode != 0:
                raise PublishError(f"cannot read {name} of {rev} in {self.path}: the repository is damaged (git fsck)")

    # ------------------------------------------------------------------ writing objects
    def hash_files(self, paths: list[Path]) -> list[str]:
        if not paths:
            return []
        data = "".join(f"{p}\n" for p in paths).encode()
        out = self.git(*STORE, "hash-object", "-w", "--no-filters", "--stdin-paths", input=data, what="git hash-object").decode().split()
        if len(out) != len(paths):
            raise PublishError(f"git hash-object returned {len(out)} ids for {len(paths)} files in {self.path}")
        return out

    def hash_bytes(self, data: bytes) -> str:
        return self.git(*STORE, "hash-object", "-w", "--no-filters", "--stdin", input=data, what="git hash-object").decode().strip()

    def mktree(self, entries: dict[str, str]) -> str:
        """The tree of ``{path: blob id}``; a path with ``/`` goes into a subtree (one level per
        folder, built first)."""
        blobs, folders = {}, {}
        for name, sha in entries.items():
            head, sep, rest = name.partition("/")
            if sep:
                folders.setdefault(head, {})[rest] = sha
            else:
                blobs[name] = sha
        lines = [f"100644 blob {sha}\t{name}" for name, sha in blobs.items()]
        lines += [f"040000 tree {self.mktree(sub)}\t{name}" for name, sub in folders.items()]
        # (git mktree puts the entries in git's tree order itself)
        return self.git("mktree", "-z", input="".join(line + "\0" for line in lines).encode()).decode().strip()

    def commit(self, tree: str, parents: list[str], message: str) -> str:
        args = ["commit-tree", tree]
        for p in parents:
            args += ["-p", p]
        return self.git(*args, input=message.encode()).decode().strip()

    def update_refs(self, updates: list[tuple[str, str, str | None]]) -> None:
        """Move branches atomically: ``(branch, new, old)`` with ``old`` None for "must not exist".

        One ``update-ref --stdin`` transaction: every ref moves or none does (git locks all refs,
        checks every old value, then commits)."""
        lines = ["start"]
        for branch, new, old in updates:
            lines.append(f"update refs/heads/{branch} {new} {old or ZERO}")
        lines += ["prepare", "commit"]
        self.git("update-ref", "--stdin", input=("\n".join(lines) + "\n").encode(), what="updating branches")

    # ------------------------------------------------------------------ branches
    def write_branch(self, folder: Path, branch: str, parent: str | None, old: str | None, move_main: bool,
                     main_old: str | None, message: str) -> str:
        """Commit ``folder`` (its files, and those of its sub-folders) as ``branch`` (child of
        ``parent``); move ``main`` with it when ``move_main``. ``old``/``main_old``: the values
        the refs must still hold."""
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        tree = self.mktree(dict(zip(names, self.hash_files([folder / n for n in names]))))
        commit = self.commit(tree, [parent] if parent else [], message)
        updates = [(branch, commit, old)]
        if move_main:
            updates.append(("main", commit, main_old))
        self.update_refs(updates)
        return commit

    def write_files(self, branch: str, files: dict[str, bytes], old: str, main_follows: bool, message: str) -> str:
        """A new commit on ``branch`` with ``files`` replaced or added; ``main`` follows when it
        pointed at the same commit."""
        entries = self.tree(old)
        for name, data in files.items():
            entries[name] = self.hash_bytes(data)
        commit = self.commit(self.mktree(entries), [old], message)
        updates = [(branch, commit, old)]
        if main_follows:
            updates.append(("main", commit, old))
        self.update_refs(updates)
        return commit

