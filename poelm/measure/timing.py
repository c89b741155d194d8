"""Timed decoding on the generation prompt set: self-speculative, WAND and route against full K.

SPEC "Timings and intervals": a speedup is a ratio of wall times measured in one process after
warm-up, modes interleaved, repeated. The protocol (the same as ``bench/decode.py``'s):

1. warm-up: every mode decodes a few tokens of the first prompt once (allocator, kernels);
2. ``repeats`` rounds; in each, every mode decodes the same prompts (the first ``prompts`` of the
   generation set cut from the measurement slice, ``genset.py``; BOS first) for the same number of
   new tokens, greedy, one prompt at a time, through the same engine; the modes run back to back
   on each prompt, their order rotated from prompt to prompt, so a slow spell of a shared machine
   hits the modes of a cell alike and never always the same mode;
3. every (round, prompt) wall time is kept; ``speedup(mode) = sum T(full) / sum T(mode)`` over
   all cells, with a 95% interval from a crossed bootstrap that redraws rounds AND prompts
   (``bootstrap.crossed_bootstrap``): issue 22 found a [min, max] over rounds of the same 4
   prompts too narrow (a re-measurement fell outside it), because the prompts drawn matter as much
   as the machine. ``repeats`` in the record keeps the per-round ratios for inspection.

Acceptance, mean accepted, agreement in generation and exit depths need no clock: they come from
the whole generation set (``genset.untimed_figures``, more prompts than the timed rounds) with
intervals over prompts.

Modes: ``full`` (the baseline), ``stage0`` (stage 0's blocks + head: its per-token cost),
``speculative`` (m-token stage-0 draft, full-K verify), ``wand`` (the checkpoint's fresh p99
bounds) and ``route`` (the calibrated tau, thresholding the calibrated confidence kind).

What each figure counts:

- measured speedups include everything the engine does, in particular the exact KV catch-up of
  ``wand``/``route``: a position that exits after stage 0 is still run through stages 1..K-1 later
  (batched), so only the heads of the skipped stages and the per-step work are saved;
- ``implied_speedup`` of speculative decoding: from the exact acceptance on the timed prompts
  (teacher-forced ``spec_rounds``: proposed drafts and rounds) and the measured stage costs,
  ``N / (P + (proposed + rounds) c + rounds (1 - c))`` with N new tokens over P prompts and
  ``c = t(stage0) / t(full)`` per token: the first token of a prompt costs a full step, a round
  feeds d+1 positions to stage 0 one at a time and verifies them with stages 1..K-1 in one chunk,
  costed as one full step minus one stage-0 step (per-call costs dominate short chunks; a chunk of
  d+1 positions may cost somewhat more); resampled with the same rounds and prompts as the times.
"""

from __future__ import annotations

import statistics
import time

import torch

from poelm.infer.options import DecodeOptions
from poelm.measure.bootstrap import crossed_bootstrap
from poelm.measure.bootstrap import interval as bootstrap_interval
from poelm.measure.genset import untimed_figures
from poelm.measure.metrics import spec_rounds
from poelm.measure.options import MeasureOptions
from poelm.measure.record import Record
from poelm.measure.probe import budget, get_engine, load_prompt_set, run_probe, teacher_forced_agreement

# The timed part: 3 rounds x 8 prompts x 16 tokens per mode (twice the old 3 x 4 x 16; the whole
# measurement stays within ~1.5x of its old cost on the demo); the interval now includes the prompts
# (crossed bootstrap), and acceptance comes from the whole generation set, untimed.
DEFAULT_REPEATS = MeasureOptions.timing_repeats
DEFAULT_PROMPTS = MeasureOptions.timing_prompts
DEFAULT_TOKENS = MeasureOptions.timing_tokens
WARMUP_TOKENS = 4


def _sync(model):
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def interval(xs) -> dict:
    """``{"value": median, "ci": [min, max], "repeats": [...]}`` of per-round figures."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"value": None, "ci": [None, None], "repeats": []}
    return {"value": statistics.median(xs), "ci": [min(xs), max(xs)], "repeats": xs}


def modes_for(K: int, m: int, bounds=None, tau=None, confidence: str = "maxprob") -> dict[str, DecodeOptions]:
    """The engine's options of every timed mode this model supports."""
    modes = {"full": DecodeOptions(mode="full")}
    if K > 1:
        modes["stage0"] = DecodeOptions(mode="stage", stage=0)
        modes["speculative"] = DecodeOptions(mode="speculative", m=m)
    if bounds is not None and K > 1:
        modes["wand"] = DecodeOptions(mode="wand", bounds=[float(b) for b in bounds])
    if tau is not None and K > 1:
        modes["route"] = DecodeOptions(mode="route", tau=float(tau), confidence=confidence)
    return modes


