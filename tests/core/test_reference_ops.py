"""Reference ops (``REFERENCE_OPS``): poelm against a forward written here from the facts page
(../shared/reference/nanochat-poe.md), the reference's init, old configs, windows and smear."""

import math

import pytest
import torch
import torch.nn.functional as F

from poelm.core.inputs import attention_mask, previous_slots
from poelm.core.model import POELM_OPS, REFERENCE_OPS, KVCache, ModelConfig, PoEGPT

OLD_OPS = dict(qk_scale=1.0, ve_gate_scale=2.0, ve_gate_channels=32, smear=False, window_pattern="L", rope_base=10000.0)


def reference_stage_log_probs(P: dict, cfg: dict, idx: torch.Tensor, ops: dict, detach: bool = False) -> list:
    """The reference model's per-stage log-probs, written from the facts page in plain torch (no
    poelm code): embedding + smear, per layer x0 mix, attention (value-embedding gate, RoPE
    half-split, QK-norm, q and k scaled, GQA, causal window), relu^2 MLP, stage logits
    ``15 tanh((lm_head + stage_head)(norm x) / 15)``. ``P``: tensors by poelm name; ``ops``:
    qk_scale, ve_gate_scale, ve_gate_channels, smear, window_pattern, short_window, rope_base."""
    rms = lambda t: F.rms_norm(t, (t.size(-1),))  # noqa: E731
    B, T = idx.shape
    d, H, KV, n = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["depth"]
    hd = d // H
    x = rms(P["wte.weight"][idx])
    if ops["smear"]:
        out = [x[:, 0]]
        for t in range(1, T):
            g = P["smear_lambda"] * torch.sigmoid(x[:, t, :24] @ P["smear_gate.weight"].T)
            out.append(x[:, t] + g * x[:, t - 1])
        x = torch.stack(out, 1)
    x0 = x
    inv = 1.0 / (ops["rope_base"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    L = cfg["max_seq_len"]
    S = ops.get("short_window") or math.ceil(L / 4 / 128) * 128
    pat = ops["window_pattern"]
    windows = [S if pat[i % len(pat)] == "S" else L for i in range(n)]
    windows[-1] = L
    ends, acc = [], 0
    for s in cfg["stage_layers"]:
        acc += s
        ends.append(acc)
    logps = []
    for i in range(n):
        if detach and i in ends[:-1]:
            x = x.detach()
        x = P["resid_lambdas"][i] * x + P["x0_lambdas"][i] * x0
        h = rms(x)
        pre = f"blocks.{i}.attn."
        q = (h @ P[pre + "c_q.weight"].T).view(B, T, H, hd)
        k = (h @ P[pre + "c_k.weight"].T).view(B, T, KV, hd)
        v = (h @ P[pre + "c_v.weight"].T).view(B, T, KV, hd)
        if i % 2 == (n - 1) % 2:
            c = ops["ve_gate_channels"]
            gate = ops["ve_gate_scale"] * torch.sigmoid(h[..., :c] @ P[pre + "ve_gate.weight"].T)
            v = v + gate.unsqueeze(-1) * P[f"value_embeds.{i}.weight"][idx].view(B, T, KV, hd)

        def rope(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
            return torch.cat([t1 * cos + t2 * sin, -t1 * sin + t2 * cos], -1)

        q, k = rms(rope(q)) * ops["qk_scale"], rms(rope(k)) * ops["qk_scale"]
        k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        allowed = (dist >= 0) & (dist <= windows[i])
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, d)
        x = x + y @ P[pre + "c_proj.weight"].T
        h = rms(x)
        x = x + F.relu(h @ P[f"blocks.{i}.mlp.c_fc.weight"].T).square() @ P[f"blocks.{i}.mlp.c_proj.weight"].T
        if i + 1 in ends:
            kk = ends.index(i + 1)
            hn = rms(x)
            logits = (hn @ P["lm_head.weight"].T + hn @ P[f"stage_heads.{kk}.weight"].T).float()
            logps.append(F.log_softmax(15 * torch.tanh(logits / 15), -1))
    return logps


TINY = dict(vocab_size=300, depth=5, n_embd=48, n_head=4, n_kv_head=2, intermediate=96, stage_layers=(2, 2, 1))


def build(ops: dict, max_seq_len=64, seed=0, **kw) -> PoEGPT:
    """A tiny model with every weight non-trivial: zero-initialised tensors (stage heads, c_proj,
    smear lambda) perturbed, gates large enough to matter."""
    m = PoEGPT(ModelConfig(**{**TINY, **ops, "max_seq_len": max_seq_len, **kw}))
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if ("gate" in name or "lambda" in name) else 0.05))
    return m.eval()


