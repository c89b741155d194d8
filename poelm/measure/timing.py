"""Timed decoding on the probe prompts: self-speculative, WAND and route against full K.

SPEC "Timings and intervals": a speedup is a ratio of wall times measured in one process after
warm-up, modes interleaved, repeated. The protocol (the same as ``bench/decode.py``'s):

1. warm-up: every mode decodes a few tokens of the first prompt once (allocator, kernels);
2. ``repeats`` rounds; in each, every mode decodes the same prompts (the first ``prompts`` of the
   probe set, BOS first) for the same number of new tokens, greedy, one prompt at a time, through
   the same engine; the order of the modes is rotated every round, so a slow spell of a shared
   machine does not always hit the same mode;
3. per round r, ``speedup_r(mode) = T_r(full) / T_r(mode)`` (T = summed wall time over the prompts
   of that round); the record gives the median over rounds and the min-max interval
   (``{"value", "ci"}``), so a change between branches can be called real only when it clears it.

Modes: ``full`` (the baseline), ``stage0`` (stage 0's blocks + head: its per-token cost),
``speculative`` (m-token stage-0 draft, full-K verify), ``wand`` (the checkpoint's fresh p99
bounds) and ``route`` (the calibrated tau, thresholding the calibrated confidence kind). Greedy
outputs are deterministic, so the first timed round's tokens and engine statistics are kept.

What each figure counts:

- measured speedups include everything the engine does, in particular the exact KV catch-up of
  ``wand``/``route``: a position that exits after stage 0 is still run through stages 1..K-1 later
  (batched), so only the heads of the skipped stages and the per-step work are saved;
- ``agreement`` of wand/route = position-wise equal tokens vs full greedy over the generated
  tokens (as in ``bench/decode.py``), ``identical`` = prompts whose continuations are identical;
  ``mean_depth`` and ``depth_hist`` = stages whose heads decided each token (the exit depth);
- ``implied_speedup`` of speculative decoding: from the measured acceptance and the measured stage
  costs, ``N / (P + (proposed + rounds) c + rounds (1 - c))`` with N new tokens over P prompts, the
  engine's ``proposed`` draft tokens and ``rounds``, and ``c = t(stage0) / t(full)`` per token of
  the same round: the first token of a prompt costs a full step, a round feeds d+1 positions to
  stage 0 one at a time and verifies them with stages 1..K-1 in one chunk, costed as one full step
  minus one stage-0 step (per-call costs dominate short chunks; a chunk of d+1 positions may cost
  somewhat more); acceptance is exact, the wall-clock noise enters only through the ratio c of one
  round.
"""

from __future__ import annotations

import statistics
import time

import torch

from poelm.measure.metrics import spec_rounds
from poelm.measure.probe import budget, encode, get_engine, load_prompt_set, run_probe, teacher_forced_agreement

# Sized so that the timed decoding costs about as much as the probe itself (5 modes x 3 rounds x
# 4 prompts x 16 tokens ~ 4 x 190 full-K decode steps; measured 65 s at 6 x 24 x 5 rounds on the
# embedded architecture on a loaded 2-core machine, against 6 s for the 7-prompt probe).
DEFAULT_REPEATS = 3
DEFAULT_PROMPTS = 4
DEFAULT_TOKENS = 16
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


def modes_for(K: int, m: int, bounds=None, tau=None, confidence: str = "maxprob") -> dict[str, dict]:
    """Engine keyword arguments of every timed mode this model supports."""
    modes = {"full": {"mode": "full"}}
    if K > 1:
        modes["stage0"] = {"mode": "stage", "stage": 0}
        modes["speculative"] = {"mode": "speculative", "m": m}
    if bounds is not None and K > 1:
        modes["wand"] = {"mode": "wand", "bounds": [float(b) for b in bounds]}
    if tau is not None and K > 1:
        modes["route"] = {"mode": "route", "tau": float(tau)}
        if confidence != "maxprob":  # the engine's default kind; margin thresholds top-1 minus top-2 probability
            modes["route"]["confidence"] = confidence
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


