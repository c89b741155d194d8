"""The PoE per-stage-head decoder: trunk, stages, heads, KV cache.

One source of truth for the model: training, measurement, inference and the exported Hugging
Face remote code (which ships this file unchanged next to ``poe.py``) all run this module.
It imports torch and ``poe`` only.

Trunk (nanochat lineage, github.com/karpathy/nanochat ``gpt.py``): untied token embedding,
RMSNorm without weights, rotary position embeddings, QK-norm, grouped-query attention
(``n_kv_head``), relu^2 MLP with a configurable ``intermediate`` size, an ``x0`` residual mixed
into every block with learned per-layer scalars, value embeddings on alternating layers
(ResFormer-style, gated per KV head), logit soft-cap 15.

PoE per-stage heads (jaepil/nanochat ``_poe_layer_loss``, generalised to asymmetric stages):
the ``depth`` blocks are cut into K stages of ``stage_layers`` blocks. Stage k ends with logits
``softcap(lm_head(norm(h_k)) + stage_head[k](norm(h_k)))``; the per-stage heads start at zero so
at step 0 every stage predicts like the shared head. Under local learning (``objective="poe"``)
the residual stream entering stage k+1 is ``h_k.detach()`` and the loss is
``sum_k CE_k / K**(1 - alpha_train)``; ``objective="bp"`` trains end to end on the last stage
alone (the backprop control). The full model is the renormalised geometric mean of the stage
distributions (``poe.aggregate``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ``from .poe import ...`` (not ``from . import poe``): transformers' remote-code loader copies
# exactly the files named by relative ``from .x import`` lines, so the export ships poe.py too.
from .head import fused_stage_ce
from .inputs import attention_mask, positions_from_mask
from .poe import aggregate, softcap


@dataclass
class ModelConfig:
    """Architecture. Field names match the card: ``depth``, ``n_embd``, ``stage_layers``..."""

    vocab_size: int = 4096
    depth: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    intermediate: int = 512
    max_seq_len: int = 256
    stage_layers: tuple = (3, 1, 1, 1)
    value_embeds: bool = True
    softcap: float = 15.0
    rope_base: float = 10000.0
    objective: str = "poe"  # "poe" (local, detached stages) or "bp" (end-to-end control)
    alpha_train: float = 0.0

    def __post_init__(self):
        self.stage_layers = tuple(int(x) for x in self.stage_layers)

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def stage_of_layer(self) -> list[int]:
        out = []
        for k, n in enumerate(self.stage_layers):
            out += [k] * n
        return out

    def stage_bounds(self, k: int) -> tuple[int, int]:
        start = sum(self.stage_layers[:k])
        return start, start + self.stage_layers[k]

    def has_value_embed(self, layer: int) -> bool:
        # nanochat: alternating layers, the last layer always included.
        return self.value_embeds and layer % 2 == (self.depth - 1) % 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_layers"] = list(self.stage_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable weight (nanochat)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``[B, T, H, D]`` by rotating the two halves of the head dimension."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Per-layer key/value cache with a per-layer filled length.

    Lengths are tracked per layer because adaptive depth (WAND, routing) leaves the layers of
    skipped stages behind; ``write`` refuses to leave a gap, so a deeper position can never attend
    to a state that was not computed (the engine must catch the layer up first). ``truncate``
    rolls every layer back (speculative decoding)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.depth, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * cfg.depth
        self.max_len = max_len

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        T = k.size(2)
        if pos > self.lengths[layer]:
            raise RuntimeError(f"KV cache gap at layer {layer}: writing at {pos}, filled {self.lengths[layer]}")
        if pos + T > self.max_len:
            raise RuntimeError(f"KV cache full: {pos + T} > {self.max_len}")
        self.k[layer, :, :, pos : pos + T] = k
        self.v[layer, :, :, pos : pos + T] = v
        self.lengths[layer] = pos + T
        return self.k[layer, :, :, : pos + T], self.v[layer, :, :, : pos + T]

    def truncate(self, length: int):
        self.lengths = [min(n, length) for n in self.lengths]

    def gather_slots(self, src: torch.Tensor):
        """Repack every layer's slots per row: new slot j of row b holds old slot ``src[b, j]``
        (``src [B, n]``); every layer is left filled to n. States are moved, never recomputed:
        keys carry their RoPE rotation already, so only the per-row validity of slots (kept by
        the caller) says what a slot means."""
        n = src.size(1)
        idx = src[None, :, None, :, None].expand(self.k.size(0), -1, self.k.size(2), -1, self.k.size(4))
        self.k[:, :, :, :n] = self.k.gather(3, idx)
        self.v[:, :, :, :n] = self.v.gather(3, idx)
        self.lengths = [n] * len(self.lengths)

    def stage_length(self, cfg: ModelConfig, k: int) -> int:
        """Positions filled in every layer of stage k."""
        a, b = cfg.stage_bounds(k)
        return min(self.lengths[a:b])


class Attention(nn.Module):
    VE_GATE_CHANNELS = 32

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        d = cfg.n_embd
        self.c_q = nn.Linear(d, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(d, cfg.kv_dim, bias=False)
        self.c_v = nn.Linear(d, cfg.kv_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, d, bias=False)
        self.ve_gate_channels = min(self.VE_GATE_CHANNELS, d)
        self.ve_gate = nn.Linear(self.ve_gate_channels, cfg.n_kv_head, bias=False) if cfg.has_value_embed(layer) else None

    def forward(self, x, ve, cos, sin, cache: KVCache | None, pos: int, mask: torch.Tensor | None = None):
        """``cos``/``sin``: ``[1 or B, T, 1, D/2]``; ``mask``: None (causal over the filled slots)
        or ``attention_mask(valid, T)`` for padded rows."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer, arXiv:2410.17897) as in nanochat: an input-dependent gate
            # in (0, 2) per KV head mixes a per-token value embedding into v.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer, pos, k, v)
        Tk = k.size(2)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif Tk == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # a chunk of T new queries after Tk - T cached positions
            qpos = torch.arange(Tk - T, Tk, device=x.device)
            mask = torch.arange(Tk, device=x.device)[None, :] <= qpos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)
        self.c_proj = nn.Linear(cfg.intermediate, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu^2 (Primer, arXiv:2109.08668)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, ve, cos, sin, cache, pos, mask=None):
        x = x + self.attn(norm(x), ve, cos, sin, cache, pos, mask)
        return x + self.mlp(norm(x))


