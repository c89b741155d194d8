"""``DecodeState``: one batch's KV cache and per-slot buffers, and the engine's single forward path.

Rows of one batch share slot indices; each row has its own validity mask over the slots and its
own RoPE positions (``core/inputs.py``), so left padding and the holes of per-row speculative
acceptance are both just invalid slots. ``extend`` is the one way any stage runs (see
``engine.py``); ``place`` / ``reject`` / ``compact`` keep the per-row bookkeeping.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

if __package__ == "poelm.infer":  # inside poelm: the core room's modules
    KVCache = importlib.import_module("poelm.core.model").KVCache
    positions_from_mask = importlib.import_module("poelm.core.inputs").positions_from_mask
else:  # an exported folder: core's files are flat siblings (the ``from .x import`` form the loader scans)
    from .inputs import positions_from_mask
    from .model import KVCache


class DecodeState:
    """A batch's KV cache plus what catch-up needs: token ids, ``x0`` and every stage's output
    hidden states by position. Stage s's filled length is read from the cache itself."""

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        w = model.wte.weight
        self.model, self.cfg, self.K, self.max_len = model, cfg, cfg.n_stages, max_len
        self.cache = KVCache(cfg, batch, max_len, device=w.device, dtype=w.dtype)
        self.tok = torch.zeros(batch, max_len, dtype=torch.long, device=w.device)
        self.x0 = torch.zeros(batch, max_len, cfg.n_embd, dtype=w.dtype, device=w.device)
        self.h = [torch.zeros_like(self.x0) for _ in range(self.K)]
        self.positions_run = [0] * self.K
        # Per row: which slots hold real tokens, the RoPE position of each slot, the next position.
        # ``ragged`` is False while every slot is valid (then slot == position and the model takes
        # its unmasked path).
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=w.device)
        self.posid = torch.arange(max_len, device=w.device).repeat(batch, 1)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.ragged = False
        self.compactions = 0

    def load(self, prompts: list[list[int]]) -> int:
        """Left-pad the prompts into slots ``[0, L)`` (L = the longest); returns L."""
        L = max(len(p) for p in prompts)
        tok = torch.zeros(len(prompts), L, dtype=torch.long)
        valid = torch.zeros(len(prompts), L, dtype=torch.bool)
        for b, p in enumerate(prompts):
            tok[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[b, L - len(p) :] = True
        dev = self.tok.device
        self.tok[:, :L] = tok.to(dev)
        self.valid[:, :L] = valid.to(dev)
        self.posid[:, :L] = positions_from_mask(valid).to(dev)
        self.next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        self.ragged = any(len(p) < L for p in prompts)
        return L

    def place(self, slot: int, tokens: torch.Tensor) -> None:
        """Put one token per row into ``slot`` at each row's next position."""
        self.tok[:, slot] = tokens
        self.posid[:, slot] = self.next_pos
        self.valid[:, slot] = True
        self.next_pos = self.next_pos + 1

    def reject(self, t: int, kept: torch.Tensor, upto: int, live: torch.Tensor) -> None:
        """After a speculative round whose pending token sat in slot t: row b keeps slots
        ``t..t+kept[b]``; its slots ``t+kept[b]+1 .. upto-1`` become holes; positions continue
        from the kept ones. A finished row (``live`` False) is still computed with the batch, its
        output unused: its position stops advancing so it never runs past ``max_seq_len``."""
        if upto > t + 1:
            keep = torch.arange(1, upto - t, device=kept.device)[None, :] <= kept[:, None]
            self.valid[:, t + 1 : upto] &= keep
            if not bool(keep.all()):
                self.ragged = True
        self.next_pos = torch.where(live, self.posid[:, t] + kept + 1, self.posid[:, t])

    def compact(self, live: torch.Tensor) -> int:
        """Repack every live row's valid slots to the right of ``[0, n)`` (n = the most valid
        slots of a live row; shorter rows are left-padded again) in the cache and every per-slot
        buffer; a finished row keeps no valid slot (each query still sees itself, so its unused
        output stays finite). Needs every layer filled to the same length; returns n."""
        F_ = self.cache.lengths[0]
        if any(n != F_ for n in self.cache.lengths):
            raise RuntimeError("compact needs every layer filled to the same length")
        self.valid[:, :F_] &= live[:, None]
        valid = self.valid[:, :F_]
        n = int(valid.sum(1).max())
        src = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, F_ - n :]  # holes first, then valid slots in order
        self.cache.gather_slots(src)
        self.tok[:, :n] = self.tok.gather(1, src)
        self.posid[:, :n] = self.posid.gather(1, src)
        self.valid[:, :n] = self.valid.gather(1, src)
        src3 = src[:, :, None].expand(-1, -1, self.x0.size(-1))
        for buf in [self.x0] + self.h:
            buf[:, :n] = buf.gather(1, src3)
        self.ragged = not bool(self.valid[:, :n].all())
        self.compactions += 1
        return n

    def filled(self, s: int) -> int:
        return self.cache.stage_length(self.cfg, s)

    def extend(self, s: int, end: int) -> None:
        """Run stage s (and, first, any earlier stage that is behind) over positions
        ``[filled(s), end)`` in one chunk."""
        start = self.filled(s)
        if start >= end:
            return
        idx = self.tok[:, start:end]
        if s == 0:
            # The smear reads the previous real token's pre-smear embedding from the cache (exact
            # across holes, rollback and repacking: ``KVCache.smear_previous``).
            x0 = self.model.embed(idx, self.cache, start, self.valid[:, :end] if self.ragged else None)
            self.x0[:, start:end] = x0
            x = x0
        else:
            self.extend(s - 1, end)
            x, x0 = self.h[s - 1][:, start:end], self.x0[:, start:end]
        if self.ragged:
            out = self.model.run_stage(s, x, x0, idx, self.cache, start, positions=self.posid[:, start:end], valid=self.valid[:, :end])
        else:
            out = self.model.run_stage(s, x, x0, idx, self.cache, start)
        self.h[s][:, start:end] = out
        self.positions_run[s] += end - start

    def log_probs(self, s: int, a: int, b: int) -> torch.Tensor:
        """``z_s`` at positions ``a..b-1``: ``[B, b-a, V]`` fp32."""
        return F.log_softmax(self.model.stage_logits(s, self.h[s][:, a:b]), dim=-1)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)