REF_SMALL = {**REFERENCE_OPS, "short_window": 7}


@pytest.mark.parametrize("ops,max_seq_len,T", [(REF_SMALL, 64, 40), (REFERENCE_OPS, 256, 150), (OLD_OPS, 64, 40)],
                         ids=["reference-S7", "reference-formula-S128", "poelm-ops"])
def test_stage_log_probs_equal_reference_forward(ops, max_seq_len, T):
    m = build(ops, max_seq_len)
    assert m.windows[:4] == ([7, 7, 7, None] if ops is REF_SMALL else [128] * 3 + [None] if max_seq_len == 256 else [None] * 4)
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(3))
    P = dict(m.named_parameters())
    with torch.no_grad():
        ref = reference_stage_log_probs(P, m.config.to_dict(), idx, {**OLD_OPS, **ops})
        got = m.stage_log_probs(idx)
    err = max((g - r).abs().max().item() for g, r in zip(got, ref))
    assert err < 1e-5, err
    if ops is not OLD_OPS:  # the ops matter: the old model on the same weights is far off
        m_old = PoEGPT(ModelConfig(**{**m.config.to_dict(), **OLD_OPS, "smear": True, "ve_gate_channels": 12}))
        m_old.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert (m_old.eval().stage_log_probs(idx) - got).abs().max() > 0.1


def test_local_learning_loss_and_gradients_equal_reference():
    m = build(REF_SMALL).train()
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(5))
    P = {k: p.detach().clone().requires_grad_(True) for k, p in m.named_parameters()}
    logps = reference_stage_log_probs(P, m.config.to_dict(), idx, {**OLD_OPS, **REF_SMALL}, detach=True)
    ref_loss = sum(F.nll_loss(z.flatten(0, 1), y.flatten()) for z in logps) / 3  # sum_k CE_k / K at alpha 0
    ref_loss.backward()
    loss, _ = m.backward_local(idx, y)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for name, p in m.named_parameters():
        if name == "backout_lambda":  # stage logits never use it (the reference's plain-head backout);
            # the loss adds 0 x backout_lambda.sum() as the reference's does: a zero gradient
            assert P[name].grad is None and torch.equal(p.grad, torch.zeros_like(p))
            continue
        assert torch.allclose(p.grad, P[name].grad, atol=1e-6, rtol=1e-4), name


def test_window_sizes_and_bad_patterns():
    cfg = ModelConfig(depth=6, stage_layers=(3, 1, 1, 1), max_seq_len=2048, window_pattern="SSSL")
    assert cfg.window_sizes() == [512, 512, 512, 2048, 512, 2048]  # last layer always L; S = 512 at 2048
    assert ModelConfig(depth=3, stage_layers=(3,), max_seq_len=600, window_pattern="sl").window_sizes() == [256, 600, 600]
    assert ModelConfig(depth=2, stage_layers=(2,), window_pattern="S", short_window=5).window_sizes() == [5, 256]
    for bad in ("SXL", "", "S L"):
        with pytest.raises(ValueError, match="window_pattern"):
            PoEGPT(ModelConfig(window_pattern=bad))
    with pytest.raises(ValueError, match="model.init"):
        ModelConfig(init="xavier").check()
    with pytest.raises(ValueError, match="short_window"):
        ModelConfig(short_window=-1).check()


