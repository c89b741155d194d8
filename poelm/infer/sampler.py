"""Token choice for the engine: greedy, or temperature -> top-k -> top-p sampling (HF's order).

Imports torch only; shipped verbatim with the rest of ``infer/`` in every export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Sampler:
    """Token choice from normalised log-probs ``[..., V]``: greedy when temperature is 0, else
    ``softmax(top_p(top_k(logp / T)))`` drawn with one seeded generator (HF's processing order)."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator):
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = top_p
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logp: torch.Tensor) -> torch.Tensor:
        """The sampling distribution after temperature, top-k and top-p (rows sum to 1)."""
        x = logp.float() / self.temperature
        V = x.size(-1)
        if self.top_k is not None and self.top_k < V:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1.0:
            sx, order = x.sort(dim=-1, descending=True)
            p = sx.softmax(-1)
            # drop a token when the mass strictly before it already reaches top_p (keeps top-1)
            drop = (p.cumsum(-1) - p) >= self.top_p
            x = torch.full_like(x, -math.inf).scatter(-1, order, sx.masked_fill(drop, -math.inf))
        return x.softmax(-1)

    def draw(self, weights: torch.Tensor) -> torch.Tensor:
        """One index per row of non-negative ``weights [..., V]`` (need not be normalised)."""
        flat = weights.reshape(-1, weights.size(-1))
        out = torch.multinomial(flat, 1, generator=self.generator)
        return out.view(weights.shape[:-1])

    def uniform(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)

    def choose(self, c: torch.Tensor) -> torch.Tensor:
        """Token from unnormalised PoE scores ``c`` (argmax is shift-invariant; sampling renormalises)."""
        if self.greedy:
            return c.argmax(-1)
        return self.draw(self.probs(F.log_softmax(c.float(), -1)))
