"""Generation over PoEGPT: one KV cache, one forward path, six modes.

Modes (SPEC "PoE aggregation", "WAND p99 bounds and adaptive depth", "Confidence-aware routing",
"Self-speculative decoding"):

- ``full``         PoE over all K stages, alpha=0: ``c_{K-1} = mean_k z_k``.
- ``stage=k``      stage k's own head ``z_k``; stages after k never run.
- ``prefix=K'``    PoE over stages 0..K'-1; later stages never run.
- ``wand``         adaptive depth: after stage s, exit when ``top1(c_s) - top2(c_s) >
                   sum_{i=s..K-2} bound_i`` (``poe.wand_exit``) with ``c_s = mean_{k<=s} z_k``.
- ``route``        adaptive depth with the routing rule: exit after stage 0 when its max
                   probability ``>= tau``, otherwise run all K stages.
- ``speculative``  stage 0 drafts m tokens, stages 1..K-1 verify them in one pass that reuses the
                   draft's stage-0 states (``speculative.py``).

The single forward path is ``DecodeState.extend(s, end)``: run stage s until its KV cache (and the
stage's output hidden states) cover positions ``[0, end)``. It first extends stage s-1 to ``end``
(recursively), then runs stage s over every position it has not seen yet in ONE chunk. Decoding a
token at position t is ``extend(s, t+1)`` for the stages the mode needs; when adaptive depth has
skipped stage s at earlier positions, the same call runs those positions together with t (the
batched catch-up), so a deeper position only ever attends to states computed exactly as a full
forward would compute them (up to float summation order); nothing is copied or approximated.
``KVCache.write`` refuses gaps, which guards this invariant.

Design choices where SPEC is silent (documented here, tested in tests/infer/test_infer.py):

- Batches: the model has no padding mask, so prompts are grouped by length and each group decodes
  in lockstep (same positions in every row, one cache). Rows of different lengths never mix.
- Adaptive depth in a batch: each row exits by its own rule and its token comes from its own
  exit stage; the batch runs a deeper stage while any live row still needs it. ``mean_depth`` is
  the mean over emitted tokens of the number of stages whose heads decided the token (``K`` for
  ``full`` and ``speculative``, ``k+1`` for ``stage=k``, ``K'`` for ``prefix=K'``);
  ``stage_positions`` counts the positions every stage actually processed (catch-up included).
- Sampling (temperature > 0): temperature, then top-k, then top-p (nucleus) are applied to the
  mode's distribution (the renormalised PoE at the exit stage for wand/route) and one token is
  drawn with a ``torch.Generator`` seeded by ``seed``. Temperature 0 is greedy (argmax, first
  index on ties; top-k / top-p are then irrelevant). For wand/route, sampling from the exit
  stage's distribution is an approximation of ``full``: the bounds only certify the argmax.
- Stop tokens are emitted (as Hugging Face ``generate`` keeps its EOS) and end that row.
- ``on_token(row, token)`` is called as each token is produced; ``Engine.stream`` yields the same
  ``(row, token)`` pairs.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

if __package__ == "poelm.infer":  # inside poelm: the core room's modules
    poe = importlib.import_module("poelm.core.poe")
    PoelmError = importlib.import_module("poelm.core.errors").PoelmError
    KVCache = importlib.import_module("poelm.core.model").KVCache
else:  # an exported folder: core's files are flat siblings of this one. These ``from .x import``
    # lines are what transformers' remote-code loader scans for (it copies the files they name);
    # a ``from ..core`` line would name a file it cannot find, hence importlib above.
    from . import poe
    from .errors import PoelmError
    from .model import KVCache

MODES = ("full", "stage", "prefix", "wand", "route", "speculative")
BOUNDS_KEY = "poe_wand_p99_bounds_per_stage_head"


# ----------------------------------------------------------------------------- sampling
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


# ----------------------------------------------------------------------------- the forward path
class DecodeState:
    """A batch's KV cache plus what catch-up needs: token ids, ``x0`` and every stage's output
    hidden states by position. Stage s's filled length is read from the cache itself."""

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        w = model.wte.weight
        self.model, self.cfg, self.K = model, cfg, cfg.n_stages
        self.cache = KVCache(cfg, batch, max_len, device=w.device, dtype=w.dtype)
        self.tok = torch.zeros(batch, max_len, dtype=torch.long, device=w.device)
        self.x0 = torch.zeros(batch, max_len, cfg.n_embd, dtype=w.dtype, device=w.device)
        self.h = [torch.zeros_like(self.x0) for _ in range(self.K)]
        self.positions_run = [0] * self.K

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
            x0 = self.model.embed(idx)
            self.x0[:, start:end] = x0
            x = x0
        else:
            self.extend(s - 1, end)
            x, x0 = self.h[s - 1][:, start:end], self.x0[:, start:end]
        self.h[s][:, start:end] = self.model.run_stage(s, x, x0, idx, self.cache, start)
        self.positions_run[s] += end - start

    def log_probs(self, s: int, a: int, b: int) -> torch.Tensor:
        """``z_s`` at positions ``a..b-1``: ``[B, b-a, V]`` fp32."""
        return F.log_softmax(self.model.stage_logits(s, self.h[s][:, a:b]), dim=-1)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)


