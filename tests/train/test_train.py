"""Training loop: learning, exact resume, continual phase anchoring, and clean failures."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from poelm.train import checkpoint
from poelm import config
from poelm.train import loop as train
from poelm.schedule import lrm

TINY = [
    "model.vocab_size=320", "model.depth=3", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1",
    "model.intermediate=64", "model.max_seq_len=64", "model.stage_layers=[1,1,1]",
    "train.seq_len=32", "train.device_batch_size=4", "train.eval_every=0", "train.eval_tokens=2048",
    "train.log_every=1", "data.tokenizer_train_chars=200000",
    "schedule.steps=6", "schedule.warmup=2", "schedule.warmdown_ratio=0.5",
]


def tiny_cfg(*extra):
    return config.load("embedded", TINY + list(extra))


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train.train(tiny_cfg("train.save_every=3"), out, progress=False)
    return out


def test_exact_resume_is_bitwise(straight, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    # the first half of the same run: copy the step-3 checkpoint, then resume it to the end
    shutil.copytree(straight / "step-00003", half / "step-00003")
    shutil.copy(straight / "tokenizer.json", half / "tokenizer.json")
    cfg = checkpoint.load(half / "step-00003").config
    train.train(cfg, half, resume=half / "step-00003", progress=False)
    a = load_file(str(straight / "step-00006" / "model.safetensors"))
    b = load_file(str(half / "step-00006" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(straight)[3:] == _losses(half)
    oa = load_file(str(straight / "step-00006" / "optim.safetensors"))
    ob = load_file(str(half / "step-00006" / "optim.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_checkpoint_meta_and_manifest(straight):
    meta = json.loads((straight / "step-00006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["rel_step"] == 6 and meta["tokens"] == 6 * 4 * 32
    assert meta["lrm"] == pytest.approx(0.05)  # final lrm of the phase
    assert meta["train_val_bpb"] > 0
    checkpoint.verify(straight / "step-00006")
    assert checkpoint.latest(straight).name == "step-00006"


def test_training_lowers_the_loss(tmp_path):
    out = tmp_path / "learn"
    train.train(tiny_cfg("schedule.steps=30", "schedule.warmup=3"), out, progress=False)
    losses = _losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_continual_phase_is_anchored_and_restores_optimizer(straight, tmp_path):
    out = tmp_path / "cont"
    train.continue_phase(straight / "step-00006", out, steps=4, progress=False, overrides=["train.save_every=2"])
    seed = json.loads((out / "step-00006" / "meta.json").read_text())
    assert seed["rel_step"] == 0 and seed["lrm"] == 0.0 and seed["phase"]["start_step"] == 6 and seed["phase"]["name"] == "b2"
    # the seed holds the resumed weights and optimizer state unchanged
    a = load_file(str(straight / "step-00006" / "model.safetensors"))
    b = load_file(str(out / "step-00006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(str(straight / "step-00006" / "optim.safetensors"))
    ob = load_file(str(out / "step-00006" / "optim.safetensors"))
    assert any("momentum_buffer" in k for k in oa) and all(torch.equal(oa[k], ob[k]) for k in oa)
    last = json.loads((out / "step-00010" / "meta.json").read_text())
    assert last["rel_step"] == 4 and last["tokens_in_phase"] == 4 * 4 * 32 and last["tokens"] == 10 * 4 * 32
    ph = checkpoint.load(out / "step-00010").config.schedule.phase(start_step=6)
    assert lrm(6, ph) == 0.0
    assert lrm(6 + ph.warmdown_start - 1, ph) == ph.peak


def test_continual_phase_rejects_architecture_change(straight, tmp_path):
    from poelm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="changes the architecture"):
        train.continue_phase(straight / "step-00006", tmp_path / "c2", steps=2, progress=False, overrides=["model.intermediate=128"])
    assert not (tmp_path / "c2").exists() or not any((tmp_path / "c2").iterdir())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "poelm", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs_exit_2_with_one_line(straight, tmp_path):
    r = _cli("train", "--config", "embedded", "--set", "model.depth=5", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: model.stage_layers") and "Traceback" not in r.stderr
    r = _cli("train", "--set", "data.path=/nonexistent/corpus.txt", "--out", str(tmp_path / "y"), "--quiet")
    assert r.returncode == 2 and "/nonexistent/corpus.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a truncated checkpoint is reported, not half-read, and nothing is touched
    bad = tmp_path / "bad"
    shutil.copytree(straight / "step-00003", bad / "step-00003")
    f = bad / "step-00003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = sorted(p.name for p in bad.iterdir())
    r = _cli("train", "--resume", str(bad / "step-00003"), "--quiet")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in bad.iterdir()) == before
    r = _cli("train", "--resume", str(straight / "step-00003"), "--set", "model.depth=4", "--quiet", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "only train.* settings may change" in r.stderr


def test_train_compile_flag_compiles_every_block_in_place_and_is_validated():
    from poelm.core.errors import ConfigError

    cfg = tiny_cfg("train.compile=true")
    assert cfg.train.compile is True and tiny_cfg().train.compile is False
    rt = train.setup_runtime(tiny_cfg("train.device=\"cpu\""))
    try:
        model = train._build_model(cfg, rt)
        plain = train._build_model(tiny_cfg(), rt)
    finally:
        train.teardown_runtime(rt)
    # compiled lazily on the first call (not run here: inductor needs minutes on a loaded CPU);
    # nn.Module.compile keeps parameter names, so checkpoints and optimizer groups are unchanged
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert all(b._compiled_call_impl is None for b in plain.blocks)
    assert list(model.state_dict()) == list(plain.state_dict())
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        tiny_cfg('train.compile="yes"')
