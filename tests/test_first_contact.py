"""What a new user meets first: the README's two commands (and CI running exactly those), bad
command lines answered in one line, logs that read well when piped, a tokenizer that loads
without questions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from poelm import cli
from poelm.ops import selftest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- README <-> CI
def test_ci_runs_the_readme_commands_literally(tmp_path):
    """``.ci/run --print`` shows the two commands it will run, read from the README's first bash
    block; command 1 installs the test extra, so command 2 works in a brand-new venv."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1).splitlines()
    want = [re.sub(r"\s+#.*$", "", line).strip() for line in block[:2]]
    p = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == want
    install, tests = want
    assert tests == "python -m pytest -q"
    assert re.search(r'-e "?\.\[test\]"?', install) and "poelm demo" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("pytest") for r in extras["test"])
    # the demo's workdir (the cwd of command 1) never shows up in the clone's git status
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "poelm-demo/x"])
    assert ignored.returncode == 0


# ----------------------------------------------------------------------------- bad command lines
@pytest.mark.parametrize("argv,expect", [
    (["frobnicate"], r"^error: argument VERB: invalid choice: 'frobnicate' .*\(see poelm --help\)$"),
    ([], r"^error: the following arguments are required: VERB \(see poelm --help\)$"),
    (["train", "--bogus"], r"^error: unrecognized arguments: --bogus \(see poelm train --help\)$"),
    (["measure"], r"^error: the following arguments are required: TARGET \(see poelm measure --help\)$"),
    (["train", "--steps", "many"], r"^error: argument --steps: invalid int value: 'many' \(see poelm train --help\)$"),
    (["generate", "x", "--prompt", "p", "--bounds", "a,b"], r"^error: argument --bounds: expected comma-separated numbers.*\(see poelm generate --help\)$"),
    (["selftest", "nope"], r"^error: argument suite: invalid choice: 'nope' .*\(see poelm selftest --help\)$"),
])
def test_a_bad_command_line_is_one_error_line(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and re.search(expect, lines[0]), lines


# ----------------------------------------------------------------------------- piped logs
def test_a_piped_run_logs_plain_lines(tmp_path):
    """Not a TTY: no progress-bar frames (carriage returns), a line every ~10 % of the phase,
    a few hundred bytes for a whole run. A terminal still gets the bar (tqdm ``disable=None``)."""
    steps = 20
    p = subprocess.run([sys.executable, "-m", "poelm", "train", *[a for o in selftest.TINY for a in ("--set", o)],
                        "--steps", str(steps), "--save-every", "0", "--out", str(tmp_path / "run")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert "\r" not in log
    progress = [line for line in p.stderr.splitlines() if re.match(rf"\S+ step \d+/{steps}  loss ", line)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in progress] == list(range(2, steps + 1, 2))
    assert len(log.encode()) < 3000, log
