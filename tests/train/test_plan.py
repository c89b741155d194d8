"""``poelm plan``: parameter and optimizer bytes equal a real instantiation, the activation
estimate is within 25% of the peak measured on CPU, bad input is one line and exit 2."""

import json
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poelm import config
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train import plan as planmod
from poelm.train.optim import build_optimizer

SMALL = [
    dict(vocab_size=512, depth=6, n_embd=128, n_head=4, n_kv_head=2, intermediate=512, max_seq_len=128, stage_layers=(4, 2)),
    dict(vocab_size=2048, depth=4, n_embd=64, n_head=2, n_kv_head=1, intermediate=256, max_seq_len=128, stage_layers=(1, 3)),
]


def small_cfg(i, *extra):
    m = SMALL[i]
    sets = [f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in m.items()]
    return config.load(None, sets + ["train.device_batch_size=4", "train.dtype=\"fp32\"", *extra])


def real_model(i, **over):
    torch.manual_seed(0)
    m = PoEGPT(ModelConfig(**{**SMALL[i], **over}))
    m.init_weights(seed=0)
    return m


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("objective", ["poe", "bp"])
def test_parameter_and_optimizer_bytes_equal_a_real_instantiation(i, objective):
    cfg = small_cfg(i, f'model.objective="{objective}"')
    p = planmod.plan(cfg, world=1)
    m = real_model(i, objective=objective)
    assert p["memory"]["parameters"] == sum(t.numel() * t.element_size() for t in m.parameters())
    assert p["memory"]["gradients"] == p["memory"]["parameters"]
    opt = build_optimizer(m, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    m.loss(x, x)[0].backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert p["state_per_rank"] == [state_bytes] and p["memory"]["optimizer_state"] == state_bytes
    assert opt.owned_state_numel() * 4 == state_bytes


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        m = real_model(0, vocab_size=515)  # odd row count: zero-padded shards
        opt = build_optimizer(m, config.OptimConfig(), world_size=world, rank=rank)
        x = torch.randint(0, 515, (2, 16), generator=torch.Generator().manual_seed(0))
        m.loss(x, x)[0].backward()
        opt.step()
        with open(f"{out}/r{rank}.json", "w") as f:
            json.dump(opt.owned_state_numel(), f)
    finally:
        dist.destroy_process_group()


def test_optimizer_state_per_rank_equals_zero2_on_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    real = [json.loads((tmp_path / f"r{r}.json").read_text()) * 4 for r in range(2)]
    p = planmod.plan(small_cfg(0, "model.vocab_size=515"), world=2)
    assert p["state_per_rank"] == real
    whole = planmod.plan(small_cfg(0, "model.vocab_size=515"), world=1)["state_per_rank"][0]
    assert max(real) < 0.75 * whole  # sharded: each rank holds about half the matrices, half of every large AdamW tensor


@pytest.mark.parametrize("i", [0, 1])
def test_activation_estimate_within_25_percent_of_measured_peak(i):
    torch.set_num_threads(1)
    cfg = small_cfg(i)
    m = real_model(i)
    for q in m.parameters():  # gradients exist already: only activations are measured
        q.grad = torch.zeros_like(q)
    B, T = cfg.train.device_batch_size, cfg.seq_len
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g), torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    measured = planmod.peak_allocated_bytes(lambda: m.backward_local(x, y))
    est = planmod.activation_bytes(cfg.model, B, T, bf16=False)
    p = planmod.plan(cfg, world=1)
    assert p["memory"]["activations"] + p["memory"]["head_chunk"] == est["total"]
    assert abs(est["total"] - measured) <= 0.25 * measured, (est, measured)
    assert est["stage"] == (0 if i == 0 else 1)  # the largest stage is the one planned


def test_peak_allocated_bytes_by_hand():
    def f():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = b + 1  # 8 MB live again, never 12
        del b, c
    assert planmod.peak_allocated_bytes(f) == pytest.approx(8_000_000, rel=1e-3)


def test_card_preset_plan_and_a_suggested_batch_that_fits():
    cfg = config.load("cognica-3b")
    p = planmod.plan(cfg, world=12, gpu="h100", mfu=0.4)
    assert p["tokens_per_step"] == 786_432 and p["accum"] == 4
    assert p["fits"]
    ftok = p["flops_per_token"]
    assert p["step_s"] == pytest.approx(786_432 * ftok / (12 * 989.4e12 * 0.4))
    assert p["budget_tokens"] == 83_923 * 786_432
    big = config.load("cognica-3b", ["train.device_batch_size=64"])
    q = planmod.plan(big, world=6, gpu="a100")
    assert not q["fits"] and q["suggestion"] is not None
    ok = planmod.plan(config.load("cognica-3b", [f"train.device_batch_size={q['suggestion']}"]), world=6, gpu="a100")
    assert ok["fits"]
    larger = [b for b in range(q["suggestion"] + 1, 64) if 786_432 % (b * 2048 * 6) == 0]
    for b in larger:  # every larger batch that divides the global batch does not fit
        assert not planmod.plan(config.load("cognica-3b", [f"train.device_batch_size={b}"]), world=6, gpu="a100")["fits"]


def _cli(capsys, *args):
    from poelm import cli

    rc = cli.main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_plan_prints_the_card_plan(capsys):
    rc, out, err = _cli(capsys, "--config", "cognica-3b", "--world", 12)
    assert rc == 0, err
    for needle in ("12 x H100", "optimizer state (ZeRO-2 shard)", "activations, stage 0", "head / logit chunk", "fits",
                   "786,432 tokens per step", "4 micro-steps", "FLOPs per token", "66.00B tokens"):
        assert needle in out, needle


@pytest.mark.parametrize("args, message", [
    (["--world", 5], r"does not split over 5 ranks"),
    (["--world", 12, "--gpu", "v100"], r"unknown GPU 'v100'"),
    (["--world", 12, "--mfu", 0], r"--mfu must be in \(0, 1\]"),
    (["--world", 12, "--mfu", 1.5], r"--mfu must be in \(0, 1\]"),
    (["--world", 12, "--mfu", "nan"], r"--mfu must be in \(0, 1\]"),
    (["--world", 0], r"--world must be a positive integer"),
])
def test_cli_plan_bad_input_is_one_line_exit_2(capsys, args, message):
    import re

    rc, out, err = _cli(capsys, "--config", "cognica-3b", *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), err


def test_plan_counts_sliding_window_attention():
    """``model.window_pattern``: S layers cost attention over their window's mean context."""
    full = planmod.plan(small_cfg(0), world=1)
    win = planmod.plan(small_cfg(0, 'model.window_pattern="SSL"', "model.short_window=31"), world=1)
    # S layers 0, 1, 3, 4 of depth 6 (SSL tiled: S S L S S L); a 128-row: mean keys (32*33/2 + 96*32)/128 instead of 129/2
    per_key = 4 * 4 * 32
    assert full["flops_per_token"] - win["flops_per_token"] == pytest.approx(3 * 4 * per_key * (64.5 - (32 * 33 / 2 + 96 * 32) / 128))
    assert "4 sliding-window layers of 31 keys" in planmod.format_plan(win, "small") and "sliding" not in planmod.format_plan(full, "small")
