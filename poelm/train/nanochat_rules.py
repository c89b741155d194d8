"""The reference implementation's update rules and schedules (used by ``optim_nanochat.py``).

Written from karpathy/nanochat ``nanochat/optim.py`` (a3ca42a; ``adamw_step_fused``,
``muon_step_fused``) and ``scripts/base_train.py`` of the same era (``get_muon_momentum``,
``get_weight_decay``); the formulas are stated in ``optim_nanochat.py``'s docstring. The
reference runs them as compiled fused kernels on 0-D fp32 hyper-parameter tensors; here the
scalar arithmetic is done in fp32 the same way (so e.g. ``1 - b2**t`` rounds as there) and the
tensor arithmetic in the same order, so results agree to rounding (not bitwise: inductor fuses).
"""

from __future__ import annotations

import math

import torch

# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), as listed in the
# reference's optim.py (from arXiv:2505.16932).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# base_train.py's Muon momentum schedule: start -> peak over `warmup` steps, peak -> final over the LR warmdown.
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_FINAL, MOMENTUM_WARMUP = 0.85, 0.97, 0.90, 400


def _f32(x) -> torch.Tensor:
    # The reference passes hyper-parameters as fp32 0-D tensors: scalar arithmetic happens in fp32.
    return torch.tensor(x, dtype=torch.float32)


def adamw_update(p, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas, eps: float, weight_decay: float):
    """One reference AdamW step in place (optim_nanochat.py's docstring), ``step`` counted from 1."""
    lr_t, b1, b2, wd = _f32(lr), _f32(betas[0]), _f32(betas[1]), _f32(weight_decay)
    t = _f32(float(step))
    p.mul_(float(1 - lr_t * wd))
    exp_avg.lerp_(grad, float(1 - b1))
    exp_avg_sq.lerp_(grad.square(), float(1 - b2))
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    denom = (exp_avg_sq / float(bias2)).sqrt() + float(_f32(eps))
    p.add_(exp_avg / denom, alpha=-float(lr_t / bias1))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The reference's COMPUTE_DTYPE for Polar Express: bf16 on CUDA, the tensor's own elsewhere."""
    return torch.bfloat16 if t.is_cuda else t.dtype


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Polar Express orthogonalization of a matrix (or a stack): ``G / (1.01 ||G||_F + 1e-6)``
    then ``steps`` odd polynomial iterations with the coefficient triples ``POLAR_EXPRESS``, in
    ``dtype`` (default ``compute_dtype(G)``)."""
    X = G.to(dtype or compute_dtype(G))
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X.mT @ X if tall else X @ X.mT  # the smaller Gram matrix
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def normuon_scale(X: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon variance reduction: updates ``second`` (the factored second moment) in place and
    returns ``X`` with each row (rows >= cols) or column scaled by ``rsqrt(max(second, 1e-10))``,
    rescaled to keep ``||X||_F``."""
    red = -1 if X.size(-2) >= X.size(-1) else -2
    n = X.size(red)
    v_mean = X.float().square().mean(dim=red, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    b2 = _f32(beta2).to(X.dtype)
    second.lerp_(v_mean.to(second.dtype), float(1 - b2))
    step = second.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return X * (step * (v_norm / v_norm_new.clamp_min(1e-10))).to(X.dtype)


def muon_update(p, grad, buf, second, lr: float, momentum: float, weight_decay: float, ns_steps: int, beta2: float,
                dtype: torch.dtype | None = None):
    """One reference Muon step on one matrix in place (optim_nanochat.py's docstring); ``dtype``
    is the compute dtype of the orthogonalized update (default ``compute_dtype(grad)``)."""
    mu = _f32(momentum).to(grad.dtype)
    buf.lerp_(grad, float(1 - mu))
    u = grad.lerp(buf, float(mu))
    X = normuon_scale(polar_express(u, ns_steps, dtype), second, beta2)
    lr_t = _f32(lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5).to(X.dtype)
    wd_t = _f32(weight_decay).to(X.dtype)
    mask = (X * p) >= 0
    p.sub_(lr_t * X + lr_t * wd_t * p * mask)


def muon_momentum_at(rel: int, start: float, peak: float, warmup: int, final: float = 0.0, warmdown_start: int | None = None,
                     warmdown: int = 0) -> float:
    """Muon momentum at step ``rel``: ``start -> peak`` linearly over ``warmup`` steps (nanochat's
    ``get_muon_momentum``), then ``peak``; from ``warmdown_start`` on (when given) ``peak ->
    final`` linearly over ``warmdown`` steps. One schedule for both optimizers: poelm's is the
    warm-up alone (its config's start, peak and warmup), the reference's ``reference_momentum``."""
    if rel < warmup:
        frac = rel / warmup
        return (1 - frac) * start + frac * peak
    if warmdown_start is not None and rel >= warmdown_start:
        progress = (rel - warmdown_start) / max(1, warmdown)
        return peak * (1 - progress) + final * progress
    return peak


def reference_momentum(rel: int, steps: int, warmdown: int) -> float:
    """base_train.py's Muon momentum at step ``rel`` of a ``steps``-step run with ``warmdown`` LR-warmdown steps."""
    return muon_momentum_at(rel, MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_WARMUP, MOMENTUM_FINAL, steps - warmdown, warmdown)


def reference_weight_decay(rel: int, steps: int, weight_decay: float) -> float:
    """base_train.py's Muon weight decay: cosine from ``weight_decay`` to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * rel / steps))


