"""The PoE per-stage-head decoder: embedding (+ smear), stages, heads, accounting.

One source of truth for the model: training, measurement, inference and the exported Hugging
Face remote code (which ships this file unchanged next to its siblings) all run this module.
It imports torch and its core/ siblings only: ``arch`` (``ModelConfig``), ``layers`` (attention,
MLP, block), ``cache`` (``KVCache``), ``inputs`` (masks), ``head`` and ``poe``; ``ModelConfig``
and ``KVCache`` are re-exported here.

Trunk (nanochat lineage, github.com/karpathy/nanochat ``gpt.py``): untied token embedding,
RMSNorm without weights, rotary position embeddings, QK-norm, grouped-query attention
(``n_kv_head``), relu^2 MLP with a configurable ``intermediate`` size, an ``x0`` residual mixed
into every block with learned per-layer scalars, value embeddings on alternating layers
(ResFormer-style, gated per KV head), logit soft-cap 15. The reference implementation's ops
(``REFERENCE_OPS``: q/k scale 1.2, gate 3*sigmoid over 12 channels, the smear of the previous
token's embedding, per-layer sliding windows "SSSL", RoPE base 100000, its init) are the config
defaults; with them this module computes the reference's per-stage log-probs
(tests/core/test_reference_ops.py). ``POELM_OPS`` names poelm's earlier model, for the
checkpoints trained with it.

Sliding windows and padding: a window counts a row's real positions (RoPE positions), so padded
or holed rows see what they see alone; attention keeps the unmasked causal kernels whenever no
window can bind (every layer L, or a row no longer than the window) and no row is padded.

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

import torch
import torch.nn as nn
import torch.nn.functional as F

# ``from .poe import ...`` (not ``from . import poe``): transformers' remote-code loader copies
# exactly the files named by relative ``from .x import`` lines, so the export ships poe.py too.
from .arch import POELM_OPS, REFERENCE_OPS, ModelConfig
from .cache import KVCache
from .head import fused_stage_ce
from .attention import AttnPlan
from .inputs import positions_from_mask, previous_slots
from .layers import Block, apply_rotary, norm
from .poe import aggregate, softcap

__all__ = ["ModelConfig", "PoEGPT", "KVCache", "POELM_OPS", "REFERENCE_OPS", "norm", "apply_rotary"]


class PoEGPT(nn.Module):
    """The trunk cut into K stages, each ending in a complete next-token predictor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if sum(cfg.stage_layers) != cfg.depth:
            raise ValueError(f"stage_layers {cfg.stage_layers} must sum to depth {cfg.depth}")
        cfg.check()
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
        if cfg.smear:  # the reference's smear (see ``embed``)
            self.smear_gate = nn.Linear(cfg.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            # The reference subtracts backout_lambda * (layer n_layer//2's residual) before its plain
            # last-layer head only; no stage logit uses it, so poelm keeps it as a parameter that
            # travels through import, training (no gradient) and export unchanged.
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        # Per layer: the sliding window W, or None where it can never bind (W >= max_seq_len - 1).
        self.windows = [w if w < cfg.max_seq_len - 1 else None for w in cfg.window_sizes()]
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
        """The init ``config.init`` names (``_init_nanochat``, the default, or ``_init_poelm``);
        per-stage heads at exactly zero (SPEC); the rotary tables."""
        g = None
        if seed is not None:
            g = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        (self._init_nanochat if self.config.init == "nanochat" else self._init_poelm)(g)
        cos, sin = self._rotary(self.config.max_seq_len, device=self.wte.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @torch.no_grad()
    def _init_poelm(self, g):
        """poelm's earlier init (``init = "poelm"``, kept for its checkpoints' configs): wte
        N(0, 1); lm_head N(0, 0.001); stage heads 0; c_q, c_k, c_v, c_fc and value embeddings
        uniform with std n_embd**-0.5; both c_proj and ve_gate 0; resid_lambdas 1, x0_lambdas 0.1;
        smear_lambda 0, smear_gate U(0, 0.02), backout_lambda 0.2."""
        bound = math.sqrt(3.0) * self.config.n_embd ** -0.5  # uniform with std d**-0.5
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
        if self.config.smear:
            self.smear_lambda.zero_()  # the smear starts off, as in the reference
            self.smear_gate.weight.uniform_(0.0, 0.02, generator=g)
        if self.config.backout:
            self.backout_lambda.fill_(0.2)

    @torch.no_grad()
    def _init_nanochat(self, g):
        """The reference's ``init_weights`` (facts page "Init"): wte N(0, 0.8); lm_head N(0, 0.001); stage heads 0;
        ``s = sqrt(3 / n_embd)``: c_q, c_k, c_v and value embeddings U(-s, s), c_fc U(-0.4 s, 0.4 s),
        both c_proj 0; ``resid_lambdas[i] = 1.15 - 0.10 i / (n-1)``, ``x0_lambdas[i] = 0.20 - 0.15 i / (n-1)``
        (n = depth, ``max(n-1, 1)`` as in the reference); smear_lambda 0, smear_gate U(0, 0.02),
        backout_lambda 0.2, ve_gate U(0, 0.02). (The reference keeps wte and value embeddings in
        bf16 on GPUs; poelm keeps fp32 master weights and leaves precision to the trainer.)"""
        cfg = self.config
        s = math.sqrt(3.0) * cfg.n_embd ** -0.5
        self.wte.weight.normal_(0.0, 0.8, generator=g)
        self.lm_head.weight.normal_(0.0, 0.001, generator=g)
        for h in self.stage_heads:
            h.weight.zero_()
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v):
                lin.weight.uniform_(-s, s, generator=g)
            b.attn.c_proj.weight.zero_()
            b.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=g)
            b.mlp.c_proj.weight.zero_()
        n = max(cfg.depth - 1, 1)
        for i in range(cfg.depth):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / n
            self.x0_lambdas[i] = 0.20 - 0.15 * i / n
        if cfg.smear:
            self.smear_lambda.zero_()
            self.smear_gate.weight.uniform_(0.0, 0.02, generator=g)
        if cfg.backout:
            self.backout_lambda.fill_(0.2)
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-s, s, generator=g)
        for b in self.blocks:
            if b.attn.ve_gate is not None:
                b.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=g)

    # ----------------------------------------------------------------------------- pieces
    def embed(self, idx: torch.Tensor, cache=None, pos: int = 0, valid=None) -> torch.Tensor:
        """x0: the stream entering stage 0 and the x0 residual of every block.

        ``norm(wte(idx))``, then with ``smear`` (the reference's cheap bigram feature) every token
        that has a previous token gets ``x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * e[t-1]``,
        ``e[t-1]`` the previous token's normed embedding *before* smearing; the first token of a
        sequence is unchanged. "Previous" is the row's previous real token: under padding or
        speculative holes (``valid [B, pos+T]``) the last valid slot before t, so a left-padded
        row's first token gets no smear and every row gets what it gets alone. With a ``cache``
        the pre-smear embeddings of slots ``pos..pos+T-1`` are stored in it and the previous
        token's may come from an earlier call (``KVCache.smear_previous``): exact for cached
        decoding, chunked prefill, speculative rollback and slot repacking alike."""
        x = norm(self.wte(idx))
        if not self.config.smear:
            return x
        c = self.config.smear_channels
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :c]))
        if cache is not None:
            prev, has = cache.smear_previous(x, pos, valid)
        elif valid is not None:
            slot, has = previous_slots(valid)
            slot, has = slot[:, -idx.size(1):], has[:, -idx.size(1):]
            prev = x.gather(1, slot.unsqueeze(-1).expand_as(x))
        else:  # one plain sequence: position 0 unchanged, t >= 1 mixes in t-1
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + (gate * has.unsqueeze(-1).to(gate.dtype)) * prev

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
        plans = {}  # per distinct window: the layers' AttnPlan (kernel + mask), built once per call
        Tk = pos + T if cache is not None else T
        a, b = self.config.stage_bounds(k)
        for i in range(a, b):
            W = self.windows[i]
            if W not in plans:
                plans[W] = AttnPlan(self.config.attn_impl, W, T, Tk, valid, x.device)
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = self.blocks[i](x, ve, cos, sin, cache, pos, plans[W])
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
        x0 = self.embed(idx, cache, pos, valid)
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
        if cfg.backout:
            total = total + self._backout_touch()
        return total, torch.stack([c.detach() for c in ces])

    def _backout_touch(self) -> torch.Tensor:
        # The reference adds ``0.0 * backout_lambda.sum()`` to its PoE loss (jaepil/nanochat
        # gpt.py, 276c2ac) so the unused scalar gets a zero gradient and its AdamW step count
        # advances with the others: exact optimizer-state parity, no numerical effect on the loss.
        return 0.0 * self.backout_lambda.sum()

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
        if self.config.backout:
            self._backout_touch().backward()  # see _backout_touch
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
            # per-layer lambdas, and the reference's smear gate / smear / backout scalars if present
            "scalars": sum(p.numel() for name, p in self.named_parameters()
                           if name in ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")),
        }
        out["total"] = sum(v for v in out.values() if isinstance(v, int))
        return out

    def flops_per_token(self, *, context: float | None = None, seq_len: int | None = None) -> dict:
        """Forward FLOPs per token, per stage (its blocks plus its head) and in total.

        Matmuls cost 2 FLOPs per weight; attention adds ``4 * n_head * head_dim * c`` per layer
        (scores and weighted sum), ``c`` the keys a query sees (``attention_context``): by
        default the mean over a full row of ``seq_len`` positions (default ``max_seq_len``), or,
        given ``context`` (the keys before a decoded position), that count, each capped at the
        layer's window W+1. Keyword-only: a positional number could mean either. Embedding and
        value-embedding lookups and the smear's gate are free. The full model runs every stage,
        so its cost is the sum (SPEC routing's c0 is stage 0's share). Training costs 3x forward
        (the usual 6N rule). The training log's MFU, ``poelm plan``, the routing projection and
        ``bench/gpu.py`` all read this one count."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        head = 2 * cfg.n_embd * cfg.vocab_size
        per_stage = []
        for k in range(cfg.n_stages):
            a, b = cfg.stage_bounds(k)
            f = 0.0
            for i in range(a, b):
                blk = self.blocks[i]
                mat = sum(p.numel() for name, p in blk.named_parameters() if "ve_gate" not in name)
                f += 2 * mat + 4 * cfg.n_head * cfg.head_dim * attention_context(self.windows[i], seq_len=T, context=context)
            per_stage.append(f + head)
        return {"per_stage": per_stage, "total": sum(per_stage), "train_total": 3 * sum(per_stage)}


def attention_context(window: int | None, *, seq_len: int, context: float | None = None) -> float:
    """Keys one query of a layer with window W (None: full context) sees, the one definition of
    the FLOPs count. Given ``context`` (keys before a decoded position): ``min(context, W+1)``.
    Otherwise the row mean over ``seq_len`` positions, position i seeing ``min(i+1, W+1)`` keys:
    ``(1/T) sum_{i<T} min(i+1, W+1)`` in closed form, which is ``(T+1)/2`` without a binding window."""
    if context is not None:
        return context if window is None else min(context, window + 1)
    T = seq_len
    n = T if window is None else min(T, window + 1)  # positions 0..n-1 see i+1 keys, the rest W+1
    return (n * (n + 1) / 2 + (T - n) * ((window or 0) + 1)) / T
