"""Self-speculative decoding: stage 0 drafts, the full PoE verifies (SPEC "Self-speculative decoding").

One round, with the pending token x_t (emitted, not yet fed) at position t and every stage's cache
filled up to t:

1. Draft: feed x_t, d_1, ..., d_{m-1} to stage 0 one position at a time
   (``DecodeState.extend(0, .)``, the very path ``full`` decoding uses), drafting ``d_{i+1}`` from
   ``z_0`` at position t+i: m sequential stage-0 steps.
2. Verify: place d_m and call ``extend(K-1, t+m+1)``: the chain runs d_m's position through
   stage 0 and then stages 1..K-1 over the m+1 positions, one chunk per stage, starting from the
   draft's stage-0 hidden states (reused, never recomputed). Stage 0's log-probs for the m+1
   positions come from the drafting steps and the verify chunk. The full PoE at position t+i is
   ``c = (z_0 + z_1 + ... + z_{K-1}) / K``, accumulated as in ``engine._decide``.
3. Accept, per row: greedy keeps the longest prefix with ``d_{i+1} == argmax c_{t+i}`` and emits
   ``argmax c`` at the first mismatch (or the bonus token after m accepts), so the output is
   ``full``'s greedy output. Sampling (temperature > 0) uses the rule of Leviathan et al. 2023
   (arXiv:2211.17192) and Chen et al. 2023 (arXiv:2302.01318): draft ``d ~ q`` (stage 0's processed
   distribution), accept with probability ``min(1, p(d)/q(d))`` (p = the full model's processed
   distribution), on the first rejection draw from ``norm(max(0, p - q))``, after m accepts draw
   the bonus from p. Every emitted token is then distributed exactly as ``full`` sampling.
4. Roll back, per row: with ``n_b`` row b's accepted count and ``n = max_b n_b`` over live rows,
   ``KVCache.truncate(t + n + 1)`` drops the drafts nobody kept; row b's slots
   ``t+n_b+1 .. t+n`` become holes in its validity mask (``DecodeState.reject``), and its
   positions continue after its last kept token. Every row thus advances by its own count in the
   same batch (no row waits for the slowest), at the price of holes that attention masks out;
   when the holes would overflow the cache, ``DecodeState.compact`` repacks it.

``acceptance = accepted / proposed`` and ``mean_accepted = accepted / (rows x rounds)`` count
each live row's own accepted drafts; ``result.accepted[row]`` lists them per round.

Options. ``draft=J`` drafts with the PoE of stages 0..J-1 (``mean_{k<J} z_k``) instead of stage 0
alone, and verifies with stages J..K-1: better drafts, dearer steps. ``m="auto"`` picks each
round's draft length from the acceptance measured so far (``choose_m``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draft_cost(model, J: int) -> float:
    """FLOPs share of the drafting stages 0..J-1 (heads included), ``model.flops_per_token``."""
    f = model.flops_per_token()
    return sum(f["per_stage"][:J]) / f["total"]


def choose_m(accepted: int, rejections: int, m_max: int, cd: float) -> int:
    """The draft length in 1..m_max with the most tokens per unit of cost.

    Per-draft acceptance ``a`` is estimated as ``(accepted + 1) / (accepted + rejections + 2)``
    (a draft run ends at its first rejection, so this is the geometric maximum-likelihood estimate
    with a uniform prior). A round of m drafts then yields ``E(m) = sum_{i=0..m} a^i`` tokens
    (the accepted run plus the correction or bonus token) and costs ``(m+1) cd + (1 - cd)`` full
    forwards: m+1 positions through the drafting stages, one verify pass of the others (decode is
    memory-bound: a chunk of m+1 positions costs about one position)."""
    a = (accepted + 1) / (accepted + rejections + 2)
    best, best_m = -1.0, 1
    for m in range(1, m_max + 1):
        rate = sum(a ** i for i in range(m + 1)) / ((m + 1) * cd + (1 - cd))
        if rate > best:
            best, best_m = rate, m
    return best_m


def decode(st, rows, pending: torch.Tensor, t: int, m: int, sampler):
    """Speculative rounds until ``rows`` is done; yields ``(row, token)`` events.

    ``st``: ``engine.DecodeState`` with every stage filled to t; ``rows``: ``engine.Rows``;
    ``pending``: ``[B]`` tokens already emitted for position t; ``sampler``: ``engine.Sampler``."""
    K, J = st.K, rows.req.draft
    greedy = sampler.greedy
    keep = rows.req.return_logprobs
    stats = rows.out.stats
    cd = draft_cost(st.model, J) if rows.req.m_auto else None
    while not rows.done():
        m_round = choose_m(stats["accepted"], stats["rejections"], m, cd) if cd is not None else m
        mm = max(0, min(m_round, rows.remaining() - 1))  # never draft past max_new_tokens
        stats["m_hist"][mm] += 1
        if t + mm + 1 > st.max_len:
            t = st.compact(rows.active)  # every stage is filled to t here: repack the holes away
        ban = rows.ban(mm + 1)  # [B, mm+1] stop tokens banned by min_new_tokens, or None
        dsum, drafts, qs = [], [], []  # dsum: sum_{k<J} z_k at each drafted position
        cur = pending
        for i in range(mm):
            st.place(t + i, cur)
            st.extend(J - 1, t + i + 1)
            zs = _sum_log_probs(st, 0, J, t + i, t + i + 1)[:, 0]
            dsum.append(zs)
            z = zs / J if J > 1 else zs
            if ban is not None:
                z = rows.banned(z, ban[:, i])
            if greedy:
                cur = z.argmax(-1)
            else:
                q = sampler.probs(z)
                cur = sampler.draw(q)
                qs.append(q)
            drafts.append(cur)
        end = t + mm + 1
        st.place(t + mm, cur)
        st.extend(K - 1, end)  # d_m through the drafting stages, then stages J..K-1 over the m+1 positions
        acc = _sum_log_probs(st, 0, J, t + mm, end)
        if mm:
            acc = torch.cat([torch.stack(dsum, dim=1), acc], dim=1)
        for s in range(J, K):  # onto the running sum, stage by stage: the summation order of engine._decide
            acc = acc + st.log_probs(s, t, end)
        c = rows.banned(acc / K, ban)  # [B, mm+1, V]
        B = c.size(0)
        D = torch.stack(drafts, dim=1) if mm else torch.zeros(B, 0, dtype=torch.long, device=c.device)
        logp = F.log_softmax(c, -1) if keep or not greedy else None
        if greedy:
            full_tok = c.argmax(-1)
            ok = D == full_tok[:, :mm]
        else:
            p = sampler.probs(logp)
            if mm:
                Q = torch.stack(qs, dim=1)
                pd = p[:, :mm].gather(-1, D.unsqueeze(-1)).squeeze(-1)
                qd = Q.gather(-1, D.unsqueeze(-1)).squeeze(-1)
                ok = sampler.uniform((B, mm), c.device) * qd < pd  # u < p/q, q(d) > 0 as d ~ q
            else:
                ok = torch.zeros(B, 0, dtype=torch.bool, device=c.device)
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # leading accepts per row
        # A row proposes no more drafts than it still needs (as it would alone): a longer accepted
        # run is cut, and the token after the cut is its accepted draft.
        cap = (torch.tensor(rows.remaining_per_row(), device=c.device) - 1).clamp(0, mm)
        cut = accepted > cap
        accepted = torch.minimum(accepted, cap)
        live = rows.active
        n = int(accepted[live].max()) if bool(live.any()) else 0
        accepted = torch.where(live, accepted, torch.full_like(accepted, n))  # finished rows leave no holes
        rowi = torch.arange(B, device=c.device)
        if greedy:
            last = full_tok[rowi, accepted]
        else:
            p_n = p[rowi, accepted]
            if mm:
                resid = (p_n - Q[rowi, accepted.clamp(max=mm - 1)]).clamp_min(0)
                empty = resid.sum(-1, keepdim=True) <= 0  # p == q: the residual is undefined, p itself is right
                resid = torch.where(empty, p_n, resid)
                dist = torch.where((accepted < mm)[:, None], resid, p_n)  # bonus from p after mm accepts
            else:
                dist = p_n
            last = sampler.draw(dist)
        if mm:
            last = torch.where(cut & live, D[rowi, accepted.clamp(max=mm - 1)], last)
        acc_list = accepted.tolist()
        rows.spec_round(cap.tolist(), acc_list)
        for j in range(n + 1):
            tok = last if j == mm else torch.where(accepted == j, last, D[:, j])
            yield from rows.emit(tok, K, logp[:, j] if keep else None, [a >= j for a in acc_list])
        st.truncate(t + n + 1)
        st.reject(t, accepted, t + n + 1, live)
        pending, t = last, t + n + 1


def _sum_log_probs(st, a: int, b: int, lo: int, hi: int) -> torch.Tensor:
    """``sum_{a<=k<b} z_k`` at positions lo..hi-1, accumulated stage by stage in order (as
    ``engine._decide`` does, so greedy ties resolve alike)."""
    acc = st.log_probs(a, lo, hi)
    for s in range(a + 1, b):
        acc = acc + st.log_probs(s, lo, hi)
    return acc
