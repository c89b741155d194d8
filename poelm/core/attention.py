"""Attention kernels: which one runs a layer's attention, and the mask each one needs.

``ModelConfig.attn_impl`` chooses (config.json carries it; the exported remote code runs this
file):

- ``"sdpa"``: ``F.scaled_dot_product_attention``. Causal rows with no binding window take the
  ``is_causal`` kernels (FlashAttention / memory-efficient on CUDA); a sliding-window layer or a
  padded batch passes a boolean ``[.., T, Tk]`` mask, which rules the FlashAttention backend out
  on CUDA: the full ``T x Tk`` scores are computed and the mask is held in memory, although a
  window of W keys needs only ``T x (W+1)`` of them.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (Dong et al. 2024,
  "Flex Attention", arXiv:2412.05496): the same predicate as the SDPA mask, written as a
  ``mask_mod``, so blocks that no query of theirs can see are skipped. It replaces only the
  masked calls: full causal rows keep SDPA's maskless ``is_causal`` kernels. Work and memory of a
  window layer are ``T x (W+1)`` rounded up to 128-key blocks, as the reference's
  FlashAttention-3 ``window_size`` (jaepil/nanochat ``flash_attention.py``). The kernel is
  compiled once (``torch.compile(flex_attention)``; a new shape recompiles, then dynamo turns
  the length dynamic). Block masks of unpadded rows depend on ``(W, T, Tk)`` only and are cached;
  a padded batch's depend on its ``valid`` slots and are built per call.

``flex`` falls back to ``sdpa`` (same mask, same numbers to fp32 rounding) with one warning per
reason where the platform lacks it: torch without ``flex_attention``, a device it does not
support, a head dimension its kernels get wrong (under 32 on CPU: measured, see ``use_flex``;
under 16 on CUDA), and on CPU the backward pass (torch 2.13 implements flex's backward on CUDA only, so
CPU training under ``flex`` runs ``sdpa``; CPU inference runs flex). It also keeps SDPA for
fewer than ``FLEX_MIN_QUERIES`` queries (a decoding step, a speculative verify chunk): such a
mask is ``T x Tk`` with T < one 128-row block, nothing FlashAttention's windows would save, and a
flex kernel recompiled per cache length would cost seconds per step.

Every predicate here is the one of ``inputs.attention_mask`` / ``inputs.window_mask`` (the
reference's window: query i sees key j when ``0 <= i - j <= W``, W+1 keys with itself), and
``tests/core/test_attention.py`` checks the block masks element for element against them.
Imports torch only; shipped verbatim with ``model.py`` in every export.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .arch import ATTN_IMPLS as IMPLS  # noqa: F401  (the names live with ModelConfig)
from .inputs import attention_mask, positions_from_mask, window_mask

FLEX_MIN_QUERIES = 128  # one flex block of queries; shorter chunks keep SDPA (module docstring)
FLEX_COMPILE = True  # False: flex's eager reference path (slow, dense; tests of the mask logic)
_warned: set = set()
_flex_fn = None
_block_cache: dict = {}


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attn_impl='flex': {reason}; running 'sdpa' there instead (same numbers)", RuntimeWarning, stacklevel=3)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class AttnPlan:
    """What one layer's attention over T queries in the last T of Tk slots needs, built once per
    distinct window per ``run_stage`` call and shared by that window's layers.

    ``valid [B, Tk]`` (padded or holed rows) or None; ``window`` W or None (never binds). The SDPA
    mask and the flex block mask are built lazily from the same description."""

    __slots__ = ("impl", "window", "T", "Tk", "valid", "device", "_mask", "_block")

    def __init__(self, impl: str, window, T: int, Tk: int, valid, device):
        self.impl, self.window, self.T, self.Tk, self.valid, self.device = impl, window, T, Tk, valid, device
        self._mask = self._block = None

    def needs_mask(self) -> bool:
        """False where a maskless SDPA kernel is exact: unpadded rows whose window cannot bind,
        as full causal rows (``is_causal``) or one query (its last W+1 keys sliced)."""
        if self.valid is not None:
            return True
        if self.T == 1:
            return False
        return (self.window is not None and self.Tk - 1 > self.window) or self.Tk > self.T

    # -- SDPA
    def sdpa_mask(self):
        """The boolean SDPA mask, or None where a maskless kernel is exact (``needs_mask``)."""
        if self._mask is None and self.needs_mask():
            if self.valid is not None:
                self._mask = attention_mask(self.valid, self.T, self.window)
            elif self.window is not None and self.Tk - 1 > self.window:
                self._mask = window_mask(self.T, self.Tk, self.window, self.device)
            else:  # a causal chunk after cached positions
                qpos = torch.arange(self.Tk - self.T, self.Tk, device=self.device)
                self._mask = torch.arange(self.Tk, device=self.device)[None, :] <= qpos[:, None]
        return self._mask

    # -- flex
    def block_mask(self):
        if self._block is None:
            self._block = _block_mask(self.window, self.T, self.Tk, self.valid, self.device)
        return self._block

    def use_flex(self, q: torch.Tensor) -> bool:
        if self.impl != "flex" or self.T < FLEX_MIN_QUERIES or not self.needs_mask():
            return False  # maskless SDPA keeps its FlashAttention kernels
        if not flex_available():
            _warn_once(f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention")
            return False
        if q.device.type not in ("cuda", "cpu", "xpu", "hpu"):
            _warn_once(f"flex_attention does not run on {q.device.type}")
            return False
        if q.size(-1) < (32 if q.device.type == "cpu" else 16):
            # Measured, torch 2.13 on CPU, static shapes: compiled flex is wrong at head_dim 16 for
            # rows under one 128-query block (error 1.2; NaN at 8) and exact (<= 1.3e-6) at 32 and
            # 64 for T = 40..300. Triton's CUDA kernels need head_dim >= 16.
            _warn_once(f"head_dim {q.size(-1)} is below what flex_attention's {q.device.type} kernels compute correctly")
            return False
        if q.device.type == "cpu" and q.requires_grad:
            _warn_once(f"torch {torch.__version__} has no flex_attention backward on CPU (training on CPU)")
            return False
        return True


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
    """Attention of ``q [B, H, T, D]`` over ``k, v [B, Hkv, Tk, D]`` (GQA when Hkv < H), with the
    default ``1/sqrt(D)`` scale, under ``plan``'s mask."""
    if plan.use_flex(q):
        return _flex()(q, k, v, block_mask=plan.block_mask(), enable_gqa=True)
    mask = plan.sdpa_mask()
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if plan.T == 1:
        W, Tk = plan.window, k.size(2)
        if W is not None and Tk > W + 1:  # an unpadded decoding step: its last W+1 keys, no mask
            k, v = k[:, :, Tk - W - 1 :], v[:, :, Tk - W - 1 :]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flex():
    global _flex_fn
    if _flex_fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_fn = torch.compile(flex_attention) if FLEX_COMPILE else flex_attention
    return _flex_fn