# ----------------------------------------------------------------------------- requests
@dataclass
class Request:
    mode: str
    max_new: int
    stage: int | None = None
    prefix: int | None = None
    remaining_bounds: list | None = None  # wand: sum_{i=s..K-2} bound_i for s = 0..K-2
    tau: float | None = None
    m: int = 4
    stop: frozenset = frozenset()
    return_logprobs: bool = False


def parse_mode(text: str) -> dict:
    """``"full" | "stage=K" | "prefix=K" | "wand" | "route" | "speculative"`` -> keyword arguments
    of ``Engine.generate`` (``mode``, and ``stage`` or ``prefix``)."""
    name, _, value = str(text).partition("=")
    name = name.strip()
    if name not in MODES:
        raise PoelmError(f"unknown mode {text!r}: use full, stage=K, prefix=K, wand, route or speculative")
    if not value:
        return {"mode": name}
    if name not in ("stage", "prefix"):
        raise PoelmError(f"mode {name!r} takes no value (got {text!r})")
    try:
        return {"mode": name, name: int(value)}
    except ValueError:
        raise PoelmError(f"mode {text!r}: {name} must be an integer, e.g. {name}=1") from None


def wand_bounds_from(meta: dict | None):
    """The checkpoint's ``poe_wand_p99_bounds_per_stage_head`` (top level of ``meta`` or of a
    nested dict such as ``meta["config"]``), or None."""
    if not meta:
        return None
    if meta.get(BOUNDS_KEY) is not None:
        return list(meta[BOUNDS_KEY])
    for v in meta.values():
        if isinstance(v, dict) and v.get(BOUNDS_KEY) is not None:
            return list(v[BOUNDS_KEY])
    return None


