"""``KVCache``: per-layer keys and values of a batch, with a per-layer filled length.

Keys are stored after RoPE, QK-norm and ``qk_scale``, for every slot ever written: sliding
windows (``ModelConfig.window_sizes``) are applied by attention's mask, never by evicting slots,
so speculative rollback (``truncate``) and slot repacking (``gather_slots``) stay exact for every
window. Imports torch only; shipped verbatim with ``model.py`` in every export.
"""

from __future__ import annotations

import torch

from .inputs import previous_slots


class KVCache:
    """Per-layer key/value cache with a per-layer filled length.

    Lengths are tracked per layer because adaptive depth (WAND, routing) leaves the layers of
    skipped stages behind; ``write`` refuses to leave a gap, so a deeper position can never attend
    to a state that was not computed (the engine must catch the layer up first). ``truncate``
    rolls every layer back (speculative decoding)."""

    def __init__(self, cfg, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.depth, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * cfg.depth
        self.max_len = max_len
        # The smear's memory (``smear_previous``): every slot's pre-smear normed embedding, kept
        # per slot rather than the reference's single ``prev_embedding`` so that rollback, holes
        # and repacking stay exact. Allocated on first use (models with ``smear`` only).
        self.emb = None
        self.emb_length = 0

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
        self.emb_length = min(self.emb_length, length)

    def smear_previous(self, e: torch.Tensor, pos: int, valid: torch.Tensor | None = None):
        """Store the pre-smear embeddings ``e [B, T, d]`` of slots ``pos..pos+T-1`` and return,
        per new slot, the pre-smear embedding of the row's previous real token and whether there
        is one: ``(prev [B, T, d], has_prev [B, T])``. ``valid [B, pos+T]`` marks real slots
        (padding, holes); None: every slot is real."""
        B, T, d = e.shape
        if pos > self.emb_length:
            raise RuntimeError(f"smear cache gap: writing at {pos}, filled {self.emb_length}")
        if pos + T > self.max_len:
            raise RuntimeError(f"KV cache full: {pos + T} > {self.max_len}")
        if self.emb is None:
            self.emb = torch.zeros(B, self.max_len, d, device=e.device, dtype=e.dtype)
        self.emb[:, pos : pos + T] = e
        self.emb_length = pos + T
        return gather_previous(self.emb[:, : pos + T], T, valid)

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
        if self.emb is not None:
            self.emb[:, :n] = self.emb.gather(1, src[:, :, None].expand(-1, -1, self.emb.size(2)))
            self.emb_length = n

    def stage_length(self, cfg, k: int) -> int:
        """Positions filled in every layer of stage k."""
        a, b = cfg.stage_bounds(k)
        return min(self.lengths[a:b])


def gather_previous(emb: torch.Tensor, T: int, valid: torch.Tensor | None):
    """For the last T of the slots of ``emb [B, Tk, d]``: the previous real slot's row of ``emb``
    and whether one exists, ``(prev [B, T, d], has_prev [B, T])`` (``valid [B, Tk]`` or None =
    every slot real). Shared by ``KVCache`` and the transformers cache adapter."""
    B, Tk, d = emb.shape
    if valid is None:
        slot = torch.arange(Tk - T - 1, Tk - 1, device=emb.device)
        has = (slot >= 0).expand(B, T)
        prev = emb[:, slot.clamp_min(0)]
    else:
        slot, has = previous_slots(valid)
        slot, has = slot[:, Tk - T :], has[:, Tk - T :]
        prev = emb.gather(1, slot.unsqueeze(-1).expand(-1, -1, d))
    return prev, has
