"""``poelm measure`` under ``torchrun`` (2 CPU processes, gloo) against one process.

The ranks split the batches of both slices (batch b on rank b % 2) and merge their accumulators
before anything is derived (block sums and histograms summed in float64, the exact quantile tail
gathered), so every position-level figure of the 2-rank record must equal the 1-rank one: BPB per
stage / prefix, accuracy, the alpha sweep, WAND bounds / p50 / p90 / p99 / max and exits, the
routing threshold and held-out fraction, every bootstrap interval and the paired deltas against a
reference. Tolerance: relative 1e-9 on floats (float64 sums whose order may differ; measured 0:
each rank runs the very batches one process runs, and with 2 ranks each block's sum is a + b
either way), exact on integers and strings. Only the timings (elapsed, the speculative wall
clock, the speedups and the per-token times of the timing protocol), ``world_size`` and the files
written may differ. A rank that skipped the
merge of any accumulator gives figures over about half the positions, far outside the tolerance
(checked by mutation: block sums, calibration, held-out histogram, exits, the tail merge).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from poelm.train import checkpoint
from poelm.config import Config
from poelm.core.model import ModelConfig, PoEGPT
from poelm.data.tokenizer import train_tokenizer

TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "Gold is a chemical element with the symbol Au and atomic number 79.",
    "If today is Friday, then tomorrow is Saturday.",
    "CYNIC, n. A blackguard whose faulty vision sees things as they are, not as they ought to be.",
    "hacker n. A person who enjoys exploring the details of programmable systems.",
    "Solve for x: 5x + 3 = 13, so 5x = 10 and x = 2.",
]
RTOL = 1e-9
TIMINGS = {"elapsed_s", "full_s", "spec_s", "speedup", "implied_speedup", "c0_time", "ms_per_token", "record_path", "world_size",
           "calibration_written"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _ckpt(root, tok, seed):
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=4, n_embd=32, n_head=2, n_kv_head=1, intermediate=64,
                      max_seq_len=96, stage_layers=(1, 1, 1, 1))
    m = PoEGPT(cfg)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move off the zero init so that the stages differ and predict something
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    # default data config: the embedded corpus's validation split is the measured stream
    return checkpoint.save(root / f"run{seed}", 10, m, Config(model=cfg), tok, {"phase": {"name": "a"}})


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdist")
    tok = train_tokenizer(TEXTS * 4, 300)
    a, b = _ckpt(root, tok, 6), _ckpt(root, tok, 7)
    # 4096 / (4 rows x 48) = 21.3 batches per slice, so blocks of 128 straddle both ranks' batches;
    # agreement <= 0.7 gives a non-trivial tau on this untrained model (34.97% routed)
    flags = ["--split-tokens", "4096", "--calib-tokens", "2048", "--seq-len", "48", "--batch-size", "4", "--quiet",
             "--routing-metric", "agreement", "--cap", "0.7", "--block-tokens", "128", "--samples", "300",
             "--probe", "embedded", "--max-new-tokens", "6", "--against", str(b)]
    one = subprocess.run([sys.executable, "-m", "poelm", "measure", str(a), "--out", str(root / "rec1.json"), "--no-write", *flags],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "poelm",
                          "measure", str(a), *flags],  # no --out: the record and the calibration go into the checkpoint
                         capture_output=True, text=True, timeout=180, env=ENV)
    assert two.returncode == 0, two.stderr
    rec1, rec2 = (json.loads(p.read_text()) for p in (root / "rec1.json", a / "poelm_measure.json"))
    return rec1, rec2, two.stdout, a


def _compare(x, y, path, out):
    """Collect (path, x, y, rel) for every float and (path, x, y, None) for unequal other leaves."""
    if isinstance(x, dict):
        assert set(x) == set(y), path
        for k in x:
            if k not in TIMINGS:
                _compare(x[k], y[k], f"{path}.{k}", out)
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            _compare(u, v, f"{path}[{i}]", out)
    elif isinstance(x, float) or isinstance(y, float):
        rel = abs(x - y) / max(abs(x), abs(y), 1e-300)
        out.append((path, x, y, rel))
    elif x != y:
        out.append((path, x, y, None))


def test_two_ranks_give_the_one_rank_record(records):
    rec1, rec2, _, _ = records
    assert rec1["world_size"] == 1 and rec2["world_size"] == 2
    leaves = []
    _compare(rec1, rec2, "", leaves)
    unequal = [(p, x, y) for p, x, y, rel in leaves if rel is None]
    assert unequal == []
    worst = max(leaves, key=lambda t: t[3])
    assert worst[3] <= RTOL, worst
    floats = {p for p, *_ in leaves}
    for key in (".bpb.full.ci[0]", ".wand.p50[0]", ".wand.max[2]", ".routing.tau", ".routing.fraction", ".against.deltas.bpb.full.value"):
        assert key in floats, key  # the comparison really covers these figures


def test_record_is_not_degenerate(records):
    # guards the comparison above: the figures it compares carry information
    rec1, _, _, _ = records
    assert rec1["split_tokens"] == 4096 and rec1["calib_tokens"] == 2048 and rec1["wand"]["positions"] > 2000
    assert rec1["bootstrap"]["blocks"] == 32 and rec1["bpb"]["full"]["ci"][0] < rec1["bpb"]["full"]["ci"][1]
    assert 0.0 < rec1["routing"]["tau"] < 1.0 and 0.0 < rec1["routing"]["fraction"] < 1.0
    assert rec1["against"]["deltas"]["bpb.full"]["value"] != 0.0
    assert rec1["probe"]["total"] > 0 and rec1["spec"]["prompts"] > 0
    assert all(math.isfinite(v["value"]) for v in rec1["bpb"]["single"])


def test_rank_zero_alone_prints_and_writes(records):
    rec1, rec2, stdout, ckpt = records
    assert stdout.count("BPB full K") == 1 and stdout.count("record:") == 1
    assert rec2["calibration_written"] == ["calibration.json", "manifest.json"] and rec1["calibration_written"] == []
    cal = json.loads((ckpt / "calibration.json").read_text())  # written by rank 0 (1-rank run had --no-write)
    assert cal["poe_wand_p99_bounds_per_stage_head"] == rec2["wand"]["bounds"] == rec1["wand"]["bounds"]
    assert cal["poe_routing"]["tau"] == rec1["routing"]["tau"]
    checkpoint.verify(ckpt)  # the manifest was updated once, consistently