def test_window_mask_counts_real_positions():
    valid = torch.tensor([[False, False, True, True, True, True]])
    m = attention_mask(valid, 6, window=1)[0, 0]
    assert m[5].tolist() == [False, False, False, False, True, True]  # position 3 sees positions 2, 3
    assert m[2].tolist() == [False, False, True, False, False, False]  # the first real token sees itself
    holes = torch.tensor([[True, False, True, True]])  # a rejected slot between positions 0 and 1
    assert attention_mask(holes, 1, window=1)[0, 0, 0].tolist() == [False, False, True, True]
    assert attention_mask(holes, 2, window=1)[0, 0, 0].tolist() == [True, False, True, False]
    prev, has = previous_slots(holes)
    assert prev.tolist() == [[0, 0, 0, 2]] and has.tolist() == [[False, True, True, True]]


# A checkpoint's config.json as poelm wrote it before the reference ops existed (and before
# optim.optimizer): no op keys, so each means what the defaults were then (POELM_OPS).
OLD_SAVED = {"model": {"vocab_size": 300, "depth": 5, "n_embd": 48, "n_head": 4, "n_kv_head": 2, "intermediate": 96,
                       "max_seq_len": 64, "stage_layers": [2, 2, 1], "value_embeds": True, "softcap": 15.0,
                       "rope_base": 10000.0, "objective": "poe", "alpha_train": 0.0},
             "optim": {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5, "weight_decay": 0.0,
                       "muon_momentum": 0.95, "muon_ns_steps": 5, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_eps": 1e-10,
                       "grad_clip": 0.0}}


def test_old_config_dict_loads_to_old_model():
    """A config written before this change (keys missing) means what it meant: poelm's old model
    and optimizer, through every reader of a saved config; today's defaults are the reference's."""
    from poelm import config
    from poelm.hf.configuration_poelm import PoelmConfig

    cfg = ModelConfig.from_dict(OLD_SAVED["model"])
    assert (cfg.qk_scale, cfg.ve_gate_scale, cfg.ve_gate_channels, cfg.smear, cfg.window_pattern, cfg.rope_base, cfg.backout, cfg.init) == \
        (1.0, 2.0, 32, False, "L", 10000.0, False, "poelm")
    assert cfg == ModelConfig(**TINY, max_seq_len=64, **POELM_OPS)
    saved = config.validate(config.from_saved(OLD_SAVED))
    assert saved.model == cfg and saved.optim.optimizer == "poelm"
    assert ModelConfig.from_dict(PoelmConfig(**OLD_SAVED["model"]).to_poelm_dict()) == cfg  # an old export's config.json
    m = PoEGPT(cfg)
    assert not any(n.startswith(("smear", "backout")) for n, _ in m.named_parameters())
    m.init_weights(0)
    assert m.x0_lambdas.eq(0.1).all() and m.resid_lambdas.eq(1.0).all() and m.wte.weight.std().item() == pytest.approx(1.0, abs=0.02)
    fresh = config.load(None)  # a new config without those keys: the reference's model and optimizer
    assert {k: getattr(fresh.model, k) for k in REFERENCE_OPS} == REFERENCE_OPS and fresh.optim.optimizer == "nanochat"
    assert REFERENCE_OPS["window_pattern"] == "SSSL" and REFERENCE_OPS["init"] == "nanochat"
    assert {k: POELM_OPS[k] for k in OLD_OPS} == OLD_OPS  # this file's independent statement of the old ops


