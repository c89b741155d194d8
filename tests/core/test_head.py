"""The fused chunked stage head (poelm/core/head.py): the same loss and gradients as the plain
``F.cross_entropy(softcap(logits))`` path, and no ``[N, V]`` tensor along the way."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from poelm.core import poe
from poelm.core.head import chunk_rows, fused_stage_ce
from poelm.core.model import ModelConfig, PoEGPT


def tiny(**kw):
    base = dict(vocab_size=300, depth=4, n_embd=32, n_head=4, n_kv_head=2, intermediate=64, max_seq_len=32, stage_layers=(2, 1, 1))
    base.update(kw)
    m = PoEGPT(ModelConfig(**base))
    m.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from init: per-stage heads and output projections non-zero
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def batch(seed=0, B=3, T=20, V=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def plain(x, w, y, cap, ignore_index=-1):
    return F.cross_entropy(poe.softcap(F.linear(x, w).float(), cap), y, ignore_index=ignore_index)


@pytest.mark.parametrize("cap", [15.0, 0.0, 0.5])
@pytest.mark.parametrize("rows", [None, 1, 7, 64, 1000])
def test_fused_ce_equals_plain_loss_and_grads(cap, rows):
    g = torch.Generator().manual_seed(3)
    N, d, V = 50, 16, 97
    x0 = torch.randn(N, d, generator=g)
    w0 = torch.randn(V, d, generator=g) * 2.0  # large logits, so a small cap bends them hard
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 13, 49]] = -1  # ignored targets
    xa, wa = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xb, wb = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    la = plain(xa, wa, y, cap)
    (la * 0.3).backward()
    lb = fused_stage_ce(xb, wb, y, cap, rows=rows)
    (lb * 0.3).backward()
    assert abs(la.item() - lb.item()) <= 1e-6 * max(1.0, abs(la.item()))
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(wa.grad, wb.grad, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(xb.grad[[0, 13, 49]]) == 0  # ignored positions get no gradient


def test_fused_ce_all_ignored_is_nan_like_cross_entropy_and_no_grad_mode_works():
    x, w = torch.randn(5, 4), torch.randn(11, 4)
    y = torch.full((5,), -1)
    assert math.isnan(plain(x, w, y, 15.0).item()) and math.isnan(fused_stage_ce(x, w, y, 15.0).item())
    y = torch.randint(0, 11, (5,))
    with torch.no_grad():
        v = fused_stage_ce(x.requires_grad_(), w, y, 15.0, rows=2)
    assert not v.requires_grad and abs(v.item() - plain(x, w, y, 15.0).item()) < 1e-6
    with pytest.raises(ValueError, match=r"x \[N, d\]"):
        fused_stage_ce(x[None], w, y, 15.0)


def test_chunk_rows_by_hand():
    assert chunk_rows(2048, 4096, 256) == 128  # 16 chunks of 128
    assert chunk_rows(16384, 32768, 2048) == 1024  # the card: 16 chunks
    assert chunk_rows(2000, 4096, 256) == 128  # ceil(2000/16) = 125 -> 128
    assert chunk_rows(10, 300, 32) == 10  # never more than N
    assert chunk_rows(1000, 64, 32) == 512  # 2 chunks of 500 -> 512
    assert chunk_rows(4096, 100000, 8) == 64  # at least MIN_ROWS


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["poe", "bp"])
def test_model_loss_fused_equals_plain_path(objective):
    a, b = tiny(objective=objective), tiny(objective=objective)
    a.head_chunk_rows = 0  # the materialised reference
    b.head_chunk_rows = 7  # uneven chunks
    idx, y = batch()
    y[0, :5] = -1
    la, ca = a.loss(idx, y)
    lb, cb = b.loss(idx, y)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=0, rtol=1e-6) and torch.allclose(ca, cb, atol=0, rtol=1e-6)
    ga, gb = _grads(a), _grads(b)
    n_heads_without_grad = 0 if objective == "poe" else 2  # bp: stages 0..K-2 are measured under no_grad
    assert ga.keys() == gb.keys() and len(ga) == len(list(a.parameters())) - n_heads_without_grad
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-7, rtol=1e-5), n


def test_backward_local_fused_equals_plain_path():
    a, b = tiny(), tiny()
    a.head_chunk_rows = 0
    idx, y = batch(1)
    la, ca = a.backward_local(idx, y, scale=0.5)
    lb, cb = b.backward_local(idx, y, scale=0.5)
    assert torch.allclose(la, lb, atol=0, rtol=1e-6) and torch.allclose(ca, cb, atol=0, rtol=1e-6)
    ga, gb = _grads(a), _grads(b)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-7, rtol=1e-5), n


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor over the vocabulary (last dim V) any op produces, forward and
    backward (the heads' weights are [V, d]: their last dim is d)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_logits_tensor_of_all_positions_is_materialised():
    V = 300
    idx, y = batch(2, B=4, T=32, V=V)
    N = idx.numel()
    sizes = {}
    for rows in (0, 64):  # 64 > n_embd, so a chunk's [64, V] outgrows the transposed [d, V] weight
        m = tiny()
        m.head_chunk_rows = rows
        with LargestVocabTensor(V) as mode:
            m.backward_local(idx, y)
        sizes[rows] = mode.largest
    assert sizes[0] >= N * V  # the plain path holds [N, V] logits: the probe sees them
    assert sizes[64] == 64 * V  # the fused head: one chunk of 64 of the 128 positions at most
