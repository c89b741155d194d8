"""The bad-input half of ``poelm selftest`` (see ``selftest``): every case is one CLI call on a
prepared bad input, rejected cleanly when the exit code is 2, stderr is exactly one line starting
with ``error:`` that matches the case's expected message, there is no traceback, and every file
that existed before is byte-identical after. ``bad_inputs`` prints "N/N bad inputs rejected
cleanly"."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from poelm.ops.selftest import END, TINY, Fixture, cli_run, prepare, tree_digest

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
    from poelm.train.checkpoint import write_manifest

    write_manifest(d)


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_bad_inputs(fx: Fixture, root: Path) -> list[Case]:
    """Prepare every bad input under ``root`` and return the cases (CLI args, expected message)."""
    from safetensors.torch import load_file, save_file

    from poelm import config
    from poelm.data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    good = fx.ref / f"step-{END:05d}"
    T = [a for o in TINY for a in ("--set", o)]
    cases = []

    # the parser itself: one line naming the verb's --help, not argparse's usage block
    cases.append(Case("unknown verb", ["frobnicate", good], r"invalid choice: 'frobnicate' .*\(see poelm --help\)$"))
    cases.append(Case("unknown flag", ["export", good, root / "flag-export", "--bogus"], r"unrecognized arguments: --bogus \(see poelm export --help\)$"))
    cases.append(Case("flag value of the wrong type", ["train", *T, "--steps", "many", "--out", root / "o0"], r"argument --steps: invalid int value: 'many' \(see poelm train --help\)$"))

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

    from poelm.data.corpus import tokenizer_texts

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
        cases.append(Case(f"branch name {bad!r}", ["checkout", repo, bad, root / "co"], r"invalid (branch|revision) .*: expected (main(, | or ))?step-XXXXX"))
    cases.append(Case("revision that does not exist", ["checkout", repo, "step-99999", root / "co"], r"has no branch step-99999"))
    cases.append(Case("revision that does not exist (REPO@)", ["continue", "--from", f"{repo}@step-99999", "--out", root / "o5", "--quiet"], r"has no branch step-99999"))

    # NaN: a continual phase whose scalar LR explodes after the lrm=0 first update
    cases.append(Case("NaN/inf loss during training", ["continue", "--from", good, "--set", "optim.scalar_lr=1e30", "--steps", "4", "--save-every", "1",
                                                       "--out", root / "nan", "--quiet"], r"(loss|BPB) became nan at step \d+"))
    (root / "empty.txt").write_text("")
    (root / "nanochat-empty").mkdir()
    cases.append(Case("nanochat folder without a model file", ["import", "nanochat", root / "nanochat-empty", root / "imp"], r"holds no model_XXXXXX\.pt"))
    plain = _copy_ckpt(good, root / "plain-ops" / "step-00004")  # the same weights under poelm's qk scale
    cfg_path = plain / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["model"]["qk_scale"] = 1.0
    cfg_path.write_text(json.dumps(cfg_json))
    _rewrite_manifest(plain)
    cases.append(Case("nanochat export of a model without the reference's ops", ["export", "--format", "nanochat", plain, root / "nc"],
                      r"model\.qk_scale = 1\.0, the reference needs 1\.2"))
    cases.append(Case("empty corpus file", ["train", *T, "--set", f"data.path={root / 'empty.txt'}", "--out", root / "o6", "--quiet"], r"the training split is empty"))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    cases.append(Case("binary corpus file", ["train", *T, "--set", f"data.path={root / 'binary.txt'}", "--out", root / "o7", "--quiet"], r"binary\.txt looks binary"))

    # domain-adaptive continue and vocabulary extension (issue 31)
    cases.append(Case("replay outside [0, 1)", ["continue", "--from", good, "--add-data", "embedded", "--replay", "1.0", "--out", root / "o8", "--quiet"],
                      r"--replay must be in \[0, 1\)"))
    tj = json.loads((good / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    a, b = sorted(v, key=v.get)[10:12]
    v[a], v[b] = v[b], v[a]  # two byte tokens swap ids
    v["<|extra|>zz"] = len(v)
    (root / "renumbered.json").write_text(json.dumps(tj))
    cases.append(Case("extended tokenizer that renumbers old ids", ["extend-vocab", good, root / "o9", "--tokenizer", root / "renumbered.json"],
                      r"renumbers the old vocabulary: token 10"))
    (root / "no-new.txt").write_text("zq xj\n")
    cases.append(Case("corpus with no new tokens", ["extend-vocab", good, root / "o10", "--from", root / "no-new.txt", "--new-tokens", "8"],
                      r"the new corpus brings no new token"))
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


