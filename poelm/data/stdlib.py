"""A new-domain corpus every machine has offline: the Python standard library's own source files.

``sysconfig.get_paths()["stdlib"]`` holds 20+ MB of real Python that nobody in this project wrote
(the test suite ``test/`` and vendored ``site-packages`` / ``idlelib`` / ``lib2to3`` data left out).
``write_corpus`` turns the first files in sorted path order into a jsonl corpus
(``{"text": ...}`` per line) that ``poelm continue --add-data`` and ``poelm extend-vocab --from``
read. A file is cut into documents of about ``doc_chars`` characters at blank lines, so the hashed
train/validation split (``data.is_val``) has documents on both sides even for a handful of files.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from poelm.core.errors import DataError
from poelm.fsio import atomic_write_text

SKIP = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted path order (``SKIP`` folders left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP))
    if not files:
        raise DataError(f"no .py files under the standard library folder {root}")
    return files[:limit] if limit else files


def documents(text: str, doc_chars: int) -> list[str]:
    """``text`` cut at blank lines into pieces of at least ``doc_chars`` characters (the last may be shorter)."""
    out, cur = [], []
    n = 0
    for para in text.split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= doc_chars:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur and "\n\n".join(cur).strip():
        out.append("\n\n".join(cur))
    return out


def write_corpus(path, max_files: int | None = None, doc_chars: int = 2000, max_bytes: int | None = None) -> dict:
    """Write the stdlib corpus to ``path`` (jsonl, atomically); returns ``{"files", "docs", "bytes"}``."""
    lines, nbytes, used = [], 0, 0
    for f in stdlib_files(max_files):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are latin-1 test data
        used += 1
        for d in documents(text, doc_chars):
            lines.append(json.dumps({"text": d}, ensure_ascii=False))
            nbytes += len(d.encode("utf-8"))
        if max_bytes and nbytes >= max_bytes:
            break
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return {"files": used, "docs": len(lines), "bytes": nbytes}
