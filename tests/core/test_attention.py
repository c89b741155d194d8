"""Attention implementations (core/attention.py): ``flex`` block masks equal the SDPA masks
element for element, and a model under ``flex`` gives ``sdpa``'s numbers (fp32, <= 1e-5) for
rows below and above the window, left-padded batches, prefill + cached decoding and speculative
rounds, with identical greedy tokens; on CPU training falls back with one warning; one FLOPs
count, by hand."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from poelm.core import attention
from poelm.core.attention import AttnPlan
from poelm.core.inputs import attention_mask, window_mask
from poelm.core.model import REFERENCE_OPS, ModelConfig, PoEGPT, attention_context
from poelm.infer.engine import Engine

TOL = 1e-5


def dense(plan: AttnPlan, B: int) -> torch.Tensor:
    """The block mask's predicate evaluated at every (query, key): what flex computes."""
    bm = plan.block_mask()
    return create_mask(bm.mask_mod, B, 1, plan.T, plan.Tk, device="cpu")


@pytest.mark.parametrize("W,T,Tk", [(5, 20, 20), (5, 4, 4), (None, 9, 9), (5, 7, 30), (None, 3, 12), (0, 6, 6)])
def test_unpadded_block_masks_equal_the_sdpa_masks(W, T, Tk):
    plan = AttnPlan("flex", W, T, Tk, None, "cpu")
    want = window_mask(T, Tk, W) if W is not None else (torch.arange(Tk)[None, :] <= torch.arange(Tk - T, Tk)[:, None])
    assert torch.equal(dense(plan, 1)[0, 0], want)


def test_padded_and_holed_block_masks_equal_the_sdpa_masks():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # left padding
                          [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                          [1, 1, 0, 1, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # speculative holes
    for W in (None, 0, 2, 4):
        for T in (10, 3, 1):
            plan = AttnPlan("flex", W, T, 10, valid, "cpu")
            assert torch.equal(dense(plan, 3), attention_mask(valid, T, W)), (W, T)


def model(impl: str, **over) -> PoEGPT:
    """A tiny reference-ops model, every weight random (no op a no-op), a 5-key short window;
    GQA 2:1 with head_dim 32 (flex's CPU kernels need >= 32, ``use_flex``)."""
    cfg = ModelConfig(**{**REFERENCE_OPS, "short_window": 5}, vocab_size=64, depth=4, n_embd=64, n_head=2, n_kv_head=1,
                      intermediate=64, max_seq_len=48, stage_layers=(2, 1, 1), attn_impl=impl, **over)
    m = PoEGPT(cfg)
    m.init_weights(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "value_embeds")):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        m.smear_lambda.fill_(0.7)
    return m.eval()


@pytest.fixture
def flex_calls(monkeypatch):
    """Every chunk of >= 1 query runs flex (eager: its reference path, the mask logic without a
    compile per shape), and the calls are counted, so a silent fallback to SDPA fails the test."""
    calls = []
    from torch.nn.attention.flex_attention import flex_attention

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return flex_attention(*a, **kw)

    monkeypatch.setattr(attention, "FLEX_MIN_QUERIES", 2)
    monkeypatch.setattr(attention, "_flex", lambda: counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's own "not compiled" notice
        yield calls


def pair():
    a, b = model("sdpa"), model("flex")
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("T", [4, 6, 30, 48], ids=lambda t: f"T{t}")
def test_flex_stage_log_probs_equal_sdpa(flex_calls, T):
    a, b = pair()
    idx = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        za, zb = a.stage_log_probs(idx), b.stage_log_probs(idx)
    assert (za - zb).abs().max().item() <= TOL
    assert bool(flex_calls) == (T - 1 > 5)  # flex only where the window binds: T <= W+1 keeps is_causal


def test_flex_left_padded_batch_equals_sdpa(flex_calls):
    a, b = pair()
    idx = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[0, :11] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        la, lb = a(idx, attention_mask=mask), b(idx, attention_mask=mask)
    real = mask.bool()
    assert (la - lb)[real].abs().max().item() <= TOL and flex_calls


def test_flex_prefill_cached_decoding_and_speculative_equal_sdpa(flex_calls):
    a, b = pair()
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 7)]
    full_a = Engine(a).generate(prompts, 20, mode="full")
    full_b = Engine(b).generate(prompts, 20, mode="full", return_logprobs=True)
    full_a_lp = Engine(a).generate(prompts, 20, mode="full", return_logprobs=True)
    assert full_a.tokens == full_b.tokens
    for ra, rb in zip(full_a_lp.logprobs, full_b.logprobs):
        assert max((x - y).abs().max().item() for x, y in zip(ra, rb)) <= TOL
    n = len(flex_calls)
    spec_b = Engine(b).generate(prompts, 20, mode="speculative", m=4)
    assert spec_b.tokens == full_a.tokens  # lossless under flex too
    assert len(flex_calls) > n  # the verify chunks (m+1 queries after cached slots) ran flex