def test_nanochat_init_statistics():
    cfg = ModelConfig(vocab_size=512, depth=4, n_embd=256, n_head=4, n_kv_head=2, intermediate=1024, stage_layers=(2, 1, 1))
    m = PoEGPT(cfg)
    m.init_weights(0)
    s = math.sqrt(3) / math.sqrt(256)
    assert abs(m.wte.weight.std().item() - 0.8) < 0.01 and abs(m.wte.weight.mean().item()) < 0.01
    assert abs(m.lm_head.weight.std().item() - 0.001) < 2e-5
    assert all(h.weight.eq(0).all() for h in m.stage_heads)
    for b in m.blocks:
        for w, bound in ((b.attn.c_q.weight, s), (b.attn.c_k.weight, s), (b.attn.c_v.weight, s), (b.mlp.c_fc.weight, 0.4 * s)):
            assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
        assert b.attn.c_proj.weight.eq(0).all() and b.mlp.c_proj.weight.eq(0).all()
        if b.attn.ve_gate is not None:
            assert b.attn.ve_gate.weight.min() >= 0 and b.attn.ve_gate.weight.max() <= 0.02 and b.attn.ve_gate.weight.shape == (2, 12)
    for ve in m.value_embeds.values():
        assert ve.weight.abs().max() <= s and ve.weight.abs().max() > 0.98 * s
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(m.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert m.smear_lambda.item() == 0 and m.smear_gate.weight.shape == (1, 24)
    assert m.smear_gate.weight.min() >= 0 and m.smear_gate.weight.max() <= 0.02
    assert m.backout_lambda.item() == pytest.approx(0.2)
    pc = m.param_count()
    assert pc["total"] == sum(p.numel() for p in m.parameters()) and pc["scalars"] == 4 + 4 + 24 + 1 + 1


def test_flops_count_windows():
    full = PoEGPT(ModelConfig(**TINY, max_seq_len=256, window_pattern="L")).flops_per_token()
    win = PoEGPT(ModelConfig(**TINY, max_seq_len=256, window_pattern="SSSL", short_window=15)).flops_per_token()
    att = 4 * 4 * 12  # 4 * n_head * head_dim per key
    # layers 0-2 are S: mean keys over a 256-row = (16*17/2 + 240*16) / 256 instead of 257/2
    mean_ctx = (16 * 17 / 2 + 240 * 16) / 256
    assert full["total"] - win["total"] == pytest.approx(3 * att * (128.5 - mean_ctx))
    at = PoEGPT(ModelConfig(**TINY, max_seq_len=256, window_pattern="SSSL", short_window=15)).flops_per_token(context=100)
    assert PoEGPT(ModelConfig(**TINY, max_seq_len=256, window_pattern="L")).flops_per_token(context=100)["total"] - at["total"] == pytest.approx(3 * att * 84)


@pytest.mark.parametrize("ops", [REF_SMALL, OLD_OPS], ids=["reference", "poelm-ops"])
def test_cached_decoding_token_by_token_equals_uncached(ops):
    m = build(ops)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = m.stage_log_probs(idx)
        cache = KVCache(m.config, 2, 64)
        steps = [m.stage_log_probs(idx[:, :5], cache=cache, pos=0)]  # a prefill, then one token at a time
        steps += [m.stage_log_probs(idx[:, t : t + 1], cache=cache, pos=t) for t in range(5, 18)]
        steps.append(m.stage_log_probs(idx[:, 18:], cache=cache, pos=18))  # a chunk after cached positions
    got = torch.cat(steps, dim=2)
    assert (got - full).abs().max() < 1e-5
    cache.truncate(10)  # rollback, then redo: the smear memory rolls back with the keys
    with torch.no_grad():
        again = torch.cat([m.stage_log_probs(idx[:, t : t + 1], cache=cache, pos=t) for t in range(10, 30)], dim=2)
    assert (again - full[:, :, 10:]).abs().max() < 1e-5


def test_config_validate_reports_bad_reference_ops_as_one_line():
    from poelm import config
    from poelm.core.errors import ConfigError

    for setting, words in (('model.window_pattern="SXL"', "window_pattern"), ('model.init="xavier"', "model.init"),
                           ("model.ve_gate_channels=0", "ve_gate_channels")):
        with pytest.raises(ConfigError, match=words) as e:
            config.load(None, [setting])
        assert "\n" not in str(e.value)
    cfg = config.load(None, ['model.window_pattern="SSSL"', "model.smear=true", "model.qk_scale=1.2"])
    assert cfg.model.window_sizes()[:4] == [128, 128, 128, 256] and cfg.model.smear


def test_narrow_models_keep_their_clamped_gate():
    m = PoEGPT(ModelConfig(vocab_size=300, depth=2, n_embd=16, n_head=2, n_kv_head=1, intermediate=32, stage_layers=(1, 1), **POELM_OPS))
    assert m.blocks[1].attn.ve_gate.weight.shape == (1, 16)  # min(32, n_embd), as before the options existed
    with pytest.raises(ValueError, match="smear_channels"):
        ModelConfig(n_embd=16, n_head=2, smear=True).check()
