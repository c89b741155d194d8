"""Self-speculative decoding: stage 0 drafts, the full PoE verifies (SPEC "Self-speculative decoding").

One round, with the pending token x_t (emitted, not yet fed) at position t and every stage's cache
filled up to t:

1. Draft: feed x_t, d_1, ..., d_m to stage 0 one position at a time (``DecodeState.extend(0, .)``,
   the very path ``full`` decoding uses), drafting ``d_{i+1}`` from ``z_0`` at position t+i.
   Stage 0 runs m+1 positions: its states and ``z_0`` at the last one (d_m) are needed for the
   bonus token.
2. Verify: ``extend(K-1, t+m+1)`` runs stages 1..K-1 over the m+1 positions in one chunk each,
   starting from the draft's stage-0 hidden states (reused, never recomputed). The full PoE at
   position t+i is ``c = (z_0 + z_1 + ... + z_{K-1}) / K``, accumulated as in ``infer._decide``.
3. Accept: greedy keeps the longest prefix with ``d_{i+1} == argmax c_{t+i}`` and emits
   ``argmax c`` at the first mismatch (or the bonus token after m accepts), so the output is
   ``full``'s greedy output. Sampling (temperature > 0) uses the rule of Leviathan et al. 2023
   (arXiv:2211.17192) and Chen et al. 2023 (arXiv:2302.01318): draft ``d ~ q`` (stage 0's processed
   distribution), accept with probability ``min(1, p(d)/q(d))`` (p = the full model's processed
   distribution), on the first rejection draw from ``norm(max(0, p - q))``, after m accepts draw
   the bonus from p. Every emitted token is then distributed exactly as ``full`` sampling.
4. Roll back: ``KVCache.truncate(t + n + 1)`` drops the rejected drafts' states in every layer.

Batches decode in lockstep (one cache), so a round keeps ``n = min`` accepted count over live rows:
every row emits ``d_1..d_n`` then one more token. For a row whose own count exceeds n, that token
is its accepted draft ``d_{n+1}``: under greedy it equals ``argmax c`` anyway; under sampling a
prefix of an accepted run is still exact, because where a row's output stops depends only on
earlier positions and on other rows' independent draws. Statistics count the n tokens actually
used: ``acceptance = accepted / proposed``, ``mean_accepted = accepted / (rows x rounds)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode(st, rows, pending: torch.Tensor, t: int, m: int, sampler):
    """Speculative rounds until ``rows`` is done; yields ``(row, token)`` events.

    ``st``: ``infer.DecodeState`` with every stage filled to t; ``rows``: ``infer.Rows``;
    ``pending``: ``[B]`` tokens already emitted for position t; ``sampler``: ``infer.Sampler``."""
    K = st.K
    greedy = sampler.greedy
    while not rows.done():
        mm = min(m, rows.remaining() - 1)  # never draft past max_new_tokens (nor the cache)
        z0, drafts, qs = [], [], []
        cur = pending
        for i in range(mm + 1):
            st.tok[:, t + i] = cur
            st.extend(0, t + i + 1)
            z = st.log_probs(0, t + i, t + i + 1)[:, 0]
            z0.append(z)
            if i < mm:
                if greedy:
                    cur = z.argmax(-1)
                else:
                    q = sampler.probs(z)
                    cur = sampler.draw(q)
                    qs.append(q)
                drafts.append(cur)
        end = t + mm + 1
        st.extend(K - 1, end)  # stages 1..K-1 over the m+1 positions, from the draft's stage-0 states
        acc = torch.stack(z0, dim=1)
        for s in range(1, K):
            acc = acc + st.log_probs(s, t, end)
        c = acc / K  # [B, mm+1, V]
        B = c.size(0)
        D = torch.stack(drafts, dim=1) if mm else torch.zeros(B, 0, dtype=torch.long, device=c.device)
        keep = rows.req.return_logprobs
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
        live = rows.active
        n = int(accepted[live].min()) if bool(live.any()) else 0
        if greedy:
            last = full_tok[:, n]
        elif n < mm:
            resid = (p[:, n] - Q[:, n]).clamp_min(0)
            empty = resid.sum(-1, keepdim=True) <= 0  # p == q: the residual is undefined, p itself is right
            resid = torch.where(empty, p[:, n], resid)
            ahead = (accepted > n).unsqueeze(-1)  # rows that accepted d_{n+1} too keep it
            dist = torch.where(ahead, F.one_hot(D[:, n], p.size(-1)).to(p.dtype), resid)
            last = sampler.draw(dist)
        else:
            last = sampler.draw(p[:, mm])  # bonus token after mm accepts
        rows.spec_round(mm, n)
        for j in range(n):
            yield from rows.emit(D[:, j], K, logp[:, j] if keep else None)
        yield from rows.emit(last, K, logp[:, n] if keep else None)
        st.truncate(t + n + 1)
        pending, t = last, t + n + 1
