"""Live dashboards (poelm/track.py): the records of log.jsonl reach every tracker unchanged, a
failing tracker never stops training, and each real backend's files read back equal log.jsonl.

The W&B / TensorBoard / trackio tests need ``pip install -e ".[track]"`` (poelm[track]) and skip
without it; CI installs the extra after the README's commands and runs this file again. All
offline: W&B in ``WANDB_MODE=offline``, trackio's local SQLite store under ``TRACKIO_DIR``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from poelm import config, track
from poelm.cli import main
from poelm.core.errors import ConfigError
from poelm.measure.dashboard import card_scalars
from poelm.train import loop

TINY = [
    "model.vocab_size=320", "model.depth=2", "model.stage_layers=[1,1]", "model.n_embd=32", "model.n_head=2",
    "model.n_kv_head=1", "model.intermediate=64", "model.max_seq_len=64", "train.seq_len=32",
    "train.device_batch_size=2", "train.eval_tokens=1024", "train.eval_every=2", "train.log_every=1",
    "data.tokenizer_train_chars=100000", "schedule.steps=4", "schedule.warmup=1", "train.save_every=2",
]


def tiny(*extra):
    return config.load("embedded", TINY + list(extra))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict:
    """(kind/key, step) -> value of every number in log.jsonl, as ``track.scalars`` names them."""
    return {(k, r["step"]): v for r in records(run) for k, v in track.scalars(r).items()}


class Recorder:
    """A backend that keeps what it is given; ``fail_at``: raise from ``log`` at that step."""
    runs: list = []

    def __init__(self, info, config, resume, fail_at=None):
        self.info, self.cfg, self.logged, self.fail_at, self.finished = info, config, [], fail_at, False
        Recorder.runs.append(self)

    def log(self, metrics, step):
        if step == self.fail_at:
            raise OSError(28, "No space left on device")
        self.logged.append((dict(metrics), step))

    def config(self, config):
        self.cfg = config

    def finish(self):
        self.finished = True


# ----------------------------------------------------------------------------- no backend needed
def test_scalars_flattens_a_record_by_kind_index_and_key():
    rec = {"kind": "train", "step": 7, "loss": 2.5, "stage_ce": [3.0, 2.0], "lr": {"matrix": 0.01, "x0": 0.5},
           "mix": None, "note": "x", "flag": True, "bad": float("nan")}
    assert track.scalars(rec) == {"train/loss": 2.5, "train/stage_ce/0": 3.0, "train/stage_ce/1": 2.0,
                                  "train/lr/matrix": 0.01, "train/lr/x0": 0.5}


def test_tracker_names_are_validated_and_a_missing_package_names_its_extra(monkeypatch, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        track.check(["mlflow"])
    with pytest.raises(ConfigError, match="train.trackers must be a list"):
        tiny('train.trackers="tensorboard"')
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):  # before any compute: nothing written
        loop.train(tiny('train.trackers=["nope"]'), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    assert tiny('train.trackers=["tensorboard", "tensorboard"]').train.trackers == ["tensorboard"]
    monkeypatch.setattr(track.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'pip install "poelm\[wandb\]"'):
        track.check(["wandb"])
    out = tmp_path / "run"
    rc = main(["train", *sum((["--set", s] for s in TINY), []), "--out", str(out), "--quiet", "--tracker", "trackio"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: tracker trackio needs the trackio package")
    assert not out.exists()  # nothing computed, nothing written
    with pytest.raises(ConfigError, match="poelm\\[tensorboard\\]"):  # the library checks too, before any compute
        loop.train(tiny('train.trackers=["tensorboard"]'), out, progress=False)
    assert not out.exists()


def test_every_record_reaches_the_tracker_and_a_failing_tracker_never_stops_training(monkeypatch, tmp_path, capsys):
    Recorder.runs = []
    monkeypatch.setitem(track.BACKENDS, "rec", ("json", "rec", Recorder))
    monkeypatch.setitem(track.BACKENDS, "broken", ("json", "broken", lambda i, c, r: Recorder(i, c, r, fail_at=3)))
    plain, tracked = tmp_path / "plain", tmp_path / "tracked"
    loop.train(tiny(), plain, progress=False)
    loop.train(tiny('train.trackers=["rec", "broken"]'), tracked, progress=False, tracking={"project": "p", "run_name": "r1"})
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: tracker")]
    assert warnings == ["warning: tracker broken failed (OSError: [Errno 28] No space left on device); it is disabled, training goes on"]
    rec, broken = Recorder.runs
    assert rec.finished and not broken.finished
    # one dict, two sinks: exactly log.jsonl's numbers at their steps
    assert {(k, s): v for m, s in rec.logged for k, v in m.items()} == expected(tracked)
    assert [s for _, s in broken.logged] == [0, 1, 1, 2, 2]  # eval 0, train 1 + dist 1, train 2 + eval 2; then step 3 raised
    assert rec.cfg["model"]["depth"] == 2 and rec.cfg["train"]["tokens_per_step"] == 64  # the resolved config
    train_recs = [r for r in records(tracked) if r["kind"] == "train"]
    assert set(train_recs[0]) >= {"loss", "stage_ce", "lrm", "lr", "grad_norm", "tok_per_s", "step_s", "tokens"}
    matrix = {k: v for k, v in train_recs[0]["lr"].items() if k.startswith("matrix")}  # "matrix" or the reference's "matrix_RxC"
    assert matrix and all(v == pytest.approx(0.02 * train_recs[0]["lrm"]) for v in matrix.values())
    # the checkpoints are those of the run without trackers; the run id is in the checkpoint
    for step in ("step-00002", "step-00004"):
        a, b = load_file(str(plain / step / "model.safetensors")), load_file(str(tracked / step / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in a)
    meta = json.loads((tracked / "step-00004" / "meta.json").read_text())
    assert meta["tracking"] == rec.info and rec.info["name"] == "r1" and rec.info["project"] == "p"

    # --resume reopens the same run; a continual phase is a new run grouped with its base
    Recorder.runs = []
    loop.train(tiny('train.trackers=["rec"]'), tracked, resume=tracked / "step-00002", progress=False)
    assert Recorder.runs[0].info == rec.info and {s for _, s in Recorder.runs[0].logged} == {3, 4}
    loop.continue_phase(tracked / "step-00004", tmp_path / "cont", steps=2, progress=False, overrides=['train.trackers=["rec"]'])
    cont = Recorder.runs[1].info
    assert cont["id"] != rec.info["id"] and cont["group"] == "r1" and cont["project"] == "p"


def test_card_scalars_pick_the_card_metrics():
    rec = {"step": 9, "bpb": {"full": {"value": 2.0, "ci": [1.9, 2.1]}, "single": [{"value": 3.0}, {"value": 2.5}],
                              "prefix": [{"value": 2.4}]},
           "acc": {"full": {"value": 0.3}, "single": [{"value": 0.2}, {"value": 0.25}]},
           "alpha_sweep": {"alphas": [0.0, 0.5, 1.0], "bpb": [2.0, 2.1, 2.2]}, "crossover_gap": -0.5,
           "wand": {"bounds": [1.5], "exit": {"fraction_per_stage": [0.4, 0.6], "agreement": 0.99}},
           "routing": {"fraction": 0.3, "tau": 0.2, "projected_speedup": 1.2, "generation": {"speedup": {"value": 1.1}}},
           "spec": {"acceptance": 0.7, "speedup": {"value": 1.3, "ci": [1.2, 1.4]}, "implied_speedup": {"value": 1.4}},
           "against": {"deltas": {"bpb.full": {"value": -0.05}}},
           "benchmarks": [{"task": "poelm_devils_cloze", "metric": "acc", "value": 0.31, "stages": "full"}]}
    assert card_scalars(rec) == {
        "measure/bpb/full": 2.0, "measure/bpb/single/0": 3.0, "measure/bpb/single/1": 2.5, "measure/bpb/prefix/1": 2.4,
        "measure/acc/full": 0.3, "measure/acc/single/0": 0.2, "measure/acc/single/1": 0.25,
        "measure/alpha_sweep/bpb/0": 2.0, "measure/alpha_sweep/bpb/0.5": 2.1, "measure/alpha_sweep/bpb/1": 2.2,
        "measure/crossover_gap": -0.5, "measure/wand/bound/0": 1.5, "measure/wand/exit_fraction/0": 0.4,
        "measure/wand/exit_fraction/1": 0.6, "measure/wand/exit_agreement": 0.99, "measure/routing/fraction": 0.3,
        "measure/routing/tau": 0.2, "measure/routing/projected_speedup": 1.2, "measure/routing/generation_speedup": 1.1,
        "measure/spec/acceptance": 0.7, "measure/spec/speedup": 1.3, "measure/spec/implied_speedup": 1.4,
        "measure/delta_vs_ref/bpb_full": -0.05, "measure/benchmarks/poelm_devils_cloze/acc": 0.31}


# ----------------------------------------------------------------------------- real backends
def _tb_scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(str(logdir / "events.out.tfevents.*"))):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.update({(tag, e.step): e.value for e in acc.Scalars(tag)})
    return out


def _same(got: dict, want: dict, rel=1e-6):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-12), k


def test_tensorboard_events_read_back_equal_log_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    loop.train(tiny('train.trackers=["tensorboard"]'), out, progress=False)
    _same(_tb_scalars(out / "tensorboard"), expected(out))  # event files hold float32


def _wandb_records(path: str):
    """The protobuf records of a W&B ``.wandb`` transaction log (a LevelDB-style log: 7-byte
    header ``:W&B`` + magic + version, 32 KiB blocks of chunks ``crc32 u32, length u16, type u8``;
    type 1 = a whole record, 2/3/4 = first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is zero padding
            pos += room
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += room
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def test_wandb_offline_run_file_reads_back_equal_to_log_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    loop.train(tiny('train.trackers=["wandb"]'), out, progress=False, tracking={"project": "poelm-test", "run_name": "tiny"})
    import wandb

    wandb.teardown()  # the wandb-core service writes the run file asynchronously; its shutdown flushes it
    info = json.loads((out / "step-00004" / "meta.json").read_text())["tracking"]
    files = glob.glob(str(out / "wandb" / f"offline-run-*-{info['id']}" / f"run-{info['id']}.wandb"))
    assert len(files) == 1
    got, run, cfg = {}, None, {}
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            step = row.pop("step")
            got.update({(k, step): v for k, v in row.items() if not k.startswith("_")})
        elif kind == "run":
            run = r.run
            cfg.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            cfg.update({i.key: json.loads(i.value_json) for i in r.config.update})
    _same(got, expected(out), rel=1e-12)
    assert run.run_id == info["id"] and run.display_name == "tiny" and run.project == "poelm-test"
    assert cfg["model"]["stage_layers"] == [1, 1]


def test_trackio_local_store_reads_back_equal_to_log_jsonl(tmp_path):
    pytest.importorskip("trackio")
    # trackio fixes its store directory when imported: train and read back in a child process
    code = f"""
import json, sys
from poelm import config
from poelm.train import loop
loop.train(config.load("embedded", {TINY!r} + ['train.trackers=["trackio"]']), {str(tmp_path / 'run')!r}, progress=False,
           tracking={{"project": "poelm-test", "run_name": "tiny"}})
from trackio.sqlite_storage import SQLiteStorage
print("LOGS=" + json.dumps(SQLiteStorage.get_logs("poelm-test", "tiny")))
"""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    logs = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("LOGS="))[5:])
    got = {(k, row["step"]): v for row in logs for k, v in row.items() if k not in ("step", "timestamp")}
    _same(got, expected(tmp_path / "run"), rel=1e-12)