def _block_mask(W, T: int, Tk: int, valid, device):
    """The ``BlockMask`` of ``AttnPlan``: query row ``qi`` sits at slot ``Tk - T + qi``."""
    from torch.nn.attention.flex_attention import create_block_mask

    off = Tk - T
    if valid is None:
        key = (W, T, Tk, str(device))
        hit = _block_cache.get(key)
        if hit is not None:
            return hit

        def mask_mod(b, h, qi, kv):
            d = qi + off - kv
            return (d >= 0) & (d <= W) if W is not None else d >= 0

        out = create_block_mask(mask_mod, None, None, T, Tk, device=device)
        if len(_block_cache) > 64:  # a long-lived server sees many lengths: keep the newest
            _block_cache.pop(next(iter(_block_cache)))
        _block_cache[key] = out
        return out
    real = positions_from_mask(valid)  # [B, Tk]: each row's own positions (padding, holes)

    def padded_mod(b, h, qi, kv):
        q = qi + off
        ok = (kv <= q) & valid[b, kv]
        if W is not None:
            ok = ok & (real[b, q] - real[b, kv] <= W)
        return ok | (kv == q)  # a padding query sees itself: never an empty row (inputs.attention_mask)

    return create_block_mask(padded_mod, valid.size(0), None, T, Tk, device=device)
