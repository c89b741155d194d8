"""bench/gpu.py's CPU smoke mode (``--device cpu --tiny``): the whole GPU check, every section,
through the same code the H200 run takes (the training section through ``torchrun``), in
seconds; with tqdm, huggingface_hub, transformers and lm_eval made unimportable, since the GPU
machine's python3 has no tqdm or huggingface_hub and the check must not need them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("tqdm", "huggingface_hub", "transformers", "lm_eval")


def _blocker(tmp: Path) -> Path:
    d = tmp / "blocked"
    for name in BLOCKED:
        (d / name).mkdir(parents=True)
        (d / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return d


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-bench")
    out = tmp / "bench-gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_blocker(tmp)), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--repeats", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_every_section_ran_without_error(smoke):
    res, stdout = smoke
    for name in ("train", "decode", "measure", "exactness"):
        assert name in res and "error" not in res[name], (name, res.get(name))
        assert res[name]["section_s"] > 0
    assert res["env"]["device"] == "cpu" and res["env"]["torch"]
    assert "FAILED" not in stdout and "wrote" in stdout
    for head in ("train (fp32", "decode (", "measure:", "exactness:"):
        assert head in stdout, head


def test_train_section_runs_the_loop_under_torchrun(smoke):
    tr = smoke[0]["train"]
    assert tr["returncode"] == 0 and tr["world_size"] == 1
    assert tr["nccl"] == "gloo: all_reduce, reduce_scatter, all_gather, broadcast ok"  # NCCL on the GPU
    names = [v["name"] for v in tr["variants"]]
    assert names == ["PoE K=4", "K=1", "PoE K=4 SSSL sdpa", "PoE K=4 SSSL flex"]  # compile variants only on CUDA
    k4, k1, sw, fx = tr["variants"]
    assert k4["stages"] == [2, 1, 1, 1] and k1["stages"] == [5] and sw["stages"] == fx["stages"] == k4["stages"]
    assert sw["flops_per_token"] < k4["flops_per_token"]  # S layers attend within 8 of 32 keys
    assert fx["flops_per_token"] == sw["flops_per_token"]  # the kernel changes time, not the count
    # CPU training under flex runs SDPA (no flex backward on CPU): the same losses
    assert fx["loss_first_last"] == pytest.approx(sw["loss_first_last"], abs=1e-5)
    for v in (k4, k1, sw, fx):
        assert v["tokens_per_s"] > 0 and v["steps_timed"] == 2 and all(math.isfinite(x) for x in v["loss_first_last"])
        assert v["plan_bytes"] > 0 and sum(v["plan_parts"].values()) == v["plan_bytes"]  # poelm plan's prediction
        assert "mfu" not in v and "peak_allocated_bytes" not in v  # CUDA-only figures are not invented on a CPU
    assert k4["flops_per_token"] > k1["flops_per_token"]  # three more vocabulary heads


def test_decode_section_modes_and_limits(smoke):
    dec = smoke[0]["decode"]
    m, c0 = dec["m"], dec["c0_flops"]
    for B in ("1", "8"):
        rows = dec["batches"][B]
        assert set(rows) == {"full", "speculative", "wand", "route", "stage=0", "limits"}
        assert rows["speculative"]["identical_to_full"] and rows["full"]["speedup"] == 1.0
        assert 0 < rows["speculative"]["acceptance"] <= 1
        assert rows["limits"]["speculative_flops"] == pytest.approx((m + 1) / (m * c0 + 1 - c0))
        assert all(rows[k]["tokens_per_s"] > 0 for k in ("full", "speculative", "wand", "route", "stage=0"))
    assert len(dec["wand_p99_bounds"]) == len(dec["stage_layers"]) - 1 and 0 <= dec["route_tau"] <= 1


def test_measure_and_exactness_sections(smoke):
    res = smoke[0]
    me = res["measure"]
    assert me["measure_tokens_per_s"] > 0 and me["cost_vs_eval"] > 1.0  # measure does the eval forward's work and more
    ex = res["exactness"]
    assert ex["spec_identical_float32_b1"] and ex["spec_identical_float32_b8"] and ex["spec_identical_fp32_recheck_b1"]
    # CPU vs CPU: the same init and rows give the same losses, so on a GPU the difference is the device's
    assert len(ex["train_losses_cpu"]) == 10 and ex["train_losses_cpu"] == ex["train_losses_device"]
    assert ex["train_loss_rel_diff_max"] == 0.0


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    g = _load_bench()

    def broken(a, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(g, "section_measure", broken)
    out = tmp_path / "b.json"
    assert g.main(["--device", "cpu", "--tiny", "--sections", "measure,exactness", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["measure"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "error" not in res["exactness"] and res["exactness"]["train_loss_rel_diff_max"] == 0.0
    assert "measure: FAILED RuntimeError" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    g = _load_bench()
    assert g.main(["--device", "cpu", "--sections", "train,speed", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown section 'speed': use train,decode,measure,exactness"
    assert not (tmp_path / "x.json").exists()
