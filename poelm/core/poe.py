"""Pure Product-of-Experts math over per-stage log-probabilities.

Everything here is a function of tensors; it imports torch only, so the Hugging Face export
ships this very file next to ``model.py`` (one source of truth for the PoE math).

Notation follows ``SPEC.md``: K stages, ``z_k = log_softmax(logits_k)`` (nats) over the
vocabulary at one position. Stage tensors are stacked on dim 0: ``z`` has shape ``[S, ..., V]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-2 / nanochat logit soft-capping ``cap * tanh(x / cap)``; ``cap <= 0`` disables it."""
    if cap <= 0:
        return logits
    return cap * torch.tanh(logits / cap)


def aggregate(z: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """PoE aggregate of a stack of stage log-probs, renormalised.

    ``agg_alpha(S) = n**alpha * mean_{k in S} z_k`` then ``log_softmax`` (SPEC "PoE aggregation").
    alpha=0 is the geometric mean (the default "full K" model), alpha=0.5 is ``sum/sqrt(n)``,
    alpha=1 is the plain sum (log opinion pool). ``z``: ``[n, ..., V]``; returns ``[..., V]``.
    A single stage (n=1) returns that stage's own distribution for every alpha.
    """
    n = z.shape[0]
    agg = z.mean(dim=0)
    if alpha != 0.0 and n > 1:
        agg = agg * (n ** alpha)
    return F.log_softmax(agg, dim=-1)


def select(z: torch.Tensor, stages) -> torch.Tensor:
    """Stack the stages named by ``stages`` (an int, an iterable of ints, or None for all)."""
    if stages is None:
        return z
    if isinstance(stages, int):
        return z[stages : stages + 1]
    idx = list(stages)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return z[idx[0] : idx[0] + len(idx)]
    return z[idx]


def prefix(z: torch.Tensor, k_prime: int) -> torch.Tensor:
    """Prefix-K' PoE (stages 0..K'-1, alpha=0). Prefix K'=1 is single s0."""
    return aggregate(z[:k_prime], 0.0)


def cumulative(z: torch.Tensor) -> torch.Tensor:
    """Cumulative PoE ``c_s = mean_{k<=s} z_k`` for s = 0..K-1 (not renormalised; WAND works
    on differences between tokens, which renormalisation does not change). Shape as ``z``."""
    K = z.shape[0]
    counts = torch.arange(1, K + 1, device=z.device, dtype=z.dtype).view(K, *([1] * (z.dim() - 1)))
    return z.cumsum(dim=0) / counts


def wand_ranges(z: torch.Tensor) -> torch.Tensor:
    """``range(delta_s) = max(delta_s) - min(delta_s)`` with ``delta_s = c_{s+1} - c_s``.

    Returns ``[K-1, ...]`` (one value per transition and position). Adding a constant to a
    position's log-probs (or using logits instead) leaves it unchanged, and no remaining
    transition can move the gap between two tokens by more than its range (SPEC "WAND").
    """
    c = cumulative(z)
    delta = c[1:] - c[:-1]
    return delta.amax(dim=-1) - delta.amin(dim=-1)


def top2_margin(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, top1 - top2) along the vocabulary axis."""
    top = logp.topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


def wand_exit(c_s: torch.Tensor, remaining_bound: float) -> torch.Tensor:
    """WAND early-exit rule after stage s: ``top1(c_s) - top2(c_s) > sum of remaining bounds``.

    If the remaining transitions each move any token-pair gap by at most their bound, a margin
    larger than the bounds' sum cannot be overturned, so top1 is final (SPEC "adaptive depth")."""
    _, margin = top2_margin(c_s)
    return margin > remaining_bound


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (nats) of ``targets`` under ``logp`` ``[..., V]``."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


LN2 = math.log(2.0)


def bpb(nll_nats_sum, byte_sum):
    """Bits per byte (SPEC "Bits per byte"): ``BPB = sum over target positions of NLL (nats) /
    (ln 2 * sum of UTF-8 bytes of those target tokens)``; NaN where there are no bytes.

    Positions whose target is a special token carry 0 bytes and must be excluded from the NLL
    sum by the caller (``bpb_sums`` does this). The one home of the formula: training's
    evaluation, the measurement, ``poelm compare`` and the tests call it. Scalars give a float;
    arrays or tensors of sums (e.g. one per bootstrap resample) give BPB elementwise. The
    bootstrap resamples it as a ratio of sums, never as a mean of per-block BPBs."""
    if getattr(nll_nats_sum, "ndim", 0) == 0 and getattr(byte_sum, "ndim", 0) == 0:
        return float(nll_nats_sum) / (LN2 * float(byte_sum)) if float(byte_sum) > 0 else float("nan")
    empty = byte_sum <= 0
    out = nll_nats_sum / (LN2 * (byte_sum + empty))  # numpy and torch alike, without importing numpy here
    out[empty] = float("nan")
    return out


def bpb_sums(logp: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor):
    """(sum of NLL over positions whose target has > 0 bytes, sum of their bytes).

    ``token_bytes[v]`` is the UTF-8 length of token v (0 for special tokens such as BOS);
    targets < 0 are ignored padding."""
    valid = targets >= 0
    safe = targets.clamp_min(0)
    nbytes = token_bytes[safe] * valid
    counted = nbytes > 0
    loss = nll(logp, safe)
    return (loss * counted).sum(), nbytes.sum()
