"""Trajectory repositories on the Hugging Face Hub (``hf://org/name``) through ``huggingface_hub``.

The same interface as ``gitrepo.GitRepo`` (refs, tree, read, stream, materialise, write_branch,
write_files) over ``HfApi``; the ``api`` object is injectable, which is how the tests exercise
this path (the Hub is unreachable from the test machine): a fake with the same method names.

The Hub has no multi-ref transaction, so all-or-nothing is built from its atomic operations: a
commit (``upload_folder``/``create_commit``) is atomic, and so is creating a branch at a given
commit. A step branch is therefore written as (1) the folder committed to a staging branch
``poelm-staging-<branch>``, (2) ``create_branch(branch, revision=<that commit>)``, which makes
the step branch appear complete or not at all, (3) ``main`` receives a commit with the same files
(``parent_commit`` = the main commit it was checked against, so a concurrent writer fails), and
(4) the staging branch is deleted. A failure in (1) leaves only a staging branch, which the next
attempt deletes and which poelm never lists. Replacing an existing branch (``--force``) deletes
and recreates it: the one non-atomic window, documented in the README.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from poelm.core.errors import PublishError
from poelm.trajectory.trainstate import STATE_DIR

STAGING = "poelm-staging-"


class HubRepo:
    def __init__(self, repo_id: str, api=None, create: bool = False):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.api = api
        self.repo_id = repo_id
        self.path = f"hf://{repo_id}"
        if create:
            self._call("creating the repository", api.create_repo, repo_id, repo_type="model", exist_ok=True)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PublishError:
            raise
        except Exception as e:  # network and Hub errors: one line for the user
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PublishError(f"{what} on {self.path} failed: {first}") from e

    # ------------------------------------------------------------------ reading
    def refs(self) -> dict[str, str]:
        refs = self._call("listing branches", self.api.list_repo_refs, self.repo_id, repo_type="model")
        return {b.name: b.target_commit for b in refs.branches}

    def tree(self, rev: str) -> dict[str, str | None]:
        files = self._call(f"listing {rev}", self.api.list_repo_files, self.repo_id, revision=rev, repo_type="model")
        # the branch's flat files and its training state folder (trainstate.py); nothing else nested
        return {name: None for name in files if ("/" not in name or name.startswith(STATE_DIR + "/")) and name != ".gitattributes"}

    def _download(self, rev: str, name: str) -> str:
        return self._call(f"downloading {name}@{rev}", self.api.hf_hub_download, self.repo_id, name, revision=rev, repo_type="model")

    def read(self, rev: str, name: str) -> bytes | None:
        if name not in self.tree(rev):
            return None
        return Path(self._download(rev, name)).read_bytes()

    @contextlib.contextmanager
    def stream(self, rev: str, name: str):
        with open(self._download(rev, name), "rb") as f:
            yield f

    def materialise(self, rev: str, out: Path, skip: str | None = None) -> None:
        for name in self.tree(rev):
            if skip and name.startswith(skip + "/"):
                continue  # not downloaded at all: the optimizer state is the bulk of such a branch
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._download(rev, name), out / name)

    # ------------------------------------------------------------------ writing
    def write_branch(self, folder: Path, branch: str, parent: str | None, old: str | None, move_main: bool,
                     main_old: str | None, message: str) -> str:
        refs = self.refs()
        staging = STAGING + branch
        if staging in refs:  # left by an earlier failed attempt
            self._call("removing a stale staging branch", self.api.delete_branch, self.repo_id, branch=staging, repo_type="model")
        self._call("creating a staging branch", self.api.create_branch, self.repo_id, branch=staging,
                   revision=refs.get("main"), repo_type="model")
        info = self._call(f"uploading {branch}", self.api.upload_folder, repo_id=self.repo_id, folder_path=str(folder),
                          revision=staging, commit_message=message, delete_patterns="*", repo_type="model")
        commit = info.oid
        if old is not None:
            if self.refs().get(branch) != old:
                raise PublishError(f"{branch} on {self.path} changed while publishing; retry")
            self._call(f"replacing {branch}", self.api.delete_branch, self.repo_id, branch=branch, repo_type="model")
        self._call(f"creating {branch}", self.api.create_branch, self.repo_id, branch=branch, revision=commit, repo_type="model")
        if move_main:
            self._call("moving main", self.api.upload_folder, repo_id=self.repo_id, folder_path=str(folder), revision="main",
                       commit_message=f"main -> {branch}", delete_patterns="*", parent_commit=main_old, repo_type="model")
        self._call("removing the staging branch", self.api.delete_branch, self.repo_id, branch=staging, repo_type="model")
        return commit

    def write_files(self, branch: str, files: dict[str, bytes], old: str, main_follows: bool, message: str) -> str:
        from huggingface_hub import CommitOperationAdd

        def ops():
            return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]

        main_old = self.refs().get("main") if main_follows else None
        info = self._call(f"updating {branch}", self.api.create_commit, self.repo_id, ops(), commit_message=message,
                          revision=branch, parent_commit=old, repo_type="model")
        if main_follows:
            self._call("updating main", self.api.create_commit, self.repo_id, ops(), commit_message=message,
                       revision="main", parent_commit=main_old, repo_type="model")
        return info.oid
