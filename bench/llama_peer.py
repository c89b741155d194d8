"""A stock transformers ``LlamaForCausalLM`` of a poelm model's trunk shape, for the benches.

Same layers, width, attention heads, KV heads, MLP width, vocabulary and maximum length, random
weights, untied embeddings, SDPA attention, fp32. What differs is the architecture itself, and
``differences`` names it next to every ratio: Llama's MLP is SwiGLU (three ``d x intermediate``
matrices, poelm's relu^2 has two), its RMSNorms carry weights, and it has none of poelm's value
embeddings (a lookup and a gate on alternating layers), ``x0`` mixing (two per-layer scalars), QK
norm, logit softcap or K-1 extra stage heads. ``flops_per_token`` counts Llama's forward FLOPs
with the rule of ``PoEGPT.flops_per_token`` (2 per matmul weight, ``4 * n_head * head_dim *
context`` of attention per layer, the head), so ratios can also be read per FLOP.
"""

from __future__ import annotations

import torch


def llama_like(cfg, seed: int = 0):
    """A random ``LlamaForCausalLM`` with ``cfg``'s trunk shape (``cfg``: a poelm ModelConfig)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # transformers is a declared dependency; say so if it is missing
        raise SystemExit(f"the Llama peer needs transformers ({e}); pip install transformers") from None
    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
                     rope_theta=cfg.rope_base, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    lc._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(lc)


def flops_per_token(cfg, context: float) -> float:
    """Llama's forward FLOPs per token by poelm's rule (see module docstring)."""
    d, hd = cfg.n_embd, cfg.head_dim
    layer = 2 * (d * cfg.n_head * hd * 2 + 2 * d * cfg.kv_dim + 3 * d * cfg.intermediate) + 4 * cfg.n_head * hd * context
    return cfg.depth * layer + 2 * d * cfg.vocab_size


def differences(cfg) -> str:
    """The architectural differences between poelm's model and the Llama peer, in one line."""
    ve = sum(cfg.has_value_embed(i) for i in range(cfg.depth))
    parts = [f"poelm adds value embeddings on {ve}/{cfg.depth} layers" if ve else "no value embeddings",
             "x0 mixing", "QK norm", f"softcap {cfg.softcap:g}"]
    if cfg.n_stages > 1:
        parts.append(f"{cfg.n_stages} stage heads")
    return ", ".join(parts) + "; Llama adds SwiGLU (3 MLP matrices vs 2) and RMSNorm weights"