class PoEGPT(nn.Module):
    """The trunk cut into K stages, each ending in a complete next-token predictor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if sum(cfg.stage_layers) != cfg.depth:
            raise ValueError(f"stage_layers {cfg.stage_layers} must sum to depth {cfg.depth}")
        self.config = cfg
        V, d = cfg.vocab_size, cfg.n_embd
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(V, cfg.kv_dim) for i in range(cfg.depth) if cfg.has_value_embed(i)}
        )
        self.lm_head = nn.Linear(d, V, bias=False)
        self.stage_heads = nn.ModuleList([nn.Linear(d, V, bias=False) for _ in cfg.stage_layers])
        # x0 residual (nanochat / modded-nanogpt): x <- resid_lambda * x + x0_lambda * x0 per layer.
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.depth))
        cos, sin = self._rotary(cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._merged_cache: dict = {}
        # Positions per chunk of the fused stage head's cross-entropy (core/head.py): None picks
        # head.chunk_rows, 0 materialises the [B, T, V] logits (the plain reference path).
        self.head_chunk_rows: int | None = None

    # ----------------------------------------------------------------------------- init
    def _rotary(self, seq_len: int, device=None):
        hd = self.config.head_dim
        inv = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """nanochat-style init; per-stage heads at exactly zero (SPEC)."""
        g = None
        if seed is not None:
            g = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        d = self.config.n_embd
        bound = math.sqrt(3.0) * d ** -0.5  # uniform with std d**-0.5
        self.wte.weight.normal_(0.0, 1.0, generator=g)
        self.lm_head.weight.normal_(0.0, 0.001, generator=g)
        for h in self.stage_heads:
            h.weight.zero_()
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-bound, bound, generator=g)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.c_fc):
                lin.weight.uniform_(-bound, bound, generator=g)
            b.attn.c_proj.weight.zero_()
            b.mlp.c_proj.weight.zero_()
            if b.attn.ve_gate is not None:
                b.attn.ve_gate.weight.zero_()
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        cos, sin = self._rotary(self.config.max_seq_len, device=self.wte.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # ----------------------------------------------------------------------------- pieces
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x0 = norm(wte(idx)); the stream entering stage 0 and the x0 residual of every block."""
        return norm(self.wte(idx))

    def run_stage(self, k: int, x, x0, idx, cache: KVCache | None = None, pos: int = 0, positions=None, valid=None, collect=None):
        """Run the blocks of stage k on hidden ``x`` in cache slots ``pos..pos+T-1``.

        Unpadded (``positions`` and ``valid`` None) a slot is its RoPE position. Padded rows give
        ``positions [B, T]`` (RoPE position of each new slot) and ``valid [B, pos+T]`` (which slots,
        cached and new, hold real tokens; see ``attention_mask``). ``collect``: a list that
        receives every block's output (``output_hidden_states``)."""
        T = idx.size(1)
        if positions is None:
            if pos + T > self.cos.size(1):
                raise ValueError(f"sequence of {pos + T} positions exceeds max_seq_len {self.cos.size(1)}")
            cos, sin = self.cos[:, pos : pos + T].to(x.dtype), self.sin[:, pos : pos + T].to(x.dtype)
        else:
            if int(positions.max()) >= self.cos.size(1):
                raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.cos.size(1)}")
            cos, sin = self.cos[0, positions].to(x.dtype), self.sin[0, positions].to(x.dtype)  # [B, T, 1, D/2]
        mask = attention_mask(valid, T) if valid is not None else None
        a, b = self.config.stage_bounds(k)
        for i in range(a, b):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = self.blocks[i](x, ve, cos, sin, cache, pos, mask)
            if collect is not None:
                collect.append(x)
        return x

    def train(self, mode: bool = True):
        # Optimizers (and ZeRO-2 collectives) write weights through .data / in-place
        # communication, which does not bump ``_version``; every mode switch therefore drops the
        # merged heads, and they are only cached in eval mode.
        self._merged_cache = {}
        return super().train(mode)

    def _head_weight(self, k: int) -> torch.Tensor:
        W = self.lm_head.weight
        Wk = self.stage_heads[k].weight
        if self.training or (torch.is_grad_enabled() and (W.requires_grad or Wk.requires_grad)):
            return W + Wk
        # Inference: merge once per weight version (one matmul per stage instead of two).
        key = (k, W._version, Wk._version, W.data_ptr(), Wk.data_ptr(), W.dtype, W.device)
        hit = self._merged_cache.get(k)
        if hit is None or hit[0] != key:
            hit = (key, W + Wk)
            self._merged_cache[k] = hit
        return hit[1]

    def stage_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Stage k's logits ``softcap(lm_head(norm(h)) + stage_head[k](norm(h)))`` in fp32."""
        logits = F.linear(norm(h), self._head_weight(k))
        return softcap(logits.float(), self.config.softcap)

    def stage_ce(self, k: int, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
        """Stage k's mean cross-entropy, ``F.cross_entropy(stage_logits(k, h), targets)``, computed
        by the fused chunked head (core/head.py) so no ``[B, T, V]`` logits tensor is ever held;
        ``head_chunk_rows = 0`` takes the plain path (same numbers to fp32 rounding, tested)."""
        if self.head_chunk_rows == 0:
            return F.cross_entropy(self.stage_logits(k, h).flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return fused_stage_ce(norm(h).flatten(0, 1), self._head_weight(k), targets.flatten(), self.config.softcap,
                              ignore_index, self.head_chunk_rows)

    def hiddens(self, idx, upto: int | None = None, cache: KVCache | None = None, pos: int = 0, detach: bool | None = None,
                positions=None, valid=None, collect=None):
        """Hidden state at the end of stages 0..upto-1. ``detach`` defaults to local learning;
        ``positions`` / ``valid`` / ``collect`` as in ``run_stage`` (``collect`` gets ``x0`` first)."""
        cfg = self.config
        upto = cfg.n_stages if upto is None else upto
        if detach is None:
            detach = cfg.objective == "poe"
        x0 = self.embed(idx)
        x, out = x0, []
        if collect is not None:
            collect.append(x0)
        for k in range(upto):
            if k > 0 and detach:
                x = x.detach()  # local learning: stage k learns from its own loss only
            x = self.run_stage(k, x, x0, idx, cache, pos, positions, valid, collect)
            out.append(x)
        return out

    # ----------------------------------------------------------------------------- outputs
    def stage_log_probs(self, idx, upto: int | None = None, cache=None, pos: int = 0, positions=None, valid=None) -> torch.Tensor:
        """``z_k = log_softmax(logits_k)`` for stages 0..upto-1, stacked ``[S, B, T, V]`` fp32."""
        hs = self.hiddens(idx, upto, cache, pos, detach=False, positions=positions, valid=valid)
        return torch.stack([F.log_softmax(self.stage_logits(k, h), dim=-1) for k, h in enumerate(hs)])

    def forward(self, idx, targets=None, stages=None, alpha: float = 0.0, attention_mask=None):
        """Without targets: PoE log-probs ``[B, T, V]`` over ``stages`` (None = all K; an int = a
        single stage; a range = prefix K'), renormalised, so they are valid logits. Later stages
        than the deepest requested are never run. With targets: the training loss (``loss``).
        ``attention_mask [B, T]`` (1 = token, 0 = padding, left or right): each row's real
        positions get the log-probs that row alone would get; padding positions are meaningless."""
        if targets is not None:
            return self.loss(idx, targets)[0]
        if stages is None:
            sel = list(range(self.config.n_stages))
        elif isinstance(stages, int):
            sel = [stages]
        else:
            sel = sorted(stages)
        positions = valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()
            positions = positions_from_mask(valid)
        z = self.stage_log_probs(idx, upto=max(sel) + 1, positions=positions, valid=valid)
        return aggregate(z[sel], alpha)

    def loss(self, idx, targets, ignore_index: int = -1):
        """Training loss and the per-stage cross-entropies (detached, for logging).

        poe: ``sum_k CE_k / K**(1-alpha_train)`` with detached stage inputs; bp: CE of the last
        stage with gradients through the whole trunk."""
        cfg = self.config
        K = cfg.n_stages
        hs = self.hiddens(idx)
        ces = []
        for k, h in enumerate(hs):
            if cfg.objective == "bp" and k < K - 1:
                with torch.no_grad():
                    ce = self.stage_ce(k, h, targets, ignore_index)
            else:
                ce = self.stage_ce(k, h, targets, ignore_index)
            ces.append(ce)
        if cfg.objective == "bp":
            total = ces[-1]
        else:
            total = torch.stack(ces).sum() / (K ** (1.0 - cfg.alpha_train))
        return total, torch.stack([c.detach() for c in ces])

    def backward_local(self, idx, targets, scale: float = 1.0, ignore_index: int = -1, autocast=None):
        """Forward and backward of the local-learning loss one stage at a time; returns
        ``(total, per_stage_ce)`` detached, like ``loss``, with the gradients of
        ``scale * total`` accumulated into ``.grad``.

        Because the stream entering stage k+1 is detached, stage k's graph is needed only by
        stage k's own cross-entropy: running its backward before stage k+1's forward frees it, so
        peak activation memory is that of the largest stage rather than of the whole trunk (16 of
        32 layers for the card's (16,6,5,5)). The gradients equal those of ``loss(...).backward()``
        up to summation order. The x0 residual is shared by every stage: it enters each stage as a
        leaf and its accumulated gradient flows into the embedding once at the end. ``autocast``
        is a context factory applied to each stage's forward. Only for ``objective = "poe"``."""
        if self.config.objective != "poe":
            raise ValueError("backward_local needs the local-learning objective (objective='poe')")
        from contextlib import nullcontext

        ctx = autocast or nullcontext
        K = self.config.n_stages
        w = scale / (K ** (1.0 - self.config.alpha_train))
        with ctx():
            x0 = self.embed(idx)
        x0_leaf = x0.detach().requires_grad_(True)
        x, ces = x0_leaf, []
        for k in range(K):
            with ctx():
                h = self.run_stage(k, x if k == 0 else x.detach(), x0_leaf, idx)
                ce = self.stage_ce(k, h, targets, ignore_index)
            (ce * w).backward()
            ces.append(ce.detach())
            x = h.detach()
        x0.backward(x0_leaf.grad)
        ces = torch.stack(ces)
        return ces.sum() / (K ** (1.0 - self.config.alpha_train)), ces

    # ----------------------------------------------------------------------------- accounting
    def param_count(self) -> dict:
        """Parameter counts by group, with per-stage block counts."""
        cfg = self.config
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        stages = []
        for k in range(cfg.n_stages):
            a, b = cfg.stage_bounds(k)
            stages.append(sum(n(self.blocks[i]) for i in range(a, b)))
        out = {
            "embedding": n(self.wte),
            "value_embeds": n(self.value_embeds),
            "blocks": sum(stages),
            "blocks_per_stage": stages,
            "lm_head": n(self.lm_head),
            "stage_heads": n(self.stage_heads),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        out["total"] = sum(v for v in out.values() if isinstance(v, int))
        return out

    def flops_per_token(self, context: int | None = None) -> dict:
        """Forward FLOPs per token, per stage (its blocks plus its head) and in total.

        Matmuls cost 2 FLOPs per weight; attention adds ``4 * n_head * head_dim * context`` per
        layer (scores and weighted sum) with ``context`` defaulting to ``max_seq_len / 2``, the
        mean causal context of a full row. Embedding and value-embedding lookups are free. The
        full model runs every stage, so its cost is the sum (SPEC routing's c0 is stage 0's share).
        Training costs 3x forward (the usual 6N rule)."""
        cfg = self.config
        ctx = cfg.max_seq_len / 2 if context is None else context
        head = 2 * cfg.n_embd * cfg.vocab_size
        per_stage = []
        for k in range(cfg.n_stages):
            a, b = cfg.stage_bounds(k)
            f = 0.0
            for i in range(a, b):
                blk = self.blocks[i]
                mat = sum(p.numel() for name, p in blk.named_parameters() if "ve_gate" not in name)
                f += 2 * mat + 4 * cfg.n_head * cfg.head_dim * ctx
            per_stage.append(f + head)
        return {"per_stage": per_stage, "total": sum(per_stage), "train_total": 3 * sum(per_stage)}
