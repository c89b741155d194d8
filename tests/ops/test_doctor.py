"""``poelm doctor``: environment checks, exit 0 when fine and 2 when something blocks; the
planned checkpoint size equals what a real checkpoint holds."""

import shutil
import struct
from collections import namedtuple


from poelm.train import checkpoint
from poelm.ops import doctor
from poelm.ops import selftest


def _data_bytes(path) -> int:
    """Tensor bytes of a safetensors file: size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - n


def test_checkpoint_bytes_match_a_real_checkpoint(fx):
    ck = fx.ref / "step-00004"
    cfg = checkpoint.load(ck, with_optim=False).config
    size = doctor.checkpoint_bytes(cfg.model, cfg.optim.optimizer)
    assert size["model"] == _data_bytes(ck / "model.safetensors")
    assert size["optim"] == _data_bytes(ck / "optim.safetensors")
    total = sum(p.stat().st_size for p in ck.iterdir())
    assert total <= size["total"] <= total + doctor.SMALL_FILES


def test_planned_checkpoints():
    from poelm import config

    def n(**t):
        return doctor.planned_checkpoints(config.load("embedded", [f"train.{k}={v}" for k, v in t.items()] + ["schedule.steps=100"]))

    assert n(save_every=0) == 1
    assert n(save_every=10) == 10  # 10 saves, the last is the final one
    assert n(save_every=30) == 4  # 30, 60, 90 + final 100
    assert n(save_every=10, keep_last=2) == 3


def test_all_ok_here_exits_0(tmp_path, capsys):
    from poelm import cli

    rc = cli.main(["doctor", "--workdir", str(tmp_path / "new" / "run"), *sum((["--set", o] for o in selftest.TINY), [])])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().splitlines()[-1].startswith("ready")
    for name in ("python", "packages", "config", "cuda", "git", "workdir", "disk"):
        assert f"  {name}: " in out


def _status(checks, name):
    return next(c for c in checks if c.name == name).status


def test_blockers_exit_2(tmp_path, monkeypatch, capsys):
    import torch

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    checks = doctor.run_checks("embedded", [], blocker / "run")  # a file where a directory should be
    assert _status(checks, "workdir") == "fail"
    assert doctor.report(checks, out=lambda s: None) == 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checks = doctor.run_checks("embedded", ["train.device=cuda"], tmp_path)
    assert _status(checks, "cuda") == "fail"

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    checks = doctor.run_checks("embedded", [], tmp_path)
    disk = next(c for c in checks if c.name == "disk")
    assert disk.status == "fail" and "free" in disk.fix
    lines = []
    assert doctor.report(checks, out=lines.append) == 2 and lines[-1] == "blocked by: disk"

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 40 * 2**20))  # room for one 31.8 MiB checkpoint, not two
    checks = doctor.run_checks("embedded", [], tmp_path)
    assert _status(checks, "disk") == "warn" and doctor.report(checks, out=lambda s: None) == 0


def test_git_missing_or_old_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "git_version", lambda: None)
    c = doctor._check_git()
    assert c.status == "warn" and "git" in c.fix
    monkeypatch.setattr(doctor, "git_version", lambda: (2, 20, 1))
    assert doctor._check_git().status == "warn"
    monkeypatch.setattr(doctor, "git_version", lambda: (2, 39, 5))
    assert doctor._check_git().status == "ok"


def test_real_git_version_parses():
    v = doctor.git_version()
    assert v is None or (len(v) >= 2 and v[0] >= 1)


def test_bad_config_is_a_blocker(tmp_path):
    checks = doctor.run_checks("embedded", ["model.depth=5"], tmp_path)
    assert _status(checks, "config") == "fail" and "stage_layers" in checks[-1].detail
    p = selftest.cli_run(["doctor", "--set", "model.depth=5", "--workdir", tmp_path])
    assert p.returncode == 2 and "blocked by: config" in p.stdout and "Traceback" not in p.stderr
