"""What the model accepts: token-id validation, and the masks and positions of padded batches.

Padded batches (left padding for generation, right padding for scoring) and the holes that
per-row speculative acceptance leaves behind are one mechanism: every row has a boolean
``valid [B, Tk]`` over the cache slots (False = padding or a rejected draft) and its own RoPE
``positions [B, T]`` for the new slots (the count of valid slots before each one, HF's
``attention_mask.cumsum(-1) - 1``). A row's real tokens then see exactly the keys and positions
they would see alone. Without padding both are None and attention takes the unmasked causal
kernel (the fast path: nothing extra is built).

Imports torch only; shipped verbatim with ``model.py`` in every export.
"""

from __future__ import annotations

import torch


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, Tk]`` of a 0/1 or boolean mask: valid slots count 0, 1, 2...; a
    padding slot gets its row's next position clamped at 0 (its output is never used)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def attention_mask(valid: torch.Tensor, T: int, window: int | None = None) -> torch.Tensor:
    """The SDPA boolean mask ``[B, 1, T, Tk]`` for T queries in the last T of Tk slots: causal,
    and only keys whose slot is valid in that row. Every query also sees its own slot, so a
    padding query's row is never empty: SDPA would return NaN there, and ``0 * NaN`` in the next
    layer would poison the real rows that mask it out.

    ``window`` W (a sliding-window layer, ``ModelConfig.window_sizes``): a query at position i
    also needs ``i - j <= W`` for key position j, positions counted over the row's real tokens
    (``positions_from_mask``), so a padded or holed row sees the keys it would see alone."""
    Tk = valid.size(1)
    kpos = torch.arange(Tk, device=valid.device)
    qpos = kpos[Tk - T :, None]
    allowed = (kpos[None, :] <= qpos) & valid[:, None, :]
    if window is not None:
        real = positions_from_mask(valid)  # [B, Tk]
        allowed &= (real[:, Tk - T :, None] - real[:, None, :]) <= window
    return (allowed | (kpos[None, :] == qpos)).unsqueeze(1)


def window_mask(T: int, Tk: int, window: int, device=None) -> torch.Tensor:
    """The SDPA boolean mask ``[T, Tk]`` of an unpadded sliding-window layer: the T queries sit
    at positions ``Tk-T .. Tk-1`` and query i sees key j when ``0 <= i - j <= window`` (the
    reference's flash-attention ``window_size=(window, 0)``: window + 1 keys with itself)."""
    kpos = torch.arange(Tk, device=device)
    d = kpos[Tk - T :, None] - kpos[None, :]
    return (d >= 0) & (d <= window)


def previous_slots(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the row's last valid slot strictly before it: ``(prev [B, Tk] clamped at
    0, has_prev [B, Tk] bool)``. The smear (``PoEGPT.embed``) mixes in the embedding of the
    previous real token, so a left-padded row's first token and a hole-skipping row (rejected
    speculative drafts) see what the row alone would see."""
    Tk = valid.size(1)
    slots = torch.arange(Tk, device=valid.device).expand_as(valid)
    last = torch.where(valid, slots, torch.full_like(slots, -1)).cummax(dim=1).values  # at or before t
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    return prev.clamp_min(0), prev >= 0


def check_input_ids(idx, vocab_size: int, what: str = "input_ids") -> None:
    """One ``ValueError`` naming the problem and the fix, before any compute: ``idx`` must be a
    non-empty integer tensor ``[batch, seq]`` of ids in ``[0, vocab_size)``."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{what} must be a torch.LongTensor [batch, seq], got {type(idx).__name__}: wrap the ids with torch.tensor([...])")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {idx.dtype}: pass ids (tokenizer output), e.g. ids.long()")
    if idx.dim() != 2:
        raise ValueError(f"{what} must be 2-D [batch, seq], got shape {tuple(idx.shape)}: add a batch dimension with ids[None] (or ids.unsqueeze(0))")
    if idx.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(idx.shape)}): give at least one token per row (e.g. BOS)")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds token id {bad} outside the vocabulary [0, {vocab_size}): use this model's tokenizer (or resize_token_embeddings)")