def _merge(acc: dict | None, st: dict) -> dict:
    keys = ("accepted", "proposed", "rounds", "row_rounds", "new_tokens")
    lists = ("accept_hist", "depth_hist", "stage_positions")
    if acc is None:
        acc = {k: 0 for k in keys} | {k: [] for k in lists}
    for k in keys:
        acc[k] += int(st.get(k) or 0)
    for k in lists:
        v = list(st.get(k) or [])
        a = acc[k] + [0] * (len(v) - len(acc[k]))
        acc[k] = [x + (v[i] if i < len(v) else 0) for i, x in enumerate(a)]
    return acc


def time_modes(model, engine, prompts: list[list[int]], n_new: list[int], modes: dict[str, DecodeOptions], repeats: int) -> dict:
    """Run the protocol (module docstring); returns per mode the wall time of every (round,
    prompt) cell (``times[mode][r][p]``), the first round's new tokens per prompt (``tokens``) and
    merged engine statistics (``stats``)."""
    names = list(modes)
    for name in names:  # warm-up
        engine.generate(prompts[0], min(WARMUP_TOKENS, n_new[0]), options=modes[name])
    times = {k: [] for k in names}
    tokens = {k: [] for k in names}
    stats = {k: None for k in names}
    for r in range(repeats):
        for name in names:
            times[name].append([0.0] * len(prompts))
        for p, (ids, n) in enumerate(zip(prompts, n_new)):
            k = (r * len(prompts) + p) % len(names)
            for name in names[k:] + names[:k]:  # every mode on this prompt back to back: a slow spell hits them alike
                _sync(model)
                t0 = time.perf_counter()
                res = engine.generate(ids, n, options=modes[name])
                _sync(model)
                times[name][r][p] = time.perf_counter() - t0
                if r == 0:
                    tokens[name].append(list(res.tokens[0]))
                    stats[name] = _merge(stats[name], res.stats)
    return {"times": times, "tokens": tokens, "stats": stats}


def _ratio(num, den, samples, seed, level) -> dict:
    """``sum num / sum den`` over (round, prompt) cells with its crossed-bootstrap interval, and the
    per-round ratios (``repeats``)."""
    point, lo, hi = crossed_bootstrap([num, den], lambda S: (S[:, 0] / S[:, 1])[:, None], samples, seed, level)
    out = {k: v for k, v in bootstrap_interval(point[0], lo[0], hi[0]).items()}
    out["repeats"] = [sum(a) / sum(b) for a, b in zip(num, den)]
    return out


