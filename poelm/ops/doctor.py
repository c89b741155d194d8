"""``poelm doctor``: check the environment before a run and say what to fix.

Each check is one line ``ok|warn|FAIL  what: detail`` followed, for warn/FAIL, by ``-> fix``.
Exit code 0 when nothing blocks, 2 when something does (a FAIL). Checks:

- Python >= 3.11 and the versions of torch, transformers, tokenizers and safetensors;
- the training device of the config (``train.device`` / ``--device``): CUDA present when asked
  for, its count and name; bf16 supported when ``train.dtype`` is bf16 (or auto on CUDA);
- git on PATH and its version: local trajectory repositories need ``git init --initial-branch``
  (git 2.28) and ``update-ref --stdin`` transactions with ``start``/``prepare``/``commit``
  (git 2.27), so git >= 2.28 (only a warning: without git the run trains, publishing to a local
  repository fails);
- write access to the work directory (a file is created, fsynced and removed there);
- free disk against the planned checkpoints of the config. One checkpoint holds the fp32 master
  weights (4 bytes x parameters) and the optimizer state in fp32: Muon keeps one momentum buffer
  per matrix, AdamW two moments per other parameter (``optim.STATE_KEYS`` by ``optim.group_of``),
  so ``bytes = 4 x (P + P_muon + 2 P_adamw)`` plus a small allowance for JSON/tokenizer files.
  A save needs room for one more checkpoint (it is built beside the others, then renamed), so
  free < one checkpoint is a FAIL; free < all the checkpoints the run will keep (``keep_last``
  + 1, or every ``save_every`` save and the final one when ``keep_last = 0``) is a warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIN_GIT = (2, 28)
SMALL_FILES = 1 << 20  # config/meta/manifest/tokenizer/rng JSON and tensors: well under 1 MiB


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        tag = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        out = [f"{tag}  {self.name}: {self.detail}"]
        if self.fix and self.status != "ok":
            out.append(f"      -> {self.fix}")
        return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def checkpoint_bytes(model_cfg, optimizer: str = "nanochat") -> dict:
    """Bytes of one checkpoint of ``model_cfg``: fp32 weights + fp32 optimizer state of
    ``optimizer`` (``optim.optimizer``: the reference's also keeps Muon's factored second moment;
    counted by ``plan.optimizer_state_numel``, one rank holding everything as a save gathers it).
    The model is built on the meta device, so a 3B config costs no memory."""
    import torch

    from poelm.core.model import PoEGPT
    from poelm.train.plan import optimizer_state_numel

    with torch.device("meta"):
        model = PoEGPT(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    optim = optimizer_state_numel(model, 1, model_cfg.objective, optimizer)[0]
    return {"params": params, "model": 4 * params, "optim": 4 * optim, "total": 4 * (params + optim) + SMALL_FILES}


def planned_checkpoints(cfg) -> int:
    """How many checkpoints the run dir will hold at its fullest."""
    t, steps = cfg.train, cfg.schedule.steps
    saves = (steps // t.save_every if t.save_every else 0) + (0 if t.save_every and steps % t.save_every == 0 else 1)
    return min(saves, t.keep_last + 1) if t.keep_last else saves


def git_version() -> tuple[int, ...] | None:
    exe = shutil.which("git")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def _check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", "ok" if ok else "fail", f"{v.major}.{v.minor}.{v.micro}", "install Python >= 3.11")


def _check_packages() -> Check:
    import importlib.metadata as md

    missing, vers = [], []
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            missing.append(pkg)
    if missing:
        return Check("packages", "fail", f"missing {', '.join(missing)}", f"pip install {' '.join(missing)} (or pip install -e .)")
    return Check("packages", "ok", ", ".join(vers))


def _check_device(cfg, device: str | None) -> list[Check]:
    import torch

    want = device or cfg.train.device
    cuda = torch.cuda.is_available()
    out = []
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        out.append(Check("cuda", "ok", f"{torch.cuda.device_count()} device(s): {', '.join(names)}; CUDA {torch.version.cuda}"))
    else:
        status = "fail" if want.startswith("cuda") else "ok"
        out.append(Check("cuda", status, f"not available (torch {torch.__version__}); training runs on {'CPU' if status == 'ok' else 'nothing'}",
                         "install a CUDA build of torch and check nvidia-smi, or pass --device cpu"))
    if want == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        out.append(Check("mps", "fail", "train.device is mps but MPS is not available", "pass --device cpu"))
    dev = ("cuda" if cuda else "cpu") if want == "auto" else want
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if dev.startswith("cuda") else "fp32"
    if dtype == "bf16":
        if dev.startswith("cuda") and cuda:
            ok = torch.cuda.is_bf16_supported()
            out.append(Check("bf16", "ok" if ok else "fail", "supported" if ok else f"{names[0]} has no bf16",
                             "set train.dtype = \"fp32\" (or use an Ampere or newer GPU)"))
        elif dev == "cpu":
            out.append(Check("bf16", "warn", "bf16 autocast on CPU is slow and not what the tests check", "set train.dtype = \"fp32\" on CPU"))
    else:
        out.append(Check("dtype", "ok", f"{dtype} on {dev}"))
    return out


def _check_git() -> Check:
    v = git_version()
    if v is None:
        return Check("git", "warn", "not found on PATH: publishing to a local trajectory repository will fail",
                     "install git >= 2.28 (or publish to hf://org/name)")
    s = ".".join(map(str, v))
    if v[:2] < MIN_GIT:
        return Check("git", "warn", f"{s} is older than 2.28 (no --initial-branch / ref transactions): local publishing will fail",
                     "install git >= 2.28")
    return Check("git", "ok", s)


def _check_write(workdir: Path) -> Check:
    target = workdir
    while not target.exists() and target != target.parent:
        target = target.parent  # the directory a run would create its workdir in
    try:
        fd, tmp = tempfile.mkstemp(prefix=".poelm-doctor-", dir=target)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        return Check("workdir", "fail", f"cannot write in {target}: {e.strerror or e}", "choose a writable --workdir / --out, or fix its permissions")
    return Check("workdir", "ok", f"{workdir} is writable" + ("" if target == workdir else f" (created under {target})"))


def _check_disk(cfg, workdir: Path) -> list[Check]:
    size = checkpoint_bytes(cfg.model, cfg.optim.optimizer)
    n = planned_checkpoints(cfg)
    target = workdir
    while not target.exists() and target != target.parent:
        target = target.parent
    free = shutil.disk_usage(target).free
    desc = (f"one checkpoint = {human(size['total'])} ({size['params']:,} params: weights {human(size['model'])}, "
            f"optimizer {human(size['optim'])}); the run keeps up to {n}: {human(n * size['total'])}; free {human(free)}")
    if free < size["total"]:
        return [Check("disk", "fail", desc, f"free at least {human(size['total'] - free)} in {target}, or choose another --out")]
    if free < n * size["total"]:
        return [Check("disk", "warn", desc, f"set train.keep_last (room for {max(1, free // size['total'] - 1)}) or free {human(n * size['total'] - free)}")]
    return [Check("disk", "ok", desc)]


def run_checks(config: str | None = "embedded", overrides=(), workdir=".", device: str | None = None) -> list[Check]:
    """Every check, in order. A bad config is itself a FAIL (with the config error as detail)."""
    from poelm import config as config_mod
    from poelm.core.errors import PoelmError

    checks = [_check_python(), _check_packages()]
    try:
        cfg = config_mod.load(config, list(overrides))
    except PoelmError as e:
        return checks + [Check("config", "fail", str(e), "fix the config (see configs/embedded.toml)")]
    checks.append(Check("config", "ok", f"{config}: depth {cfg.model.depth}, stages {list(cfg.model.stage_layers)}, "
                                        f"n_embd {cfg.model.n_embd}, {cfg.schedule.steps} steps"))
    checks += _check_device(cfg, device)
    checks.append(_check_git())
    wd = Path(workdir).expanduser().resolve()
    checks.append(_check_write(wd))
    checks += _check_disk(cfg, wd)
    return checks


def report(checks: list[Check], out=print) -> int:
    """Print the checks; 0 when nothing failed, 2 otherwise."""
    for c in checks:
        for line in c.lines():
            out(line)
    fails = [c.name for c in checks if c.status == "fail"]
    warns = [c.name for c in checks if c.status == "warn"]
    if fails:
        out(f"blocked by: {', '.join(fails)}")
        return 2
    out("ready" + (f" (warnings: {', '.join(warns)})" if warns else ""))
    return 0
