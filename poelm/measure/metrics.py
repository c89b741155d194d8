"""Position-level metrics of a PoE model: pure functions of stage log-probs, and their sums.

Every figure of ``poelm measure`` that is defined per position (BPB, accuracy, the alpha sweep,
prefix BPB, WAND ranges, stage-0 confidence, agreement) comes out of ``position_stats`` applied to
the ``[K, N, V]`` stage log-probs of ONE forward (``PoEGPT.stage_log_probs``); the accumulators
here reduce those per-position values to per-block sums (for the bootstrap) and to fixed-size
histograms (for quantiles and routing), so memory does not grow with the slice except by one row
of ~30 floats per block of 1024 tokens.

Under ``torch.distributed`` (``poelm measure`` under torchrun) every accumulator has an
``all_reduce()`` that makes it, on every rank, what one process would have accumulated over all
ranks' positions: per-block sums and histograms are added (float64; counts are exact, NLL sums
equal up to summation order), the exact quantile tails are gathered and merged (a top-k of the
union of the per-rank top-k's is the global top-k, so p99 and max are bitwise equal).

Definitions are those of SPEC.md, restated in each docstring. Positions whose target is a special
token (0 UTF-8 bytes, e.g. BOS) are excluded from EVERY metric (not only BPB), so all figures of one
record are over the same set of positions ("counted" positions). SPEC is silent on accuracy and
routing at document boundaries; excluding them keeps one denominator per record.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_sum_(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- scalar formulas
def projected_speedup(fraction: float, c0: float) -> float:
    """Routing speedup ``1 / (f * c0 + (1 - f))``: a fraction f of positions costs stage 0 only
    (c0 = its share of the full model's FLOPs per token), the rest the full model."""
    return 1.0 / (fraction * c0 + (1.0 - fraction))


# ----------------------------------------------------------------------------- one batch
def _lse_scaled(S: torch.Tensor, mx: torch.Tensor, scale: float, buf: torch.Tensor) -> torch.Tensor:
    """``log sum_v exp(scale * S_v)`` stabilised by the row max ``mx`` of S (scale > 0): one fused
    ``scale * S - scale * mx`` (``torch.add`` with ``alpha``), an in-place exp and a sum, so three
    passes over the row instead of ``logsumexp``'s five (the max is shared between alphas)."""
    torch.add((-scale * mx).unsqueeze(-1), S, alpha=scale, out=buf)
    buf.exp_()
    return buf.sum(dim=-1).log_() + scale * mx


@torch.no_grad()
def position_stats(z: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor, alphas=ALPHAS,
                   bounds=None, confidence: str = "maxprob", full: bool = True) -> dict:
    """Per-position values for N positions from stage log-probs ``z`` ``[K, N, V]`` (fp32).

    With ``S_j = sum_{k<j} z_k`` (so ``c_{j-1} = S_j / j`` is the cumulative PoE):

    - ``nll_single[k] = -z_k[t]``;
    - ``nll_alpha[a] = lse(K**a * S_K / K) - K**a * S_K[t] / K`` (SPEC aggregation over all K,
      renormalised; ``alphas[0]`` must be 0: the full-K model);
    - ``nll_prefix[j-1] = lse(S_j / j) - S_j[t] / j`` for K' = j = 1..K-1 (K'=1 is single s0);
    - ``correct_single[k] = argmax z_k == t``, ``correct_full = argmax S_K == t`` (alpha does not
      change an argmax);
    - ``wand_range[s] = range(c_{s+1} - c_s) = range(z_{s+1} - c_s) / (s + 2)`` for s = 0..K-2,
      with ``range(x) = max(x) - min(x)`` over the vocabulary (SPEC "WAND"; shift invariant);
    - ``conf`` stage-0 confidence: max probability (``maxprob``) or top-1 minus top-2 probability
      (``margin``);
    - ``agree = argmax z_0 == argmax S_K``; ``s0_regress = correct_full and not correct_single[0]``;
    - with ``bounds`` (K-1 WAND bounds): ``exit_stage`` = the first s with
      ``top1(c_s) - top2(c_s) > sum_{i>=s} bounds[i]`` (K-1 = ran every stage), and
      ``exit_agree`` = the token emitted there equals full K's argmax.

    ``full=False`` (the calibration pass) skips the alpha sweep (only alpha 0), the prefixes and
    the top-1 of stages 1..K-1 (``correct_single`` then has stage 0 only).
    ``counted`` marks positions whose target has > 0 bytes (targets < 0 are padding)."""
    K, N, V = z.shape
    if alphas[0] != 0.0:
        raise ValueError("alphas[0] must be 0 (the full-K model)")
    valid = targets >= 0
    t = targets.clamp_min(0)
    nbytes = token_bytes[t] * valid
    out = {"counted": nbytes > 0, "bytes": nbytes}
    zt = z.gather(-1, t.view(1, N, 1).expand(K, N, 1)).squeeze(-1)  # [K, N]
    out["nll_single"] = -zt
    top_v, top_i = (z if full else z[:1]).max(dim=-1)  # [K, N]: every stage's top-1 in one reduction
    out["correct_single"] = top_i == t
    if confidence == "maxprob":
        out["conf"] = top_v[0].exp()
    elif confidence == "margin":
        v2 = z[0].topk(2, dim=-1).values
        out["conf"] = v2[:, 0].exp() - v2[:, 1].exp()
    else:
        raise ValueError(f"unknown confidence {confidence!r}: use maxprob or margin")

    need_exit = bounds is not None and K > 1
    remaining = [sum(float(b) for b in list(bounds)[s:]) for s in range(K - 1)] if need_exit else []
    S = z[0].clone()  # S_1
    buf = torch.empty_like(S)
    ranges, prefix, margins = [], ([out["nll_single"][0]] if K > 1 else []), []
    for s in range(K - 1):  # here S = S_{s+1}
        mx = None
        if need_exit:
            v2, i2 = S.topk(2, dim=-1)
            mx = v2[:, 0]
            margins.append(((v2[:, 0] - v2[:, 1]) / (s + 1), i2[:, 0]))
        if full and s >= 1:  # prefix K' = s + 1
            mx = S.amax(dim=-1) if mx is None else mx
            j = s + 1
            prefix.append(_lse_scaled(S, mx, 1.0 / j, buf) - S.gather(-1, t[:, None]).squeeze(-1) / j)
        torch.add(z[s + 1], S, alpha=-1.0 / (s + 1), out=buf)  # z_{s+1} - c_s
        # amax and amin separately: torch.aminmax is ~30x slower on CPU (torch 2.x, measured)
        ranges.append((buf.amax(dim=-1) - buf.amin(dim=-1)) / (s + 2))
        S.add_(z[s + 1])
    mx, full_i = S.max(dim=-1)  # S = S_K
    St = S.gather(-1, t[:, None]).squeeze(-1)
    nll_alpha = []
    for a in (alphas if full else alphas[:1]):
        scale = (K ** a) / K
        nll_alpha.append(_lse_scaled(S, mx, scale, buf) - St * scale)
    out["nll_alpha"] = torch.stack(nll_alpha)
    if full:
        out["nll_prefix"] = torch.stack(prefix) if prefix else z.new_zeros((0, N))
    out["correct_full"] = full_i == t
    out["agree"] = top_i[0] == full_i
    out["s0_regress"] = out["correct_full"] & ~out["correct_single"][0]
    out["wand_range"] = torch.stack(ranges) if ranges else z.new_zeros((0, N))
    if need_exit:
        exit_stage = torch.full((N,), K - 1, dtype=torch.long, device=z.device)
        token = full_i.clone()
        for s in range(K - 2, -1, -1):  # descending so the FIRST exiting stage wins
            m, i = margins[s]
            hit = m > remaining[s]
            exit_stage = torch.where(hit, torch.full_like(exit_stage, s), exit_stage)
            token = torch.where(hit, i, token)
        out["exit_stage"] = exit_stage
        out["exit_agree"] = token == full_i
    return out


# ----------------------------------------------------------------------------- block sums
def block_columns(K: int, n_alpha: int = len(ALPHAS)) -> list[str]:
    """Names of the per-block sums kept for the bootstrap (one row per block)."""
    cols = ["bytes", "count"]
    cols += [f"nll.single.{k}" for k in range(K)]
    cols += [f"nll.alpha.{i}" for i in range(n_alpha)]
    cols += [f"nll.prefix.{j}" for j in range(1, K)]
    cols += [f"correct.single.{k}" for k in range(K)]
    cols += ["correct.full", "agree", "s0_regress", "routed"]
    return cols


class BlockSums:
    """Per-block sums of the position values, blocks = ``block_tokens`` consecutive target
    positions of the slice (the last block may be shorter). Memory: n_blocks x ~30 doubles."""

    def __init__(self, K: int, n_positions: int, block_tokens: int, n_alpha: int = len(ALPHAS), device="cpu"):
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        self.K, self.block_tokens = K, block_tokens
        self.columns = block_columns(K, n_alpha)
        self.index = {c: i for i, c in enumerate(self.columns)}
        self.n_blocks = max(1, -(-n_positions // block_tokens))
        self.sums = torch.zeros(self.n_blocks, len(self.columns), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, stats: dict, positions: torch.Tensor):
        """Add the values of ``position_stats`` at slice positions ``positions`` ``[N]``."""
        c = stats["counted"]
        w = c.double()
        feats = [stats["bytes"].double() * w, w]
        feats += list(stats["nll_single"].double() * w)
        feats += list(stats["nll_alpha"].double() * w)
        feats += list(stats["nll_prefix"].double() * w)
        feats += list((stats["correct_single"] & c).double())
        feats += [(stats["correct_full"] & c).double(), (stats["agree"] & c).double(), (stats["s0_regress"] & c).double()]
        routed = stats.get("routed")  # set by the caller once a routing threshold is known
        feats.append((routed & c).double() if routed is not None else torch.zeros_like(w))
        X = torch.stack(feats, dim=1)
        self.sums.index_add_(0, positions.to(self.sums.device) // self.block_tokens, X.to(self.sums.device))

    def all_reduce(self) -> "BlockSums":
        """Sum the blocks over ranks (each rank added its own positions; float64)."""
        _all_sum_(self.sums)
        return self

    def array(self) -> np.ndarray:
        return self.sums.cpu().numpy()


# ----------------------------------------------------------------------------- quantiles
class StreamingQuantile:
    """Quantiles of a stream of values with bounded memory, per row of ``rows`` streams.

    Two parts: (1) a fixed histogram of ``bins`` equal bins over ``[lo, hi]`` (values outside are
    clamped into the end bins) gives any quantile with error at most one bin width
    ``(hi - lo) / bins``, interpolating linearly inside the bin; (2) an exact tail: the largest
    ``tail`` values seen, so quantiles ``q >= 1 - (tail - 1) / n`` (e.g. p99 and max whenever
    ``n <= n_max``) are exact, with the same linear interpolation as ``numpy.quantile``
    (position ``h = (n - 1) q`` in the sorted values)."""

    def __init__(self, rows: int, lo: float, hi: float, bins: int = 65536, q_exact: float = 0.99, n_max: int = 0, device="cpu"):
        self.rows, self.lo, self.hi, self.bins = rows, float(lo), float(hi), int(bins)
        self.hist = torch.zeros(rows, self.bins, dtype=torch.float64, device=device)
        self.n = 0
        self.tail_size = max(2, n_max - math.floor((n_max - 1) * q_exact) + 1) if n_max > 0 else 2
        self.tail = torch.empty(rows, 0, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, values: torch.Tensor):
        """``values`` ``[rows, n]``."""
        if values.numel() == 0:
            return
        v = values.to(self.hist.device, torch.float32)
        self.n += v.shape[1]
        width = (self.hi - self.lo) / self.bins
        idx = ((v - self.lo) / width).floor().clamp(0, self.bins - 1).long()
        self.hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        both = torch.cat([self.tail, v], dim=1)
        k = min(self.tail_size, both.shape[1])
        self.tail = both.topk(k, dim=1).values  # descending

    @torch.no_grad()
    def all_reduce(self) -> "StreamingQuantile":
        """Merge the per-rank streams: histograms and counts are summed; the tails (each rank's
        top ``min(tail, n_rank)`` values, padded with -inf to ``tail`` columns so every rank sends
        the same shape) are all-gathered and the top ``min(tail, n)`` of their union kept. That
        union contains the global top ``min(tail, n)`` values, so the merged tail is exactly the
        single-process one."""
        if world_size() == 1:
            return self
        _all_sum_(self.hist)
        dev = self.hist.device
        n = _all_sum_(torch.tensor([self.n], dtype=torch.int64, device=dev))
        pad = self.tail.new_full((self.rows, self.tail_size), float("-inf"))
        pad[:, : self.tail.shape[1]] = self.tail
        parts = [torch.empty_like(pad) for _ in range(world_size())]
        dist.all_gather(parts, pad)
        self.n = int(n.item())
        self.tail = torch.cat(parts, dim=1).topk(min(self.tail_size, self.n), dim=1).values
        return self

    def quantile(self, q: float) -> list[float]:
        """Per row: exact from the tail when it reaches position ``h``, else from the histogram."""
        n = self.n
        if n == 0:
            return [float("nan")] * self.rows
        h = (n - 1) * q
        lo_i = math.floor(h)
        frac = h - lo_i
        hi_i = min(lo_i + 1, n - 1)
        d_lo, d_hi = n - 1 - lo_i, n - 1 - hi_i  # indices in the descending tail
        if d_lo < self.tail.shape[1]:
            a, b = self.tail[:, d_lo].double(), self.tail[:, d_hi].double()
            return (a + frac * (b - a)).tolist()
        return self._hist_quantile(q)

    def _hist_quantile(self, q: float) -> list[float]:
        width = (self.hi - self.lo) / self.bins
        cum = self.hist.cumsum(dim=1)
        target = (self.n - 1) * q + 0.5  # rank h = (n-1) q sits half way into its unit of mass
        out = []
        for r in range(self.rows):
            j = int(torch.searchsorted(cum[r], torch.tensor([target], dtype=torch.float64, device=cum.device)).item())
            j = min(j, self.bins - 1)
            before = cum[r, j - 1].item() if j > 0 else 0.0
            inbin = self.hist[r, j].item()
            pos = (target - before) / inbin if inbin > 0 else 0.5
            out.append(self.lo + (j + min(max(pos, 0.0), 1.0)) * width)
        return out

    @property
    def resolution(self) -> float:
        return (self.hi - self.lo) / self.bins

    def max(self) -> list[float]:
        return self.tail[:, 0].tolist() if self.n else [float("nan")] * self.rows


# ----------------------------------------------------------------------------- routing
def routing_threshold(counts, regress, cap: float, metric: str = "agreement") -> dict:
    """Lowest confidence threshold tau whose routing metric is <= ``cap``.

    ``counts[j]`` = positions whose stage-0 confidence falls in bin j of R equal bins over
    [0, 1] (bin = floor(conf * R), conf = 1 in the last bin); ``regress[j]`` = their summed
    regression (a count of regressions for ``agreement`` and ``target``, summed NLL increase in
    nats for ``nll``; ``RoutingHistogram``). Candidate thresholds are the bin edges tau_j = j / R,
    j = 0..R-1: routing ``conf >= tau_j`` routes exactly bins j..R-1, so each candidate is
    evaluated exactly; resolution 1/R. ``metric(tau) = sum regress[j:] / sum counts[j:]`` (the
    SPEC rates are means over routed positions). An empty routed set never occurs below R; if
    no candidate meets the cap the result is tau = 1.0 with nothing routed (fraction 0).
    Returns tau, fraction routed, the metric at tau and the candidate index."""
    counts = np.asarray(counts, dtype=np.float64)
    regress = np.asarray(regress, dtype=np.float64)
    R = counts.shape[0]
    total = counts.sum()
    n_suffix = np.cumsum(counts[::-1])[::-1]
    r_suffix = np.cumsum(regress[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(n_suffix > 0, r_suffix / np.where(n_suffix > 0, n_suffix, 1.0), 0.0)
    ok = np.nonzero((rate <= cap) & (n_suffix > 0))[0]
    if total == 0 or ok.size == 0:
        return {"tau": 1.0, "fraction": 0.0, "value": 0.0, "index": R}
    j = int(ok[0])
    return {"tau": j / R, "fraction": float(n_suffix[j] / total), "value": float(rate[j]), "index": j}


def routing_at(counts, regress, index: int) -> dict:
    """Fraction routed and metric at a given candidate index (evaluate a calibrated tau on
    another slice's histogram with the same bins)."""
    counts = np.asarray(counts, dtype=np.float64)
    regress = np.asarray(regress, dtype=np.float64)
    total = counts.sum()
    n = counts[index:].sum()
    return {"fraction": float(n / total) if total else 0.0, "value": float(regress[index:].sum() / n) if n else 0.0}


class RoutingHistogram:
    """Stage-0 confidence histogram (R bins over [0, 1]) with, per bin, the count and the summed
    regression under each routing metric (so the metric can be chosen after the pass).

    Per routed position (SPEC "Confidence-aware routing"; why ``agreement`` is the default:
    ``poelm.measure.calibrate``'s docstring): ``agreement`` = 1 when stage 0's top-1 differs from
    full K's top-1; ``target`` = 1 when full K is right and stage 0 wrong (the label-based rule,
    once called ``target_regression``, still accepted); ``nll`` = target NLL of stage 0 minus
    that of full K (nats)."""

    METRICS = ("agreement", "target", "nll")
    ALIASES = {"target_regression": "target"}
    _ROW = {"target": 1, "agreement": 2, "nll": 3}  # data rows: count, target, agreement, nll

    def __init__(self, bins: int = 10000, device="cpu"):
        self.bins = bins
        self.data = torch.zeros(4, bins, dtype=torch.float64, device=device)  # count, target, agreement, nll

    def bin_index(self, conf: torch.Tensor) -> torch.Tensor:
        """Bin of each confidence: floor(conf * R), conf = 1 in the last bin."""
        return (conf.double() * self.bins).floor().clamp(0, self.bins - 1).long()

    def routed(self, conf: torch.Tensor, index: int) -> torch.Tensor:
        """Positions routed to stage 0 at candidate threshold ``index / R`` (same binning as the
        histogram, so per-position decisions and histogram sums agree exactly)."""
        return self.bin_index(conf) >= index

    @torch.no_grad()
    def add(self, stats: dict):
        c = stats["counted"]
        idx = self.bin_index(stats["conf"][c]).to(self.data.device)
        vals = torch.stack([
            torch.ones_like(idx, dtype=torch.float64),
            stats["s0_regress"][c].double(),
            (~stats["agree"][c]).double(),
            (stats["nll_single"][0][c] - stats["nll_alpha"][0][c]).double(),
        ]).to(self.data.device)
        self.data.scatter_add_(1, idx.expand(4, -1), vals)

    def all_reduce(self) -> "RoutingHistogram":
        """Sum the bins over ranks (counts exact; the NLL-increase sums up to summation order)."""
        _all_sum_(self.data)
        return self

    @classmethod
    def canonical(cls, metric: str) -> str:
        """The metric's name (``target_regression`` -> ``target``); ValueError if unknown."""
        name = cls.ALIASES.get(metric, metric)
        if name not in cls.METRICS:
            raise ValueError(f"unknown routing metric {metric!r}: use one of {', '.join(cls.METRICS)}")
        return name

    def arrays(self, metric: str):
        d = self.data.cpu().numpy()
        return d[0], d[self._ROW[self.canonical(metric)]]


# ----------------------------------------------------------------------------- speculative
def spec_rounds(agree, m: int) -> dict:
    """Exact statistics of greedy self-speculative decoding from a teacher-forced agreement row.

    ``agree[i]`` says whether stage 0's argmax equals the full-K greedy token at new position i,
    with the context being the full-K greedy sequence itself. While drafts are accepted the draft
    context IS that sequence, so one teacher-forced pass over full-K greedy output reproduces the
    rounds exactly. Round convention of ``poelm.infer`` / ``speculative.decode``: the first new
    token comes from the full model's prefill; a round at new position p drafts
    ``d = min(m, n - p - 1)`` tokens (never past the last one), accepts the longest agreeing prefix
    ``a``, emits ``a`` drafts plus one full-K token (correction, or bonus after d accepts) and moves
    to ``p + a + 1``. Acceptance = accepted / proposed; mean_accepted = accepted draft tokens per
    round (SPEC)."""
    agree = [bool(x) for x in agree]
    n, p = len(agree), 1
    accepted = proposed = rounds = 0
    while p < n:
        d = min(m, n - p - 1)
        a = 0
        while a < d and agree[p + a]:
            a += 1
        accepted += a
        proposed += d
        rounds += 1
        p += a + 1
    return {"accepted": accepted, "proposed": proposed, "rounds": rounds,
            "acceptance": accepted / proposed if proposed else float("nan"),
            "mean_accepted": accepted / rounds if rounds else float("nan")}
