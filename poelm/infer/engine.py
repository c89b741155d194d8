"""Generation over PoEGPT: one KV cache, one forward path, six modes.

Modes (SPEC "PoE aggregation", "WAND p99 bounds and adaptive depth", "Confidence-aware routing",
"Self-speculative decoding"):

- ``full``         PoE over all K stages, alpha=0: ``c_{K-1} = mean_k z_k``.
- ``stage=k``      stage k's own head ``z_k``; stages after k never run.
- ``prefix=K'``    PoE over stages 0..K'-1; later stages never run.
- ``wand``         adaptive depth: after stage s, exit when ``top1(c_s) - top2(c_s) >
                   sum_{i=s..K-2} bound_i`` (``poe.wand_exit``) with ``c_s = mean_{k<=s} z_k``.
- ``route``        adaptive depth with the routing rule: exit after stage 0 when its confidence
                   ``>= tau`` (max probability, or top-1 minus top-2 probability with
                   ``confidence="margin"``: the kind `poelm measure` calibrated), otherwise run all K stages.
- ``speculative``  stage 0 drafts m tokens, stages 1..K-1 verify them in one pass that reuses the
                   draft's stage-0 states (``speculative.py``; options: ``draft=J`` drafts with the
                   PoE of stages 0..J-1, ``m="auto"`` picks m from the measured acceptance).

The single forward path is ``DecodeState.extend(s, end)``: run stage s until its KV cache (and the
stage's output hidden states) cover positions ``[0, end)``. It first extends stage s-1 to ``end``
(recursively), then runs stage s over every position it has not seen yet in ONE chunk. Decoding a
token at position t is ``extend(s, t+1)`` for the stages the mode needs; when adaptive depth has
skipped stage s at earlier positions, the same call runs those positions together with t (the
batched catch-up), so a deeper position only ever attends to states computed exactly as a full
forward would compute them (up to float summation order); nothing is copied or approximated.
``KVCache.write`` refuses gaps, which guards this invariant.

Design choices where SPEC is silent (documented here, tested in tests/infer/test_infer.py):

- Batches: prompts of any lengths decode together in one cache, left-padded to the longest. Every
  row has its own RoPE positions and a validity mask over the cache slots (``model.py``
  "padding"), so each row's tokens are those it would get alone; all rows share slot indices
  and move in lockstep (one new slot per step), except in speculative rounds, where each row
  keeps its own accepted count: the slots of a row's rejected drafts become holes in its mask
  (``DecodeState.reject``), and the cache is repacked (``compact``) when holes would overflow
  it. With equal lengths and no holes, no mask is built (the unpadded fast path).
- ``min_new_tokens``: stop tokens are banned (their log-prob set to -inf) until a row has that
  many new tokens, as transformers' ``MinNewTokensLengthLogitsProcessor`` does; WAND's margin and
  the speculative draft and verify see the same banned distribution.
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
else:  # an exported folder: core's files are flat siblings of this one. These ``from .x import``
    # lines are what transformers' remote-code loader scans for (it copies the files they name);
    # a ``from ..core`` line would name a file it cannot find, hence importlib above.
    from . import poe
    from .errors import PoelmError

# Sibling modules of this room: the same relative form works inside poelm and in an export.
from .options import DecodeOptions, parse_mode, stage_selection, wand_bounds_from  # noqa: E402,F401  (the HF face reaches them here)
from .sampler import Sampler  # noqa: E402
from .state import DecodeState  # noqa: E402

# Speculative batches reserve this many rounds of draft slots for the holes that rows with fewer
# accepted drafts leave; a repack (``DecodeState.compact``, one copy of the cache) runs when they
# are used up, so a larger value trades memory for fewer repacks.
SPEC_SLACK_ROUNDS = 8


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


# ----------------------------------------------------------------------------- bookkeeping
class Rows:
    """Per-row outputs of one batch: tokens, stop state, counts, depths and speculation counts."""

    def __init__(self, B: int, req: DecodeOptions, out: "GenerationResult", device, vocab: int):
        self.req, self.out, self.B = req, out, B
        self._live = [req.max_new_tokens > 0] * B
        self.active = torch.tensor(self._live, dtype=torch.bool, device=device)
        self.counts = [0] * B
        self._stop_mask = None
        if req.min_new_tokens > 0 and req.stop_tokens:
            self._stop_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._stop_mask[[t for t in req.stop_tokens if 0 <= t < vocab]] = True

    def remaining(self) -> int:
        """The most new tokens any live row may still emit."""
        return max((self.req.max_new_tokens - c for c, live in zip(self.counts, self._live) if live), default=0)

    def remaining_per_row(self) -> list[int]:
        """New tokens each row may still emit (0 for a finished row)."""
        return [self.req.max_new_tokens - c if live else 0 for c, live in zip(self.counts, self._live)]

    def done(self) -> bool:
        return not any(self._live)

    def ban(self, width: int | None = None) -> torch.Tensor | None:
        """Where stop tokens are still banned by ``min_new_tokens``: ``[B]`` (the next token) or
        ``[B, width]`` (the next ``width`` tokens of each row), or None when nothing is."""
        if self._stop_mask is None or min(self.counts) >= self.req.min_new_tokens:
            return None
        c = torch.tensor(self.counts, device=self.active.device)
        if width is None:
            return c < self.req.min_new_tokens
        return (c[:, None] + torch.arange(width, device=c.device)[None, :]) < self.req.min_new_tokens

    def banned(self, scores: torch.Tensor, ban: torch.Tensor | None) -> torch.Tensor:
        """``scores [B, (W,) V]`` with the stop tokens at -inf where ``ban`` says so."""
        if ban is None:
            return scores
        return scores.masked_fill(ban[..., None] & self._stop_mask, -math.inf)

    def emit(self, tokens: torch.Tensor, depth, logp: torch.Tensor | None = None, which=None):
        """Append one token to every live row (or to the rows ``which`` names); yields
        ``(row, token)`` events. A row ends at a stop token or at ``max_new_tokens`` tokens."""
        toks = tokens.tolist()
        depths = depth.tolist() if isinstance(depth, torch.Tensor) else [depth] * len(toks)
        st = self.out.stats
        for i in range(self.B):
            if not self._live[i] or (which is not None and not which[i]):
                continue
            self.out.tokens[i].append(toks[i])
            self.out.depths[i].append(depths[i])
            st["depth_sum"] += depths[i]
            st["depth_hist"][depths[i] - 1] += 1
            if logp is not None and self.req.return_logprobs:
                self.out.logprobs[i].append(logp[i].detach().float().cpu())
            self.counts[i] += 1
            if toks[i] in self.req.stop_tokens:
                self.out.stopped[i] = True
            if toks[i] in self.req.stop_tokens or self.counts[i] >= self.req.max_new_tokens:
                self._live[i] = False
                self.active[i] = False
            yield i, toks[i]

    def spec_round(self, proposed: list[int], accepted: list[int]):
        """Count one round: each live row proposed its ``proposed[row]`` drafts and accepted its
        own ``accepted[row]``."""
        st = self.out.stats
        st["rounds"] += 1
        for i in range(self.B):
            if self._live[i]:
                st["row_rounds"] += 1
                st["proposed"] += proposed[i]
                st["accepted"] += accepted[i]
                st["accept_hist"][accepted[i]] += 1
                st["rejections"] += accepted[i] < proposed[i]
                self.out.accepted[i].append(accepted[i])


@dataclass
class GenerationResult:
    """``tokens[row]``: new tokens (a stop token included when it ended the row); ``stats``: see
    ``Engine.generate``; ``logprobs[row]``: with ``return_logprobs``, the normalised log-probs
    (before temperature) each token was chosen from, one ``[V]`` tensor per token."""

    tokens: list
    stats: dict
    stopped: list
    logprobs: list | None = None
    depths: list | None = None  # depths[row][i]: stages whose heads decided token i (wand/route exit depth)
    accepted: list | None = None  # accepted[row][r]: draft tokens row accepted in speculative round r


# ----------------------------------------------------------------------------- the engine
class Engine:
    """``Engine(model).generate(prompt_ids, max_new_tokens, mode=...)``; see the module docstring."""

    def __init__(self, model):
        self.model = model
        self.last_result: GenerationResult | None = None
        self.last_states: list = []  # [(rows, DecodeState)] of the last call (one batch), for inspection

    def generate(self, prompt_ids, max_new_tokens: int | None = None, options: DecodeOptions | None = None, on_token=None,
                 **fields) -> GenerationResult:
        """Generate ``max_new_tokens`` per row (fewer when a stop token ends it; stop tokens are
        banned before ``min_new_tokens``). ``prompt_ids``: one list of ids or a list of them, any
        lengths (one left-padded batch). ``options``: a ``DecodeOptions`` (``options.py``: the
        mode, its parameters, sampling, seed, stop tokens); ``fields``: any of its field names,
        replacing those of ``options`` (``generate(ids, 8, mode="wand", bounds=b)``).
        Speculative: ``m`` drafts per round (``"auto"``: chosen each round from the acceptance
        measured so far, ``speculative.choose_m``), drafted by the PoE of stages ``0..draft-1``.

        ``stats``: ``tokens_per_s`` (new tokens of all rows / wall time incl. prefill),
        ``mean_depth`` (stages whose heads decided a token, mean over tokens), ``acceptance``
        (accepted draft tokens / proposed; None unless speculative), ``mean_accepted`` (accepted
        per row per round), ``rounds``, ``proposed``, ``accepted``, ``accept_hist`` (rows-rounds
        by accepted count 0..m), ``depth_hist`` (tokens by depth 1..K), ``elapsed_s``, ``new_tokens``,
        ``stage_positions`` (positions each stage processed, catch-up and rejected drafts included),
        ``compactions`` (speculative cache repacks), ``rejections`` (row-rounds whose draft run ended
        at a rejection), ``m_hist`` (rounds by draft length). Per row: ``result.depths`` and
        ``result.accepted``. ``on_token(row, token)`` is called as each token is produced."""
        for row, tok in self.stream(prompt_ids, max_new_tokens, options, **fields):
            if on_token is not None:
                on_token(row, tok)
        return self.last_result

    def stream(self, prompt_ids, max_new_tokens: int | None = None, options: DecodeOptions | None = None, **fields):
        """Validate now (``DecodeOptions.validate``), then return an iterator of ``(row, token)``
        in production order; ``self.last_result`` holds the ``GenerationResult`` once it is exhausted."""
        model = self.model
        if max_new_tokens is not None:
            fields["max_new_tokens"] = max_new_tokens
        opts = DecodeOptions.of(options, **fields)
        prompts = _prompts(prompt_ids, model.config.vocab_size)
        req = opts.validate(model.config.n_stages, model.config.max_seq_len, max(len(r) for r in prompts))
        device = model.wte.weight.device
        if req.seed == "global":
            gen = None  # torch's default generator for the device
        else:
            gen = torch.Generator(device=device)
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(req.seed))
        sampler = Sampler(req.temperature, req.top_k, req.top_p, gen)
        return self._events(prompts, req, sampler)

    def _events(self, prompts, req: DecodeOptions, sampler: Sampler):
        model = self.model
        B = len(prompts)
        stats = {"rounds": 0, "row_rounds": 0, "proposed": 0, "accepted": 0, "rejections": 0, "accept_hist": [0] * (req.draft_len + 1),
                 "m_hist": [0] * (req.draft_len + 1), "depth_sum": 0, "depth_hist": [0] * model.config.n_stages}
        out = GenerationResult([[] for _ in range(B)], stats, [False] * B, [[] for _ in range(B)] if req.return_logprobs else None,
                               [[] for _ in range(B)], [[] for _ in range(B)])
        self.last_states = []
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                yield from self._batch(prompts, req, sampler, out)
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - t0
        self._finish(out, req, elapsed)
        self.last_result = out

    def _batch(self, prompts, req: DecodeOptions, sampler: Sampler, out: GenerationResult):
        B, L = len(prompts), max(len(p) for p in prompts)
        spec = req.mode == "speculative"
        # Slots: the prompt, the new tokens, and for speculation one round of drafts plus room for
        # the holes of rows that accepted fewer drafts than others (repacked when full; a repack
        # always leaves room for a round, see ``speculative.py``).
        extra = (req.draft_len + 1) * (1 + (SPEC_SLACK_ROUNDS if B > 1 else 0)) if spec else 0
        st = DecodeState(self.model, B, L + max(req.max_new_tokens, 1) + extra)
        st.load(prompts)
        self.last_states.append((list(range(B)), st))
        tr = Rows(B, req, out, st.tok.device, self.model.config.vocab_size)
        if tr.done():
            return
        t = L - 1
        first = replace(req, mode="full") if spec else req
        while True:
            tok, depth, logp = self._decide(st, t, first, sampler, tr.active, tr)
            yield from tr.emit(tok, depth, logp)
            if tr.done():
                return
            t += 1
            if spec:
                yield from _speculative()(st, tr, tok, t, req.draft_len, sampler)
                return
            st.place(t, tok)

    def _decide(self, st: DecodeState, t: int, req: DecodeOptions, sampler: Sampler, active: torch.Tensor, rows: Rows):
        """The token at position t+1 for every row: (tokens [B], depth per row, log-probs or None).

        ``c_s`` is accumulated the same way in every mode (``z_0 + z_1 + ... `` then ``/ (s+1)``),
        so ``wand`` with infinite bounds and ``full`` are bit-identical."""
        keep = req.return_logprobs
        ban = rows.ban()
        if req.mode == "stage":
            st.extend(req.stage, t + 1)
            z = rows.banned(st.log_probs(req.stage, t, t + 1)[:, 0], ban)
            return sampler.choose(z), req.stage + 1, (F.log_softmax(z, -1) if ban is not None else z) if keep else None
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
            c = rows.banned(acc / (s + 1), ban)
            if s == last:
                ex = ~done
            elif req.mode == "wand":
                ex = poe.wand_exit(c, req.remaining_bounds[s]) & ~done
            elif req.mode == "route" and s == 0:
                top = z.topk(2, dim=-1).values.exp() if req.confidence == "margin" else z.amax(-1, keepdim=True).exp()
                conf = top[:, 0] - top[:, 1] if req.confidence == "margin" else top[:, 0]
                ex = (conf >= req.tau) & ~done  # the confidence kind that was calibrated (metrics.position_stats)
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

    def _finish(self, out: GenerationResult, req: DecodeOptions, elapsed: float):
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
            compactions=sum(s.compactions for _, s in self.last_states),
            stage_positions=[sum(s.positions_run[k] for _, s in self.last_states) for k in range(self.model.config.n_stages)],
        )
        if not spec:
            st["accept_hist"] = []
            st["m_hist"] = []


def _speculative():
    """``speculative.py`` builds on this module, so it is imported when first needed. The
    ``from .speculative import`` form is what transformers' remote-code loader scans for, so the
    export ships the file."""
    from .speculative import decode

    return decode
