"""The generation prompt set and the figures that need generation but no clock.

Issue 22: speculative acceptance drawn from 4 probe prompts x 16 tokens swung 0.61-0.92 between
saves whose BPB differed by 0.01, so the report called changes that were only a different draw of
prompts. Generation figures therefore come from a deterministic set of held-out contexts and carry
an interval that includes the prompts:

- **the set** (``cut_prompts``): ``n`` contexts of ``context`` tokens cut from the MEASUREMENT
  slice (held-out text the model was trained to continue, the same for every checkpoint), one per
  equal stratum of the slice at an offset drawn from ``numpy.random.default_rng(seed)`` (strata
  keep the contexts disjoint and spread over the slice's sources; a context is at most half a
  stratum, so that another seed draws other contexts); a context that crosses a
  document boundary keeps the part after the last BOS (else the part before it); every prompt is
  ``[BOS] + context`` (BOS first, as in training).
- **untimed figures** (``untimed_figures``; acceptance and agreement need no clock, so they use
  the whole set): full-K greedy continuations of every prompt in one batch; speculative acceptance
  and mean accepted from one teacher-forced pass over each continuation (``metrics.spec_rounds``:
  exact, equal to the engine's, see its docstring); WAND / route agreement with full K and exit
  depths from one batched generation each.
- **intervals**: 95% bootstrap over prompts (``bootstrap.bootstrap`` with one "block" per prompt):
  each resample redraws the prompts with replacement and recomputes every figure as a ratio of sums
  (accepted / proposed, equal tokens / tokens, depth sum / tokens); the expanded percentile
  interval (``bootstrap.expanded_tail``), since 32 prompts are few for a plain percentile one.
"""

from __future__ import annotations

import numpy as np
import torch

from poelm.measure.bootstrap import bootstrap, interval, ratio_stat
from poelm.measure.metrics import spec_rounds
from poelm.measure.options import MeasureOptions
from poelm.measure.probe import full_greedy, teacher_forced_agreement

DEFAULT_PROMPTS = MeasureOptions.gen_prompts
DEFAULT_TOKENS = MeasureOptions.gen_tokens
DEFAULT_CONTEXT = MeasureOptions.gen_context
DEFAULT_SEED = MeasureOptions.gen_seed


def cut_prompts(meas: torch.Tensor, bos_id: int, n: int = DEFAULT_PROMPTS, context: int = DEFAULT_CONTEXT,
                seed: int = DEFAULT_SEED) -> tuple[list[list[int]], list[int]]:
    """``(prompts, starts)``: ``n`` prompts ``[BOS] + context`` from the measurement slice ``meas``
    (module docstring); ``starts`` = each window's offset in the slice. Fewer when the slice is
    shorter than ``n`` contexts of at least 2 tokens."""
    ids = meas.tolist()
    L = len(ids)
    context = max(2, min(int(context), L))
    n = max(0, min(int(n), L // 2))
    if n == 0:
        return [], []
    stride = L // n
    span = min(context, max(2, stride // 2))  # a short stratum shortens the context, leaving room for the seed to move it
    rng = np.random.default_rng(seed)
    prompts, starts = [], []
    for i in range(n):
        s = i * stride + int(rng.integers(0, stride - span + 1))
        win = ids[s:s + span]
        if bos_id in win:  # one document per context: the part after the last BOS, else before the first
            last = len(win) - 1 - win[::-1].index(bos_id)
            win = win[last + 1:] if len(win) - last - 1 >= 2 else win[:win.index(bos_id)]
        if len(win) < 1:
            continue
        prompts.append([bos_id] + win)
        starts.append(s)
    return prompts, starts


def _greedy(model, engine, prompts, n_new) -> list[list[int]]:
    if engine is None:
        return [full_greedy(model, None, x, n_new) for x in prompts]
    res = engine.generate(prompts, n_new, mode="full")
    return [list(t)[:n_new] for t in res.tokens]


def untimed_figures(model, engine, prompts: list[list[int]], n_new: int, modes: dict, *, samples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Figures of the whole set with 95% intervals over prompts: ``spec`` (acceptance, mean
    accepted, counts: teacher-forced rounds of ``modes["speculative"].m`` drafts), ``wand`` and
    ``route`` (agreement with full K, identical continuations, mean exit depth, depth histogram;
    when ``modes`` holds their ``DecodeOptions`` and an engine exists), ``full`` (the greedy
    continuations, for the timed protocol's cross-check). ``modes``: ``timing.modes_for``."""
    full = _greedy(model, engine, prompts, n_new)
    cols, mismatch = [], 0
    for x, y in zip(prompts, full):
        agree, mm = teacher_forced_agreement(model, x, y)
        mismatch += mm
        sr = spec_rounds(agree, modes["speculative"].m)
        cols.append([sr["accepted"], sr["proposed"], sr["rounds"], len(y)])
    modes = {k: modes[k] for k in ("wand", "route") if k in modes and engine is not None}
    gens = {}
    K = model.config.n_stages
    for name, opts in modes.items():
        res = engine.generate(prompts, n_new, options=opts)
        gens[name] = res
        for row, (y, t) in enumerate(zip(full, res.tokens)):
            t = list(t)[:len(y)]
            depths = list((res.depths or [[]] * len(full))[row])[:len(t)]
            cols[row] += [sum(a == b for a, b in zip(t, y)), len(t), float(sum(depths)), len(depths)]
    arr = np.asarray(cols, dtype=np.float64)
    pairs = [(0, 1, 1.0), (0, 2, 1.0)]  # acceptance = accepted / proposed; mean accepted = accepted / rounds
    for i in range(len(modes)):
        c = 4 + 4 * i
        pairs += [(c, c + 1, 1.0), (c + 2, c + 3, 1.0)]  # agreement; mean exit depth
    point, lo, hi = bootstrap(ratio_stat(pairs), arr, samples, seed, level, expand=True) if len(arr) else (np.full(len(pairs), np.nan),) * 3
    fig = [interval(point[i], lo[i], hi[i]) for i in range(len(pairs))]
    tot = arr.sum(axis=0) if len(arr) else np.zeros(4 + 4 * len(modes))
    out = {"full": full, "prompts": len(prompts), "new_tokens": int(tot[3]),
           "spec": {"acceptance": fig[0]["value"], "acceptance_ci": fig[0]["ci"], "mean_accepted": fig[1]["value"],
                    "mean_accepted_ci": fig[1]["ci"], "accepted": int(tot[0]), "proposed": int(tot[1]), "rounds": int(tot[2]),
                    "full_consistency_mismatches": int(mismatch)}}
    for i, name in enumerate(modes):
        res, c = gens[name], 4 + 4 * i
        hist = [0] * K
        for d in (x for row in (res.depths or []) for x in row):
            hist[int(d) - 1] += 1
        out[name] = {"agreement": fig[2 + 2 * i]["value"], "agreement_ci": fig[2 + 2 * i]["ci"],
                     "identical": int(sum(list(t)[:len(y)] == y for t, y in zip(res.tokens, full))),
                     "mean_depth": fig[3 + 2 * i]["value"], "mean_depth_ci": fig[3 + 2 * i]["ci"], "depth_hist": hist,
                     "stage_positions": list(res.stats.get("stage_positions") or []), "prompts": len(prompts), "new_tokens": int(tot[c + 1])}
    return out
