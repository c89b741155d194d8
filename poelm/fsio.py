"""Atomic, durable file writes and hashing.

Every file poelm writes goes through here: write to a temporary name in the same directory,
fsync it, ``os.replace`` it over the target, then fsync the directory, so a crash leaves either
the old or the new file and never half of one (POSIX rename is atomic within a filesystem).
Directories are built the same way under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the usual default
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync (JSONL logs: a crash can only lose the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def recover_swaps(parent: str | os.PathLike) -> None:
    """Finish an overwrite that a crash interrupted (see ``atomic_dir``): a ``.X.old`` whose
    ``X`` is missing is moved back; one whose ``X`` is in place is deleted."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for old in parent.glob(".*.old"):
        target = parent / old.name[1:-len(".old")]
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def sweep_temps(parent: str | os.PathLike, prefix: str = "") -> int:
    """Remove ``.{prefix}*.tmp`` leftovers of writes a crash interrupted; call it only when no
    writer is active in ``parent`` (a run's start). Returns how many were removed."""
    n = 0
    for tmp in Path(parent).glob(f".{prefix}*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory next to ``final``; on success fsync it and rename it into place.

    On any exception the temporary directory is removed and ``final`` is untouched. With
    ``overwrite`` an existing ``final`` is moved aside to ``.NAME.old`` first and deleted only
    after the new one is in place; a crash between the two renames leaves ``.NAME.old``, which
    ``recover_swaps`` (run here and by readers such as ``checkpoint.latest``) moves back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_swaps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
