"""The README's multi-node recipe, run as 2 nodes x 1 process on one machine over loopback.

Two ``torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0/1 --rdzv_backend=c10d
--rdzv_endpoint=127.0.0.1:PORT`` launches (gloo, ``--device cpu``, the selftest's tiny model)
train exactly like one ``torchrun --standalone --nproc_per_node=2`` launch: the same two ranks,
the same rows per rank, the same two-term sums, so the logged losses and gradient norms are equal
(measured bitwise equal). A node killed mid-run (its torchrun agent and its worker, SIGKILL: what
a machine failure does) leaves the other node failing within seconds with one ``error:`` line,
not hanging; a rank that stops answering (alive but silent: nothing closes) is cut off by the
process-group timeout ``POELM_DIST_TIMEOUT`` (checked with two plain processes, a 2 s timeout;
through torchrun the same was measured: a SIGSTOPped node 1, timeout 20 s, node 0 out after 25 s).

Only loopback addresses are used. Every process a test starts is killed in its ``finally``
(torchrun starts its workers in their own sessions, so they are found through /proc).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poelm.ops.selftest import TINY

STEPS = 3
OVERRIDES = [*TINY, f"schedule.steps={STEPS}", "train.save_every=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out: Path, overrides) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return ["-m", "poelm", "train", "--config", "embedded", *sets, "--device", "cpu", "--out", str(out), "--quiet"]


def _node(rank: int, port: int, out: Path, overrides, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=poelm-test", *_train_args(out, overrides)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env or ENV)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(d))
    return out


def _kill_node(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """The agent and its workers (which torchrun starts in sessions of their own)."""
    for pid in [*_children(p.pid), p.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _records(run: Path, kind: str) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: 1 node x 2 processes (it also trains the tokenizer the others reuse)."""
    out = tmp_path_factory.mktemp("mn") / "one-node"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *_train_args(out, OVERRIDES)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _run_dir(one_node: Path, path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_bytes((one_node / "tokenizer.json").read_bytes())  # skip BPE training
    return path


def test_two_nodes_over_loopback_train_like_one_node(one_node, tmp_path):
    out = _run_dir(one_node, tmp_path / "two-nodes")
    port = free_port()
    nodes = [_node(0, port, out, OVERRIDES)]
    time.sleep(0.5)  # node 0 binds the rendezvous endpoint and hosts the store
    nodes.append(_node(1, port, out, OVERRIDES))
    try:
        results = [p.communicate(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            _kill_node(p)
    for p, (so, se) in zip(nodes, results):
        assert p.returncode == 0, se[-3000:]
    assert sum(so.count(f"done: step {STEPS}") for so, _ in results) == 1  # global rank 0 alone prints
    a, b = _records(one_node, "train"), _records(out, "train")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == ra["loss"] and rb["grad_norm"] == ra["grad_norm"], (ra, rb)
        assert rb["stage_ce"] == ra["stage_ce"] and rb["tokens"] == ra["tokens"]
    (da,), (db,) = _records(one_node, "dist"), _records(out, "dist")
    assert (db["world_size"], db["accum"], db["tokens_per_step"]) == (da["world_size"], da["accum"], da["tokens_per_step"]) == (2, 1, 128)
    assert db["optim_state_numel"] == da["optim_state_numel"]
    meta = json.loads((out / f"step-{STEPS:05d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["loader_state"] == json.loads((one_node / f"step-{STEPS:05d}" / "meta.json").read_text())["loader_state"]


def _start_long_run(one_node, out, env):
    long = [*TINY, "schedule.steps=100000", "train.save_every=0"]
    port = free_port()
    a = _node(0, port, out, long, env)
    time.sleep(0.5)
    b = _node(1, port, out, long, env)
    deadline = time.time() + 120
    while not _records(out, "train"):  # both ranks are past the rendezvous and training
        assert a.poll() is None and b.poll() is None, (a.stderr.read()[-2000:], b.stderr.read()[-2000:])
        assert time.time() < deadline, "the 2-node run did not start training within 120 s"
        time.sleep(0.2)
    return a, b


def test_losing_a_node_is_a_clear_error_not_a_hang(one_node, tmp_path):
    """Node 1 dies mid-run (SIGKILL of its agent and worker): node 0 exits with one ``error:``
    line from its worker (no Python traceback) within seconds, well inside the bound."""
    timeout_s = 20
    out = _run_dir(one_node, tmp_path / "kill")
    a, b = _start_long_run(one_node, out, {**ENV, "POELM_DIST_TIMEOUT": str(timeout_s)})
    try:
        _kill_node(b)
        t = time.time()
        try:
            _, err = a.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("node 0 still running 60 s after node 1 was killed: a hang")
        waited = time.time() - t
    finally:
        for p in (a, b):
            _kill_node(p)
    assert a.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 0 of 2 lost the other ranks" in lines[0] and f"POELM_DIST_TIMEOUT={timeout_s} s" in lines[0], lines[0]
    assert "[rank0]: Traceback" not in err  # the worker's own error is the one line; torchrun adds its summary
    assert waited < timeout_s, waited  # a closed connection is noticed at once, not at the timeout


SILENT_PEER = """
import os, sys, time
from types import SimpleNamespace
from poelm.train.runtime import peer_failure, setup_runtime
import torch, torch.distributed as dist
rt = setup_runtime(SimpleNamespace(train=SimpleNamespace(device="cpu", dtype="fp32")))
if rt.rank == 1:
    time.sleep(30)  # alive, connected, never answering
    sys.exit(0)
t = time.time()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as e:
    print(f"{time.time() - t:.2f}|{peer_failure(e)}", flush=True)
    os._exit(3)
"""


def test_a_silent_peer_is_cut_off_by_the_timeout():
    """A rank that stops answering closes nothing; the collective gives up after
    ``POELM_DIST_TIMEOUT`` (here 2 s) instead of torch's 30 minutes, with the same one line."""
    port = free_port()
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "POELM_DIST_TIMEOUT": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", SILENT_PEER], env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, err[-2000:]
    waited, line = out.strip().split("|", 1)
    assert 1.5 <= float(waited) < 15, waited
    assert line.startswith("rank 0 of 2 lost the other ranks (Timed out waiting 2000ms") and "POELM_DIST_TIMEOUT=2 s" in line, line


def test_bad_timeout_is_refused(monkeypatch):
    from poelm.core.errors import ConfigError
    from poelm.train.runtime import dist_timeout

    monkeypatch.setenv("POELM_DIST_TIMEOUT", "2.5")
    assert dist_timeout().total_seconds() == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("POELM_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="POELM_DIST_TIMEOUT must be a positive number"):
            dist_timeout()
    monkeypatch.delenv("POELM_DIST_TIMEOUT")
    assert dist_timeout() is None