def time_modes(model, engine, prompts: list[list[int]], n_new: list[int], modes: dict[str, dict], repeats: int) -> dict:
    """Run the protocol (module docstring); returns per mode the wall time of every round
    (``times``), the first round's new tokens per prompt (``tokens``) and merged engine
    statistics (``stats``)."""
    names = list(modes)
    for name in names:  # warm-up
        engine.generate(prompts[0], min(WARMUP_TOKENS, n_new[0]), **modes[name])
    times = {k: [] for k in names}
    tokens = {k: [] for k in names}
    stats = {k: None for k in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            total = 0.0
            for ids, n in zip(prompts, n_new):
                _sync(model)
                t0 = time.perf_counter()
                res = engine.generate(ids, n, **modes[name])
                _sync(model)
                total += time.perf_counter() - t0
                if r == 0:
                    tokens[name].append(list(res.tokens[0]))
                    stats[name] = _merge(stats[name], res.stats)
            times[name].append(total)
    return {"times": times, "tokens": tokens, "stats": stats}


def _agreement(out: list[list[int]], ref: list[list[int]]) -> tuple[float | None, int]:
    pairs = [(a, b) for x, y in zip(out, ref) for a, b in zip(x, y)]
    same = sum(a == b for a, b in pairs)
    return (same / len(pairs) if pairs else None), sum(x == y for x, y in zip(out, ref))


def _depth(st: dict) -> tuple[float | None, list[int]]:
    hist = list(st["depth_hist"])
    n = sum(hist)
    return (sum((i + 1) * c for i, c in enumerate(hist)) / n if n else None), hist


def timed_generation(model, tokenizer, prompts: list[dict], engine, *, m: int, bounds=None, tau=None, confidence="maxprob",
                     n_prompts: int = DEFAULT_PROMPTS, n_tokens: int = DEFAULT_TOKENS, repeats: int = DEFAULT_REPEATS) -> dict | None:
    """The protocol on the first ``n_prompts`` prompts, ``n_tokens`` new tokens each; returns
    ``{"timing", "spec", "wand", "route"}`` blocks for the record (None: nothing to time)."""
    K = model.config.n_stages
    ids, ns = [], []
    for p in prompts[:n_prompts]:
        x = encode(tokenizer, p)
        n = budget(model, x, n_tokens)
        if n >= 2:
            ids.append(x)
            ns.append(n)
    if not ids or K < 2 or repeats < 1:
        return None
    modes = modes_for(K, m, bounds, tau, confidence)
    res = time_modes(model, engine, ids, ns, modes, int(repeats))
    T, toks, st = res["times"], res["tokens"], res["stats"]
    N, P = sum(ns), len(ids)
    full = toks["full"]
    timing = {"prompts": P, "new_tokens": N, "new_tokens_per_prompt": int(n_tokens), "repeats": int(repeats),
              "warmup": f"{WARMUP_TOKENS} tokens of the first prompt, every mode", "order": "modes interleaved, rotated every round",
              "interval": "min-max over rounds", "modes": list(modes),
              "ms_per_token": {k: 1000.0 * statistics.median(v) / N for k, v in T.items()}}
    out = {"timing": timing, "spec": None, "wand": None, "route": None}
    speed = {k: interval([a / b for a, b in zip(T["full"], T[k])]) for k in modes if k != "full"}
    s = st["speculative"]
    c = [t0 / tf for t0, tf in zip(T["stage0"], T["full"])]
    implied = [N / (P + (s["proposed"] + s["row_rounds"]) * ci + s["row_rounds"] * (1 - ci)) for ci in c]
    tf = {"accepted": 0, "proposed": 0, "rounds": 0}
    mismatch = 0
    for x, y in zip(ids, full):
        agree, mm = teacher_forced_agreement(model, x, y)
        for k, v in spec_rounds(agree, m).items():
            if k in tf:
                tf[k] += v
        mismatch += mm
    out["spec"] = {"m": m, "mode": "engine", "prompts": P, "new_tokens": N,
                   "acceptance": s["accepted"] / s["proposed"] if s["proposed"] else None,
                   "mean_accepted": s["accepted"] / s["row_rounds"] if s["row_rounds"] else None,
                   "accepted": s["accepted"], "proposed": s["proposed"], "rounds": s["row_rounds"], "accept_hist": s["accept_hist"],
                   "speedup": speed["speculative"], "implied_speedup": interval(implied), "c0_time": interval(c),
                   "identical_outputs": sum(a == b for a, b in zip(toks["speculative"], full)),
                   "teacher_forced": {"acceptance": tf["accepted"] / tf["proposed"] if tf["proposed"] else None,
                                      "mean_accepted": tf["accepted"] / tf["rounds"] if tf["rounds"] else None},
                   "full_consistency_mismatches": mismatch}
    for name in ("wand", "route"):
        if name not in modes:
            continue
        agree, same = _agreement(toks[name], full)
        depth, hist = _depth(st[name])
        out[name] = {"speedup": speed[name], "agreement": agree, "identical": same, "prompts": P, "new_tokens": N,
                     "mean_depth": depth, "depth_hist": hist, "stage_positions": st[name]["stage_positions"]}
        if name == "route":
            out[name].update(tau=float(tau), confidence=confidence)
    return out


def teacher_forced_spec(model, probe: dict, m: int) -> dict:
    """Speculative statistics without an engine: ``metrics.spec_rounds`` over one teacher-forced
    pass on each probe continuation (exact acceptance, no wall-clock speedup)."""
    tf = {"accepted": 0, "proposed": 0, "rounds": 0}
    mismatch = new_total = n = 0
    for r in probe["results"]:
        x, new = r["_gen"]
        if not new:
            continue
        agree, mm = teacher_forced_agreement(model, x, new)
        for k, v in spec_rounds(agree, m).items():
            if k in tf:
                tf[k] += v
        mismatch += mm
        new_total += len(new)
        n += 1
    return {"m": m, "mode": "teacher_forced", "prompts": n, "new_tokens": new_total, "speedup": None,
            "acceptance": tf["accepted"] / tf["proposed"] if tf["proposed"] else None,
            "mean_accepted": tf["accepted"] / tf["rounds"] if tf["rounds"] else None,
            "accepted": tf["accepted"], "proposed": tf["proposed"], "rounds": tf["rounds"], "full_consistency_mismatches": mismatch}



def probe_and_timing(rec: dict, model, tokenizer, probe_set, max_new_tokens: int, m: int, confidence: str, *,
                     repeats=DEFAULT_REPEATS, n_prompts=DEFAULT_PROMPTS, n_tokens=DEFAULT_TOKENS) -> dict:
    """The record's generation part: the probe (graded continuations of every prompt) and the
    protocol on its first prompts (at most ``max_new_tokens`` new tokens each). Returns the ``probe``, ``spec``, ``timing``, ``wand`` and
    ``routing`` keys to update (``wand.generation`` / ``routing.generation`` sit next to their
    slice figures). Route mode is timed only when routing selects something: not when tau = 0
    already met the cap, nor when no threshold met it."""
    label, prompts = load_prompt_set(probe_set)
    engine = get_engine(model)
    pr = run_probe(model, tokenizer, prompts, label, max_new_tokens, engine)
    out = {"probe": pr}
    if rec["K"] > 1 and engine is None:
        out["spec"] = teacher_forced_spec(model, pr, m)
    elif rec["K"] > 1:
        w, r = rec.get("wand") or {}, rec.get("routing") or {}
        selects = r.get("tau") is not None and not r.get("cap_met_at_tau0") and (r.get("fraction_calib") or 0) > 0
        got = timed_generation(model, tokenizer, prompts, engine, m=m, bounds=w.get("bounds"), tau=r["tau"] if selects else None,
                               confidence=confidence, n_prompts=n_prompts, n_tokens=min(n_tokens, max_new_tokens), repeats=repeats)
        if got is not None:
            out.update(timing=got["timing"], spec=got["spec"])
            if got["wand"] is not None:
                out["wand"] = {**w, "generation": got["wand"]}
            if got["route"] is not None:
                out["routing"] = {**r, "generation": got["route"]}
    for row in pr["results"]:
        row.pop("_gen")
    return out