def test_kill_9_during_a_logged_run_then_resume(tmp_path):
    """SIGKILL mid-run: TensorBoard's files hold every step logged before the kill (flushed per
    record), the checkpoints are intact, and --resume continues the same run to the end."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "poelm", "train", *sum((["--set", s] for s in TINY), []), "--set", "schedule.steps=60",
            "--set", "train.eval_every=0", "--save-every", "5", "--out", str(out), "--quiet", "--tracker", "tensorboard"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "step-00010").is_dir():
            time.sleep(0.2)
        assert (out / "step-00010").is_dir(), "the run did not reach step 10"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    want = expected(out)
    got = _tb_scalars(out / "tensorboard")
    last = max(s for _, s in want)
    # every record before the last one is on disk (the kill can fall between the two sinks)
    _same({k: v for k, v in got.items() if k[1] < last}, {k: v for k, v in want.items() if k[1] < last})
    newest = max(int(d.name[5:]) for d in out.glob("step-*") if (d / "manifest.json").is_file())
    info = json.loads((out / f"step-{newest:05d}" / "meta.json").read_text())["tracking"]
    p = subprocess.run([sys.executable, "-m", "poelm", "train", "--resume", str(out / f"step-{newest:05d}"), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "step-00060" / "meta.json").read_text())["tracking"] == info  # the same run
    got = _tb_scalars(out / "tensorboard")
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 2
    assert {s for (k, s) in got if k == "train/loss"} >= set(range(newest + 1, 61))


def test_cooldown_probe_is_its_own_tagged_run_and_measure_logs_into_the_branch_run(monkeypatch, tmp_path):
    from poelm.measure import run as measure
    from poelm.measure.dashboard import log_measurement
    from poelm.train import cooldown
    from poelm.trajectory import publish

    Recorder.runs = []
    monkeypatch.setitem(track.BACKENDS, "rec", ("json", "rec", Recorder))
    run, repo = tmp_path / "run", tmp_path / "repo"
    loop.train(tiny('train.trackers=["rec"]', "train.eval_every=0"), run, progress=False, tracking={"project": "p", "run_name": "base"})
    base = Recorder.runs[0].info
    cooldown.cooldown(run / "step-00002", tmp_path / "probe", steps=2, progress=False)
    probe = Recorder.runs[1]
    assert probe.info["tags"] == ["cooldown-from-step-00002"] and probe.info["group"] == "base"
    assert probe.info["name"] == "base-cooldown-00002-2" and probe.info["project"] == "p" and probe.finished
    assert {s for _, s in probe.logged} == {3, 4}  # the probe's own steps (2 -> 4)
    publish.publish(run / "step-00004", repo)
    rec = measure.measure_target(f"{repo}@step-00004", split_tokens=1024, calib_tokens=512, probe_set=None, progress=False, samples=20)
    assert rec["tracking"] == {k: v for k, v in base.items() if k != "dir"}  # carried by the branch's config.json
    logged = log_measurement(rec, ["rec"], {"dir": str(tmp_path / "dash")})
    m = Recorder.runs[2]
    assert m.info["id"] == base["id"] and m.info["name"] == "base" and m.finished  # the run that saved the branch
    assert m.logged == [(logged, 4)] and logged["measure/bpb/full"] == rec["bpb"]["full"]["value"]
    assert logged["measure/bpb/single/1"] == rec["bpb"]["single"][1]["value"] and "measure/wand/bound/0" in logged
    if importlib.util.find_spec("tensorboard") is not None:  # poelm[track]: the same metrics read back from the event files
        log_measurement(rec, ["tensorboard"], {"dir": str(tmp_path / "dash")})
        _same(_tb_scalars(tmp_path / "dash" / "tensorboard"), {(k, 4): v for k, v in logged.items()})


def test_mfu_scale_is_flops_per_token_over_ranks_times_the_gpu_peak(monkeypatch):
    import torch

    from poelm.core.model import PoEGPT
    from poelm.train.plan import GPUS, mfu_scale

    cfg = tiny()
    with torch.device("meta"):
        model = PoEGPT(cfg.model)
    flops = model.flops_per_token(seq_len=cfg.seq_len)["train_total"]
    assert mfu_scale(model, cfg.seq_len, "cpu", 1) is None  # no meaningful peak on a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert mfu_scale(model, cfg.seq_len, "cuda:0", 2) == flops / (2 * GPUS["h100"].bf16_flops)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    assert mfu_scale(model, cfg.seq_len, "cuda:0", 1) is None  # an unknown GPU: no mfu in the record