def test_flex_compiled_once_equals_sdpa(monkeypatch):
    """The real path: ``torch.compile(flex_attention)`` on rows past the window (CPU, no grad)."""
    monkeypatch.setattr(attention, "FLEX_MIN_QUERIES", 16)
    monkeypatch.setattr(attention, "_flex_fn", None)
    a, b = pair()
    idx = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        za, zb = a.stage_log_probs(idx), b.stage_log_probs(idx)
    assert (za - zb).abs().max().item() <= TOL
    assert attention._flex_fn is not None  # it did run the compiled kernel


def test_cpu_training_under_flex_falls_back_with_one_warning(monkeypatch):
    """torch 2.13 has no flex backward on CPU: training runs SDPA (one RuntimeWarning per reason),
    loss and gradients those of ``sdpa``."""
    monkeypatch.setattr(attention, "FLEX_MIN_QUERIES", 2)
    monkeypatch.setattr(attention, "_warned", set())
    a, b = pair()
    a.train(), b.train()
    idx = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(2))
    la, _ = a.loss(idx[:, :-1], idx[:, 1:])
    with pytest.warns(RuntimeWarning, match="no flex_attention backward on CPU") as rec:
        lb, _ = b.loss(idx[:, :-1], idx[:, 1:])
        b.loss(idx[:, :-1], idx[:, 1:])
    assert sum("flex" in str(w.message) for w in rec) == 1
    la.backward(), lb.backward()
    assert (la - lb).abs().item() <= TOL
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max().item() <= TOL, n


def test_attn_impl_is_validated_and_travels_in_the_config():
    with pytest.raises(ValueError, match="model.attn_impl must be one of sdpa, flex"):
        ModelConfig(attn_impl="flash").check()
    assert ModelConfig.from_dict(ModelConfig(attn_impl="flex").to_dict()).attn_impl == "flex"
    assert ModelConfig.from_dict({"depth": 6}).attn_impl == "sdpa"  # configs written before the option


# ----------------------------------------------------------------------------- one FLOPs count
def test_flops_per_token_by_hand():
    """depth 2, width 8, 2 heads of 4, 1 KV head, MLP 16, vocab 50, rows of 10; layer 0 has a
    window of 3 keys (S), layer 1 is the last layer (always L). Per layer the matmul weights are
    c_q 64 + c_k 32 + c_v 32 + c_proj 64 + c_fc 128 + c_proj 128 = 448 (ve_gate's lookup-sized
    weight is not counted), the head 2*8*50 = 800 FLOPs, attention 4*2*4 = 32 FLOPs per key.
    Keys per query over a row of 10: S min(i+1, 4) -> 34/10 = 3.4; L (i+1) -> 55/10 = 5.5."""
    base = dict(vocab_size=50, depth=2, n_embd=8, n_head=2, n_kv_head=1, intermediate=16, max_seq_len=10, stage_layers=(1, 1),
                smear=False)  # 8 channels: the smear gate reads 24
    win = PoEGPT(ModelConfig(**base, window_pattern="SL", short_window=3)).flops_per_token()
    full = PoEGPT(ModelConfig(**base)).flops_per_token()
    assert win["per_stage"] == pytest.approx([896 + 32 * 3.4 + 800, 896 + 32 * 5.5 + 800])
    assert full["per_stage"] == pytest.approx([896 + 32 * 5.5 + 800] * 2)
    assert win["train_total"] == pytest.approx(3 * (1804.8 + 1872))
    at = PoEGPT(ModelConfig(**base, window_pattern="SL", short_window=3)).flops_per_token(context=7)
    assert at["per_stage"] == pytest.approx([896 + 32 * 4 + 800, 896 + 32 * 7 + 800])  # S capped at W+1 = 4
    assert attention_context(None, seq_len=10) == 5.5 and attention_context(3, seq_len=10) == 3.4
    with pytest.raises(TypeError):
        PoEGPT(ModelConfig(**base)).flops_per_token(10)  # positional: context or seq_len? refused


def test_log_mfu_planner_and_gpu_bench_read_one_count(monkeypatch):
    from poelm import config
    from poelm.train import plan as plan_mod

    cfg = config.load("cognica-3b")
    with torch.device("meta"):
        m = PoEGPT(cfg.model)
    count = m.flops_per_token(seq_len=cfg.seq_len)["train_total"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert plan_mod.mfu_scale(m, cfg.seq_len, "cuda:0", 12) * 12 * plan_mod.GPUS["h100"].bf16_flops == pytest.approx(count)
    assert plan_mod.plan(cfg, 12)["flops_per_token"] == pytest.approx(count)


def test_the_transformers_config_carries_attn_impl():
    from poelm.hf.configuration_poelm import PoelmConfig

    cfg = PoelmConfig(**{**ModelConfig(attn_impl="flex").to_dict()})
    assert cfg.to_poelm_dict()["attn_impl"] == "flex"
    assert ModelConfig.from_dict(PoelmConfig().to_poelm_dict()).attn_impl == "sdpa"
