import math

import pytest
import torch

from poelm.core import poe
from poelm.core.model import REFERENCE_OPS, KVCache, ModelConfig, PoEGPT

# The reference's ops with a 3-key short window (rows below run past it); smear on.
REF = {**REFERENCE_OPS, "short_window": 3}
OPS = pytest.mark.parametrize("ops", [{}, REF], ids=["poelm-ops", "reference-ops"])


def tiny(**kw):
    base = dict(vocab_size=300, depth=4, n_embd=32, n_head=4, n_kv_head=2, intermediate=64, max_seq_len=32, stage_layers=(2, 1, 1))
    base.update(kw)
    m = PoEGPT(ModelConfig(**base))
    m.init_weights(seed=0)
    return m


def _perturb(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_stage_heads_zero_at_init_all_stages_predict_like_shared_head():
    m = tiny()
    idx = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    hs = m.hiddens(idx)
    for k, h in enumerate(hs):
        assert torch.count_nonzero(m.stage_heads[k].weight) == 0
        shared = poe.softcap(torch.nn.functional.linear(torch.nn.functional.rms_norm(h, (32,)), m.lm_head.weight).float(), 15.0)
        assert torch.equal(m.stage_logits(k, h), shared)


def test_stage_detach_gradient_of_later_stage_loss_is_zero_in_earlier_blocks():
    m = tiny()
    _perturb(m)
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    hs = m.hiddens(idx)
    ce2 = torch.nn.functional.cross_entropy(m.stage_logits(2, hs[2]).flatten(0, 1), y.flatten())
    ce2.backward()
    for i in (0, 1):  # blocks of stage 0
        for p in m.blocks[i].parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in m.blocks[3].parameters())
    assert torch.count_nonzero(m.wte.weight.grad) > 0  # shared: x0 residual reaches every stage


def test_bp_objective_backpropagates_through_whole_trunk():
    m = tiny(objective="bp")
    _perturb(m)
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    loss, ces = m.loss(idx, y)
    loss.backward()
    assert torch.allclose(loss, ces[-1])
    assert torch.count_nonzero(m.blocks[0].attn.c_q.weight.grad) > 0


def test_poe_loss_is_mean_of_stage_ces_and_alpha_train_scales():
    m = tiny()
    _perturb(m)
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    loss, ces = m.loss(idx, y)
    assert torch.allclose(loss, ces.mean(), atol=1e-6)
    m.config.alpha_train = 1.0
    loss1, ces1 = m.loss(idx, y)
    assert torch.allclose(loss1, ces1.sum(), atol=1e-6)


def test_forward_stage_prefix_and_full_match_poe_math():
    m = tiny().eval()
    _perturb(m)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = m.stage_log_probs(idx)
        assert z.shape == (3, 2, 9, 300)
        assert torch.allclose(m(idx), poe.aggregate(z), atol=1e-6)
        assert torch.allclose(m(idx, stages=1), z[1], atol=1e-6)
        assert torch.allclose(m(idx, stages=range(2)), poe.prefix(z, 2), atol=1e-6)
        # geometric mean by hand
        manual = torch.log_softmax(z.mean(0), -1)
        assert torch.allclose(m(idx), manual, atol=1e-6)


def test_kv_cache_incremental_equals_full_and_refuses_gaps():
    m = tiny().eval()
    _perturb(m)
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = m.stage_log_probs(idx)
        cache = KVCache(m.config, 2, 32)
        parts = [m.stage_log_probs(idx[:, :7], cache=cache, pos=0)]
        for t in range(7, 20):
            parts.append(m.stage_log_probs(idx[:, t : t + 1], cache=cache, pos=t))
        inc = torch.cat(parts, dim=2)
    assert torch.allclose(inc, full, atol=1e-5)
    cache2 = KVCache(m.config, 2, 32)
    with pytest.raises(RuntimeError, match="gap"):
        with torch.no_grad():
            m.stage_log_probs(idx[:, 5:6], cache=cache2, pos=5)


def test_gqa_and_value_embeds_layout():
    m = tiny()
    assert m.blocks[0].attn.c_k.weight.shape == (16, 32)  # n_kv_head * head_dim = 2 * 8
    # alternating layers with the last one included (depth 4 -> layers 1 and 3)
    assert sorted(m.value_embeds.keys()) == ["1", "3"]
    assert tiny(value_embeds=False).param_count()["value_embeds"] == 0