def timed_generation(model, prompts: list[list[int]], engine, modes: dict[str, DecodeOptions], *, n_prompts: int = DEFAULT_PROMPTS,
                     n_tokens: int = DEFAULT_TOKENS, repeats: int = DEFAULT_REPEATS, samples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict | None:
    """The protocol on the first ``n_prompts`` prompts (token ids, BOS first), ``n_tokens`` new
    tokens each, for every mode of ``modes`` (``modes_for``); returns ``{"timing", "spec", "wand",
    "route"}`` timed figures (None: nothing to time)."""
    K = model.config.n_stages
    ids, ns = [], []
    for x in prompts[:n_prompts]:
        n = budget(model, x, n_tokens)
        if n >= 2:
            ids.append(x)
            ns.append(n)
    if not ids or K < 2 or repeats < 1:
        return None
    m = modes["speculative"].m
    res = time_modes(model, engine, ids, ns, modes, int(repeats))
    T, toks, st = res["times"], res["tokens"], res["stats"]
    N, P = sum(ns), len(ids)
    full = toks["full"]
    timing = {"prompts": P, "new_tokens": N, "new_tokens_per_prompt": int(n_tokens), "repeats": int(repeats),
              "warmup": f"{WARMUP_TOKENS} tokens of the first prompt, every mode", "order": "modes back to back on each prompt, rotated from prompt to prompt",
              "interval": f"{level:.0%} crossed bootstrap over rounds and prompts", "modes": list(modes),
              "ms_per_token": {k: 1000.0 * statistics.median(sum(r) for r in v) / N for k, v in T.items()}}
    bk = dict(samples=samples, seed=seed, level=level)
    speed = {k: _ratio(T["full"], T[k], **bk) for k in modes if k != "full"}
    # exact acceptance on the timed prompts (teacher-forced rounds), to cost the implied speedup
    per = [spec_rounds(teacher_forced_agreement(model, x, y)[0], m) for x, y in zip(ids, full)]
    rep = lambda v: [list(v)] * len(T["full"])  # noqa: E731  a per-prompt count, the same in every round
    tabs = [T["stage0"], T["full"], rep(ns), rep([1] * P), rep([p["proposed"] for p in per]), rep([p["rounds"] for p in per])]

    def implied(S):
        c = S[:, 0] / S[:, 1]
        return (S[:, 2] / (S[:, 3] + (S[:, 4] + S[:, 5]) * c + S[:, 5] * (1 - c)))[:, None]

    pi, li, hi_ = crossed_bootstrap(tabs, implied, **bk)
    s = st["speculative"]
    tf_acc, tf_prop = sum(p["accepted"] for p in per), sum(p["proposed"] for p in per)
    spec = {"speedup": speed["speculative"], "implied_speedup": bootstrap_interval(pi[0], li[0], hi_[0]),
            "c0_time": _ratio(T["stage0"], T["full"], **bk), "accept_hist": s["accept_hist"],
            "identical_outputs": sum(a == b for a, b in zip(toks["speculative"], full)), "timed_prompts": P,
            "engine_check": {"acceptance": s["accepted"] / s["proposed"] if s["proposed"] else None,
                             "teacher_forced": tf_acc / tf_prop if tf_prop else None}}
    return {"timing": timing, "spec": spec, "wand": speed.get("wand"), "route": speed.get("route")}


def teacher_forced_spec(m: int, untimed: dict) -> dict:
    """Speculative statistics without an engine: the exact teacher-forced acceptance of the
    generation set (``genset.untimed_figures``), no wall-clock speedup."""
    return {"m": m, "mode": "teacher_forced", "prompts": untimed["prompts"], "new_tokens": untimed["new_tokens"], "speedup": None,
            **untimed["spec"]}


def probe_and_timing(rec: Record, model, tokenizer, probe_set, max_new_tokens: int, m: int, confidence: str, *,
                     gen_prompts=(), gen_tokens: int = 32, repeats=DEFAULT_REPEATS, n_prompts=DEFAULT_PROMPTS, n_tokens=DEFAULT_TOKENS,
                     samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The record's generation part: the probe (graded continuations of every prompt of
    ``probe_set``), the untimed figures of the generation set ``gen_prompts`` (token ids, BOS
    first; ``gen_tokens`` new tokens each) and the protocol on its first prompts. Returns the
    ``probe``, ``spec``, ``timing``, ``wand`` and ``routing`` keys to update (``wand.generation`` /
    ``routing.generation`` sit next to their slice figures). Route mode runs only when routing
    selects something: not when tau = 0 already met the cap, nor when no threshold met it."""
    label, prompts = load_prompt_set(probe_set)
    engine = get_engine(model)
    pr = run_probe(model, tokenizer, prompts, label, max_new_tokens, engine)
    for row in pr["results"]:
        row.pop("_gen")
    out = {"probe": pr}
    if rec.K < 2 or not gen_prompts:
        return out
    w, r = (rec.wand.to_dict() if rec.wand else {}), (rec.routing.to_dict() if rec.routing else {})
    rt = rec.routing
    selects = rt is not None and rt.tau is not None and not rt.cap_met_at_tau0 and (rt.fraction_calib or 0) > 0
    tau = rt.tau if selects else None
    bk = dict(samples=samples, seed=seed, level=level)
    modes = modes_for(rec.K, m, w.get("bounds"), tau, confidence)
    un = untimed_figures(model, engine, list(gen_prompts), gen_tokens, modes, **bk)
    if engine is None:
        out["spec"] = teacher_forced_spec(m, un)
        return out
    got = timed_generation(model, list(gen_prompts), engine, modes, n_prompts=n_prompts, n_tokens=n_tokens, repeats=repeats, **bk)
    out["spec"] = {"m": m, "mode": "engine", "prompts": un["prompts"], "new_tokens": un["new_tokens"], **un["spec"]}
    if got is not None:
        out["timing"] = got["timing"]
        out["spec"].update(got["spec"])
    for name, key, base in (("wand", "wand", w), ("route", "routing", r)):
        if name in un:
            g = dict(un[name], speedup=(got or {}).get(name))
            if name == "route":
                g.update(tau=float(tau), confidence=confidence)
            out[key] = {**base, "generation": g}
    return out
