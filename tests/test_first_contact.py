"""What a new user meets first: the README's two commands (and CI running exactly those), bad
command lines answered in one line, logs that read well when piped, a tokenizer that loads
without questions."""

from __future__ import annotations

import json
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
                        "--set", "train.eval_every=10", "--steps", str(steps), "--save-every", "0", "--out", str(tmp_path / "run")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert "\r" not in log
    progress = [line for line in p.stderr.splitlines() if re.match(rf"\S+ step \d+/{steps}  loss ", line)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in progress] == list(range(2, steps + 1, 2))
    assert len(log.encode()) < 3000, log
    # the validation curve starts at init (the README's "at init" figure): step 0, then every 10
    evals = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals][:3] == [0, 10, 20]
    assert evals[0]["val_bpb"] > evals[-1]["val_bpb"] > 0


# ----------------------------------------------------------------------------- the tokenizer
LOAD = """
import sys
from transformers import {cls}
tok = {cls}.from_pretrained(sys.argv[1])
print("IDS", tok("The Devil's Dictionary").input_ids)
"""


def test_the_exported_tokenizer_loads_without_questions(tmp_path):
    """stdin closed, no trust_remote_code: the stock fast tokenizer class loads the folder without
    a word, and ``AutoTokenizer`` neither hangs nor fails (transformers 5 reads config.json first,
    whose ``auto_map`` names the model's remote code; with no answer it falls back to the plain
    config). Both give poelm's own ids, BOS first."""
    from poelm import config
    from poelm.data.tokenizer import Tokenizer
    from poelm.train import loop as train
    from poelm.trajectory import export

    train.train(config.load("embedded", [*selftest.TINY, "schedule.steps=1", "train.save_every=1"]), tmp_path / "run", progress=False)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    want = Tokenizer.load(tmp_path / "run" / "step-00001").encode_doc("The Devil's Dictionary")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for cls in ("PreTrainedTokenizerFast", "AutoTokenizer"):
        p = subprocess.run([sys.executable, "-c", LOAD.format(cls=cls), str(out)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        ids = re.findall(r"IDS (\[[\d, ]*\])", p.stdout)  # AutoTokenizer's question has no newline
        assert ids == [str(list(want))], (cls, p.stdout[-500:])
        if cls == "PreTrainedTokenizerFast":
            assert p.stdout.strip() == f"IDS {ids[0]}" and p.stderr.strip() == "", (p.stdout, p.stderr)