def test_reference_preset_instantiates_on_meta_with_about_3b_params():
    from poelm import config

    cfg = config.load("cognica-3b")
    with torch.device("meta"):
        m = PoEGPT(cfg.model)
    pc = m.param_count()
    assert 2.9e9 < pc["total"] < 3.1e9
    # 16 value-embedding tables of vocab x kv_dim = 32768 x 1024 ("~0.54B")
    assert pc["value_embeds"] == 16 * 32768 * 1024
    f = m.flops_per_token()
    assert len(f["per_stage"]) == 4 and math.isclose(sum(f["per_stage"]), f["total"])
    assert f["per_stage"][0] > f["per_stage"][1] > f["per_stage"][3] * 0.99


def test_k1_is_plain_gpt():
    m = tiny(stage_layers=(4,))
    idx = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z = m.stage_log_probs(idx)
        assert torch.allclose(m(idx), z[0], atol=1e-6)


def test_stage_by_stage_backward_matches_one_backward():
    a = tiny()
    _perturb(a)
    b = tiny()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(9))
    la, ca = a.loss(idx, y)
    (la * 0.25).backward()
    lb, cb = b.backward_local(idx, y, scale=0.25)
    assert torch.allclose(la, lb) and torch.equal(ca, cb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=1e-5), name
    with pytest.raises(ValueError, match="objective='poe'"):
        tiny(objective="bp").backward_local(idx, y)


def test_positions_and_attention_mask_by_hand():
    from poelm.core.inputs import attention_mask, positions_from_mask

    valid = torch.tensor([[False, False, True, True], [True, True, False, True]])  # left pad; a hole
    assert positions_from_mask(valid).tolist() == [[0, 0, 0, 1], [0, 1, 1, 2]]
    m = attention_mask(valid, 2)  # the last two slots are queries
    assert m.shape == (2, 1, 2, 4)
    assert m[0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    # slot 2 of row 1 is a hole: no real query sees it, but it sees itself (its row is never empty)
    assert m[1, 0].tolist() == [[True, True, True, False], [True, True, False, True]]


@pytest.mark.parametrize("side", ["left", "right"])
@OPS
def test_padded_batch_gives_each_row_its_own_log_probs(side, ops):
    m = tiny(**ops).eval()
    _perturb(m)
    g = torch.Generator().manual_seed(10)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (3, 9, 6, 1)]
    L = 9
    ids = torch.full((4, L), 7, dtype=torch.long)
    mask = torch.zeros(4, L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        assert torch.isfinite(out).all()  # padding rows stay finite (they would poison real ones otherwise)
        for i, r in enumerate(rows):
            assert torch.allclose(out[i][mask[i].bool()], m(r[None])[0], atol=1e-5)


@OPS
def test_padded_cached_decode_equals_unpadded(ops):
    """Left-padded prefill then one slot at a time with per-row positions: each row's log-probs
    equal its own unpadded cached decode."""
    from poelm.core.inputs import positions_from_mask

    m = tiny(**ops).eval()
    _perturb(m)
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (2, 5)]
    cont = torch.randint(0, 300, (2, 4), generator=g)
    L = 5
    ids = torch.zeros(2, L + 4, dtype=torch.long)
    valid = torch.zeros(2, L + 4, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, L - len(r) : L], valid[i, L - len(r) :] = r, True
    ids[:, L:] = cont
    pos = positions_from_mask(valid)
    cache = KVCache(m.config, 2, 16)
    with torch.no_grad():
        parts = [m.stage_log_probs(ids[:, :L], cache=cache, pos=0, positions=pos[:, :L], valid=valid[:, :L])[:, :, -1:]]
        for t in range(L, L + 4):
            parts.append(m.stage_log_probs(ids[:, t : t + 1], cache=cache, pos=t, positions=pos[:, t : t + 1], valid=valid[:, : t + 1]))
        got = torch.cat(parts, dim=2)
        for i, r in enumerate(rows):
            ref = m.stage_log_probs(torch.cat([r, cont[i]])[None])[:, 0, len(r) - 1 :]
            assert torch.allclose(got[:, i], ref, atol=1e-5)


@pytest.mark.parametrize("ids,msg", [
    ([[1, 2]], "torch.LongTensor"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.tensor([1, 2]), "2-D"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[1, 300]]), "token id 300 outside the vocabulary \\[0, 300\\)"),
    (torch.tensor([[-2, 3]]), "token id -2"),
])
def test_check_input_ids_names_problem_and_fix(ids, msg):
    from poelm.core.inputs import check_input_ids

    with pytest.raises(ValueError, match=msg) as e:
        check_input_ids(ids, 300)
    assert ":" in str(e.value) and "\n" not in str(e.value)
