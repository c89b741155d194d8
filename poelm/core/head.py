"""A stage head's cross-entropy without its ``[N, V]`` logits: linear + softcap + CE, chunked.

A stage's training loss is ``CE(softcap(norm(h) @ W^T), y)`` with ``W = lm_head + stage_head[k]``
(SPEC, "Model"). Computed plainly, autograd keeps several ``[B*T, V]`` fp32 tensors per stage
alive until the backward (the logits, the tanh output of the softcap, the log-softmax); at the
card's shape (16,384 positions x 32,768 vocab) each is 2 GiB, more than the activations of a
whole 5-layer stage. ``fused_stage_ce`` instead walks the positions in chunks of ``rows`` and,
for each chunk, computes the logits, the loss terms *and* their gradients at once, keeping only
the gradients of its two inputs, ``dL/dx [N, d]`` and ``dL/dW [V, d]``. Backward then only scales
them by the incoming gradient. This is the fused linear cross-entropy of Liger-Kernel
(github.com/linkedin/Liger-Kernel, ``ops/fused_linear_cross_entropy.py``; Hsu et al.,
arXiv:2410.10989), with the softcap of Gemma-2 folded in. The FLOPs are those of the plain path
(one forward matmul, two gradient matmuls per chunk); nothing is recomputed.

Gradient, per position with target ``y`` and ``c = cap``: ``z = c tanh(l / c)``,
``dCE/dz = softmax(z) - onehot(y)``, ``dz/dl = 1 - tanh(l / c)^2``; the mean over the ``n``
positions whose target is not ``ignore_index`` divides by ``n`` (as ``F.cross_entropy``), ignored
positions get zero gradient, and ``n = 0`` gives NaN like ``F.cross_entropy``. Then
``dL/dx = (dL/dl) W`` and ``dL/dW = (dL/dl)^T x``.

Under autocast the two matmuls run in autocast's dtype exactly where the plain path's
``F.linear`` would; the softcap, softmax and loss stay fp32, and ``dL/dW`` is accumulated over the
chunks in the weight's dtype. Imports torch only (shipped with every export, like the rest of
core/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 64  # smaller chunks waste the matmul (too few rows to fill a GEMM tile)


def chunk_rows(n_rows: int, vocab: int, width: int) -> int:
    """Default positions per chunk: Liger-Kernel's rule, ``ceil(N / ceil(V / d))`` rounded up to
    a power of two, so one chunk's ``[rows, V]`` fp32 logits are about the size of the ``[N, d]``
    hidden states, at least ``MIN_ROWS`` and at most ``N``."""
    n_chunks = max(1, -(-vocab // width))
    rows = -(-n_rows // n_chunks)
    rows = 1 << max(0, (rows - 1).bit_length())
    return max(1, min(n_rows, max(MIN_ROWS, rows)))


def _chunk_loss_and_grad(x: torch.Tensor, weight_in: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor, cap: float,
                         inv_n: torch.Tensor, want_grad: bool):
    """Loss sum of one chunk, and (if ``want_grad``) ``dL/dlogits`` of the mean loss, ``[rows, V]``
    fp32. Two ``[rows, V]`` buffers in all, every step in place; one ``exp`` per logit serves both
    the log-sum-exp and the softmax (CPU time here is elementwise passes as much as matmuls)."""
    safe = torch.where(valid, tgt, 0)
    if cap > 0:  # weight_in = weight / cap: the matmul yields l / c directly
        t = F.linear(x, weight_in).float().tanh_()  # tanh(l / c)
        picked = t.gather(1, safe[:, None]).squeeze(1) * cap
        m = t.amax(dim=-1)
        if not want_grad:
            lse = m * cap + torch.add((-cap * m)[:, None], t, alpha=cap).exp_().sum(dim=-1).log()
            return torch.where(valid, lse - picked, 0.0).sum(), None
        e = torch.add((-cap * m)[:, None], t, alpha=cap).exp_()  # exp(z - max z), z = c t, in one pass
        m = m * cap
    else:
        t, z = None, F.linear(x, weight_in).float()
        picked = z.gather(1, safe[:, None]).squeeze(1)
        if not want_grad:
            return torch.where(valid, torch.logsumexp(z, dim=-1) - picked, 0.0).sum(), None
        m = z.amax(dim=-1)
        e = z.sub_(m[:, None]).exp_()
    s = e.sum(dim=-1)
    lse = m + s.log()
    loss_sum = torch.where(valid, lse - picked, 0.0).sum()
    scale = valid.to(e.dtype) * inv_n  # mean over counted positions; ignored rows -> 0
    g = e.mul_((scale / s)[:, None])  # softmax(z), scaled
    g[torch.arange(g.size(0), device=g.device), safe] -= scale  # - onehot(y), scaled
    if t is not None:
        g.addcmul_(g, t.square_(), value=-1.0)  # x (1 - tanh^2) = dz/dl
    return loss_sum, g


class _FusedStageCE(torch.autograd.Function):
    """Mean CE of ``softcap(x @ weight^T)``; gradients computed in forward (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap, ignore_index, rows, need_x, need_w):
        valid_all = targets != ignore_index
        n = valid_all.sum()
        inv_n = 1.0 / n.to(torch.float32)  # inf when n == 0: the loss is then NaN, as F.cross_entropy
        want = need_x or need_w
        autocast = torch.is_autocast_enabled(x.device.type)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        weight_in = weight / cap if cap > 0 else weight  # one [V, d] pass instead of a [rows, V] one per chunk
        for s in range(0, x.size(0), rows):
            xc, tc, vc = x[s : s + rows], targets[s : s + rows], valid_all[s : s + rows]
            loss_sum, g = _chunk_loss_and_grad(xc, weight_in, tc, vc, cap, inv_n, want)
            total = total + loss_sum
            if want and not autocast:  # under autocast torch.mm casts as the plain path's F.linear would
                g = g.to(weight.dtype)
            if need_x:
                gx[s : s + rows] = torch.mm(g, weight).to(x.dtype)
            if need_w:
                gw.add_(torch.mm(g.t(), xc).to(gw.dtype))
        ctx.save_for_backward(gx if need_x else None, gw if need_w else None)
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw = ctx.saved_tensors
        gx = gx * grad_out.to(gx.dtype) if gx is not None else None
        gw = gw * grad_out.to(gw.dtype) if gw is not None else None
        return gx, gw, None, None, None, None, None, None


def fused_stage_ce(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, ignore_index: int = -1,
                   rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(softcap(x @ weight^T, cap).float(), targets, ignore_index=...)`` (mean),
    computed ``rows`` positions at a time with no ``[N, V]`` tensor. ``x`` is ``[N, d]`` (the
    normed hidden states), ``weight`` ``[V, d]``, ``targets`` ``[N]``; ``rows`` defaults to
    ``chunk_rows``. Differentiable in ``x`` and ``weight``."""
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"fused_stage_ce wants x [N, d] and targets [N], got {tuple(x.shape)} and {tuple(targets.shape)}")
    rows = rows or chunk_rows(x.size(0), weight.size(0), weight.size(1))
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x.requires_grad, grad_on and weight.requires_grad
    return _FusedStageCE.apply(x, weight, targets, float(cap), int(ignore_index), int(rows), need_x, need_w)
