"""``poelm branches REPO | head -1``: a reader that goes away ends the verb quietly (Python's
"Note on SIGPIPE" recipe, exit 141 = 128 + SIGPIPE), not with ``error: Broken pipe``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from poelm.trajectory import publish as P
from test_export import make_ckpt


@pytest.mark.skipif(shutil.which("head") is None, reason="needs head(1)")
def test_branches_into_head_ends_quietly(tmp_path):
    make_ckpt(tmp_path / "step-00100", step=100)
    repo = tmp_path / "repo"
    P.publish(tmp_path / "step-00100", repo)
    # `| head -1` on a long listing: head has read its line and gone before poelm writes the rest.
    # Made deterministic here: head reads one line of ours and exits, then poelm writes into the pipe.
    r, w = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=r, stdout=subprocess.PIPE)
    os.close(r)
    os.write(w, b"first\n")
    assert head.communicate(timeout=30)[0] == b"first\n"  # head is gone: the pipe has no reader
    try:
        done = subprocess.run([sys.executable, "-m", "poelm", "branches", str(repo)], stdout=w, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    assert done.stderr == b"", done.stderr
    assert done.returncode == 141
    # and the ordinary case through a shell pipe: the first line arrives, nothing on stderr
    sh = subprocess.run(f"{sys.executable} -m poelm branches {repo} | head -1", shell=True, capture_output=True, timeout=120)
    assert sh.returncode == 0 and sh.stdout.decode().split()[:6] == ["branch", "step", "tokens", "lrm", "phase", "bpb"], sh
    assert sh.stderr == b""