def _prompts(prompt_ids, V: int) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if prompt_ids is None or len(prompt_ids) == 0:
        raise PoelmError("empty prompt: give at least one token (e.g. BOS)")
    rows = [list(prompt_ids)] if not isinstance(prompt_ids[0], (list, tuple)) else [list(r) for r in prompt_ids]
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise PoelmError(f"empty prompt in batch row {i}: give at least one token (e.g. BOS)")
        bad = [t for t in r if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise PoelmError(f"prompt row {i} holds token id {bad[0]!r} outside the vocabulary [0, {V})")
    return rows


def build_request(model, prompts, max_new_tokens, mode, stage, prefix, bounds, tau, m, temperature, top_k, top_p, stop_tokens, return_logprobs) -> Request:
    """Validate one call; every problem is one ``PoelmError`` line."""
    cfg = model.config
    K = cfg.n_stages
    parsed = parse_mode(mode)
    mode = parsed["mode"]
    for key, given in (("stage", stage), ("prefix", prefix)):
        if key in parsed and given is not None and given != parsed[key]:
            raise PoelmError(f"mode {key}={parsed[key]} contradicts {key}={given}")
    stage = parsed.get("stage", stage)
    prefix = parsed.get("prefix", prefix)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PoelmError(f"max_new_tokens must be an integer >= 0 (got {max_new_tokens!r})")
    longest = max(len(r) for r in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise PoelmError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len {cfg.max_seq_len}: shorten one of them"
        )
    req = Request(mode=mode, max_new=max_new_tokens, stop=frozenset(int(t) for t in stop_tokens), return_logprobs=return_logprobs)
    if mode == "stage":
        if not isinstance(stage, int) or not 0 <= stage < K:
            raise PoelmError(f"stage {stage!r} out of range: this model has stages 0..{K - 1}")
        req.stage = stage
    elif mode == "prefix":
        if not isinstance(prefix, int) or not 1 <= prefix <= K:
            raise PoelmError(f"prefix {prefix!r} out of range: use prefix=1..{K}")
        req.prefix = prefix
    elif mode == "wand":
        if bounds is None:
            raise PoelmError(f"wand needs bounds: pass {K - 1} floats ({BOUNDS_KEY} of a calibrated checkpoint; run `poelm measure`)")
        b = [float(x) for x in bounds]
        if len(b) != K - 1:
            raise PoelmError(f"wand needs {K - 1} bounds (one per stage transition), got {len(b)}")
        if any(math.isnan(x) or x < 0 for x in b):
            raise PoelmError(f"wand bounds must be >= 0 (inf allowed), got {b}")
        req.remaining_bounds = [sum(b[s:]) for s in range(K - 1)]
    elif mode == "route":
        if tau is None:
            raise PoelmError("route needs tau (the calibrated stage-0 max-probability threshold, from `poelm measure`)")
        if not 0.0 <= float(tau) <= 1.0:
            raise PoelmError(f"tau must be a probability in [0, 1], got {tau!r}")
        req.tau = float(tau)
    elif mode == "speculative":
        if not isinstance(m, int) or m < 1:
            raise PoelmError(f"m (draft length) must be an integer >= 1, got {m!r}")
        req.m = m
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise PoelmError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise PoelmError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise PoelmError(f"top_p must be in (0, 1], got {top_p!r}")
    return req


# ----------------------------------------------------------------------------- bookkeeping
class Rows:
    """One lockstep group's outputs: per-row tokens, stop state, depth and speculation counts."""

    def __init__(self, rows: list[int], req: Request, out: "GenerationResult", device):
        self.rows, self.req, self.out = rows, req, out
        self.active = torch.ones(len(rows), dtype=torch.bool, device=device)
        self._live = [True] * len(rows)
        self.count = 0

    def remaining(self) -> int:
        return self.req.max_new - self.count

    def done(self) -> bool:
        return self.count >= self.req.max_new or not any(self._live)

    def emit(self, tokens: torch.Tensor, depth, logp: torch.Tensor | None = None):
        """Append one token to every live row; yields ``(row, token)`` events."""
        if self.done():
            return
        toks = tokens.tolist()
        depths = depth.tolist() if isinstance(depth, torch.Tensor) else [depth] * len(toks)
        st = self.out.stats
        for i, row in enumerate(self.rows):
            if not self._live[i]:
                continue
            self.out.tokens[row].append(toks[i])
            st["depth_sum"] += depths[i]
            st["depth_hist"][depths[i] - 1] += 1
            if logp is not None and self.req.return_logprobs:
                self.out.logprobs[row].append(logp[i].detach().float().cpu())
            if toks[i] in self.req.stop:
                self._live[i] = False
                self.active[i] = False
                self.out.stopped[row] = True
            yield row, toks[i]
        self.count += 1

    def spec_round(self, proposed_per_row: int, accepted_per_row: int):
        n = int(self.active.sum())
        st = self.out.stats
        st["rounds"] += 1
        st["row_rounds"] += n
        st["proposed"] += proposed_per_row * n
        st["accepted"] += accepted_per_row * n
        st["accept_hist"][accepted_per_row] += n


@dataclass
class GenerationResult:
    """``tokens[row]``: new tokens (a stop token included when it ended the row); ``stats``: see
    ``Engine.generate``; ``logprobs[row]``: with ``return_logprobs``, the normalised log-probs
    (before temperature) each token was chosen from, one ``[V]`` tensor per token."""

    tokens: list
    stats: dict
    stopped: list
    logprobs: list | None = None


# ----------------------------------------------------------------------------- the engine
class Engine:
    """``Engine(model).generate(prompt_ids, max_new_tokens, mode=...)``; see the module docstring."""

    def __init__(self, model):
        self.model = model
        self.last_result: GenerationResult | None = None
        self.last_states: list = []  # (rows, DecodeState) per group of the last call, for inspection

    def generate(self, prompt_ids, max_new_tokens: int, mode: str = "full", stage=None, prefix=None, bounds=None, tau=None, m: int = 4,
                 temperature: float = 0.0, top_k=None, top_p=None, seed=None, stop_tokens=(), on_token=None,
                 return_logprobs: bool = False) -> GenerationResult:
        """Generate ``max_new_tokens`` per row (fewer when a stop token ends it).

        ``stats``: ``tokens_per_s`` (new tokens of all rows / wall time incl. prefill),
        ``mean_depth`` (stages whose heads decided a token, mean over tokens), ``acceptance``
        (accepted draft tokens / proposed; None unless speculative), ``mean_accepted`` (accepted
        per row per round), ``rounds``, ``proposed``, ``accepted``, ``accept_hist`` (rows-rounds
        by accepted count 0..m), ``depth_hist`` (tokens by depth 1..K), ``elapsed_s``, ``new_tokens``,
        ``stage_positions`` (positions each stage processed, catch-up and rejected drafts included)."""
        for row, tok in self.stream(prompt_ids, max_new_tokens, mode=mode, stage=stage, prefix=prefix, bounds=bounds, tau=tau, m=m,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                                    return_logprobs=return_logprobs):
            if on_token is not None:
                on_token(row, tok)
        return self.last_result

    def stream(self, prompt_ids, max_new_tokens: int, mode: str = "full", stage=None, prefix=None, bounds=None, tau=None, m: int = 4,
               temperature: float = 0.0, top_k=None, top_p=None, seed=None, stop_tokens=(), return_logprobs: bool = False):
        """Validate now, then return an iterator of ``(row, token)`` in production order;
        ``self.last_result`` holds the ``GenerationResult`` once it is exhausted."""
        model = self.model
        prompts = _prompts(prompt_ids, model.config.vocab_size)
        req = build_request(model, prompts, max_new_tokens, mode, stage, prefix, bounds, tau, m, temperature, top_k, top_p, stop_tokens, return_logprobs)
        device = model.wte.weight.device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        sampler = Sampler(temperature, top_k, top_p, gen)
        return self._events(prompts, req, sampler)

    def _events(self, prompts, req: Request, sampler: Sampler):
        model = self.model
        B = len(prompts)
        stats = {"rounds": 0, "row_rounds": 0, "proposed": 0, "accepted": 0, "accept_hist": [0] * (req.m + 1), "depth_sum": 0,
                 "depth_hist": [0] * model.config.n_stages}
        out = GenerationResult([[] for _ in range(B)], stats, [False] * B, [[] for _ in range(B)] if req.return_logprobs else None)
        self.last_states = []
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for L, rows in groups.items():
                    yield from self._group(rows, [prompts[i] for i in rows], req, sampler, out)
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - t0
        self._finish(out, req, elapsed)
        self.last_result = out

    def _group(self, rows, prompts, req: Request, sampler: Sampler, out: GenerationResult):
        L = len(prompts[0])
        st = DecodeState(self.model, len(rows), L + max(req.max_new, 1))
        self.last_states.append((rows, st))
        st.tok[:, :L] = torch.tensor(prompts, dtype=torch.long, device=st.tok.device)
        tr = Rows(rows, req, out, st.tok.device)
        if req.max_new == 0:
            return
        t = L - 1
        first = replace(req, mode="full") if req.mode == "speculative" else req
        while True:
            tok, depth, logp = self._decide(st, t, first, sampler, tr.active)
            yield from tr.emit(tok, depth, logp)
            if tr.done():
                return
            t += 1
            if req.mode == "speculative":
                yield from _speculative()(st, tr, tok, t, req.m, sampler)
                return
            st.tok[:, t] = tok

    def _decide(self, st: DecodeState, t: int, req: Request, sampler: Sampler, active: torch.Tensor):
        """The token at position t+1 for every row: (tokens [B], depth per row, log-probs or None).

        ``c_s`` is accumulated the same way in every mode (``z_0 + z_1 + ... `` then ``/ (s+1)``),
        so ``wand`` with infinite bounds and ``full`` are bit-identical."""
        keep = req.return_logprobs
        if req.mode == "stage":
            st.extend(req.stage, t + 1)
            z = st.log_probs(req.stage, t, t + 1)[:, 0]
            return sampler.choose(z), req.stage + 1, z if keep else None
        last = req.prefix - 1 if req.mode == "prefix" else st.K - 1
        B = active.size(0)
        tok = torch.zeros(B, dtype=torch.long, device=active.device)
        depth = torch.full((B,), last + 1, dtype=torch.long)
        lp = torch.zeros(B, self.model.config.vocab_size, device=active.device) if keep else None
        done = ~active
        acc = None
        for s in range(last + 1):
            st.extend(s, t + 1)
            z = st.log_probs(s, t, t + 1)[:, 0]
            acc = z if acc is None else acc + z
            c = acc / (s + 1)
            if s == last:
                ex = ~done
            elif req.mode == "wand":
                ex = poe.wand_exit(c, req.remaining_bounds[s]) & ~done
            elif req.mode == "route" and s == 0:
                ex = (z.amax(-1).exp() >= req.tau) & ~done
            else:
                continue
            if bool(ex.any()):
                tok[ex] = sampler.choose(c[ex])
                depth[ex.cpu()] = s + 1
                if keep:
                    lp[ex] = F.log_softmax(c[ex], -1)
                done = done | ex
            if bool(done.all()):
                break
        return tok, depth, lp

    def _finish(self, out: GenerationResult, req: Request, elapsed: float):
        st = out.stats
        n = sum(len(r) for r in out.tokens)
        spec = req.mode == "speculative"
        st.update(
            elapsed_s=elapsed,
            new_tokens=n,
            tokens_per_s=n / elapsed if elapsed > 0 else float("nan"),
            mean_depth=st.pop("depth_sum") / n if n else float("nan"),
            acceptance=(st["accepted"] / st["proposed"] if st["proposed"] else float("nan")) if spec else None,
            mean_accepted=(st["accepted"] / st["row_rounds"] if st["row_rounds"] else float("nan")) if spec else None,
            stage_positions=[sum(s.positions_run[k] for _, s in self.last_states) for k in range(self.model.config.n_stages)],
        )
        if not spec:
            st["accept_hist"] = []


def _speculative():
    """``speculative.py`` builds on this module, so it is imported when first needed. The
    ``from .speculative import`` form is what transformers' remote-code loader scans for, so the
    export ships the file."""
    from .speculative import decode

    return decode


# ----------------------------------------------------------------------------- entry points for the HF class
def generate_wand(model, prompt_ids, max_new_tokens: int, bounds, **kw) -> GenerationResult:
    """WAND adaptive depth over a PoEGPT with the checkpoint's p99 bounds (K-1 floats)."""
    return Engine(model).generate(prompt_ids, max_new_tokens, mode="wand", bounds=bounds, **kw)


def generate_speculative(model, prompt_ids, max_new_tokens: int, m: int = 4, **kw) -> GenerationResult:
    """Self-speculative decoding over a PoEGPT: stage-0 m-token draft, full-K verify."""
    return Engine(model).generate(prompt_ids, max_new_tokens, mode="speculative", m=m, **kw)
