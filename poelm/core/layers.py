"""The trunk's layers: RMSNorm, rotary embeddings, attention (GQA, QK-norm, value embeddings,
sliding windows), the relu^2 MLP and the pre-norm block.

nanochat lineage (github.com/karpathy/nanochat ``gpt.py``); the reference's knobs
(jaepil/nanochat, ``../shared/reference/nanochat-poe.md``) are ``ModelConfig`` fields read here:
``qk_scale`` (q and k multiplied after QK-norm: a sharper softmax at the same ``1/sqrt(hd)``
SDPA scale), ``ve_gate_scale`` / ``ve_gate_channels`` (the value-embedding gate) and the
per-layer window that ``PoEGPT.run_stage`` turns into an ``AttnPlan`` (core/attention.py: the
kernel, ``attn_impl``, and its mask). Imports torch only; shipped
verbatim with ``model.py`` in every export.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttnPlan, attend


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable weight (nanochat)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``[B, T, H, D]`` by rotating the two halves of the head dimension."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        d = cfg.n_embd
        self.c_q = nn.Linear(d, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(d, cfg.kv_dim, bias=False)
        self.c_v = nn.Linear(d, cfg.kv_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, d, bias=False)
        self.qk_scale = float(cfg.qk_scale)
        self.ve_gate_scale = float(cfg.ve_gate_scale)
        self.ve_gate_channels = min(int(cfg.ve_gate_channels), d)
        self.ve_gate = nn.Linear(self.ve_gate_channels, cfg.n_kv_head, bias=False) if cfg.has_value_embed(layer) else None

    def forward(self, x, ve, cos, sin, cache, pos: int, plan: AttnPlan):
        """``cos``/``sin``: ``[1 or B, T, 1, D/2]``; ``plan``: the layer's mask and kernel, built
        by ``PoEGPT.run_stage`` (core/attention.py: causal, sliding window, padding, cached chunk)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer, arXiv:2410.17897) as in nanochat: an input-dependent gate
            # in (0, ve_gate_scale) per KV head mixes a per-token value embedding into v.
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer, pos, k, v)
        y = attend(q, k, v, plan)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)
        self.c_proj = nn.Linear(cfg.intermediate, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu^2 (Primer, arXiv:2109.08668)


class Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, ve, cos, sin, cache, pos, plan):
        x = x + self.attn(norm(x), ve, cos, sin, cache, pos, plan)
        return x + self.mlp(norm(x))
