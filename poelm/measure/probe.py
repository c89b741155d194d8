"""Generation-based checks on a fixed prompt set: the sample-mode probe and self-speculative
decoding statistics.

Prompt sets are JSONL files, one ``{"name", "prompt", "expect": [regex, ...]}`` per line; a prompt
passes when EVERY regex is found (``re.search``) in its greedy continuation (use ``(?i)`` inside a
regex for case-insensitive facts). Shipped sets: ``card`` (the model card's 7 concepts: capital of
France, gold's symbol and atomic number, the day after Friday, the opposite of hot, the planets,
a favourite colour, 5x+3=13) and ``embedded`` (well-known definitions from the embedded corpus,
The Devil's Dictionary and the Jargon File; a model trained on that corpus fails the card's
facts). Every prompt is encoded with BOS first, as the model saw documents in training.

Generation is full-K greedy in fp32 (SPEC: speculative output must be token-identical to it).
The engine (``poelm.infer.Engine``) is used when importable; otherwise a small built-in greedy
decoder with a KV cache. Speculative statistics come from the engine's speculative mode (mode
"engine", with measured end-to-end speedup) or, without an engine, from ``metrics.spec_rounds``
over one teacher-forced pass on the full-K greedy output (mode "teacher_forced": exact
acceptance statistics, no wall-clock speedup); in engine mode the teacher-forced figures are kept
as a cross-check (``metrics.spec_rounds`` follows the engine's round convention, so for one
prompt at a time the two agree exactly).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from poelm.core import poe
from poelm.core.errors import PoelmError
from poelm.measure.metrics import spec_rounds
from poelm.core.model import KVCache

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
BUILTIN_SETS = ("card", "embedded")


def load_prompt_set(name_or_path: str) -> tuple[str, list[dict]]:
    """(label, prompts) for a shipped set name (``card``, ``embedded``) or a JSONL path."""
    if name_or_path in BUILTIN_SETS:
        path, label = PROMPT_DIR / f"{name_or_path}.jsonl", name_or_path
    else:
        path, label = Path(name_or_path), str(name_or_path)
    if not path.is_file():
        raise PoelmError(f"prompt set not found: {name_or_path} (use card, embedded or a JSONL file of {{\"name\",\"prompt\",\"expect\"}} lines)")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise PoelmError(f"{path}:{i}: not valid JSON (each line must be {{\"name\",\"prompt\",\"expect\":[regex...]}})") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not isinstance(d.get("expect", []), list):
            raise PoelmError(f"{path}:{i}: needs a string \"prompt\" and a list \"expect\" of regexes")
        for rx in d.get("expect", []):
            try:
                re.compile(rx)
            except (re.error, TypeError) as e:
                raise PoelmError(f"{path}:{i}: bad regex {rx!r} in \"expect\": {e}") from None
        prompts.append({"name": str(d.get("name", f"prompt{i}")), "prompt": d["prompt"], "expect": list(d.get("expect", []))})
    if not prompts:
        raise PoelmError(f"prompt set {path} is empty")
    return label, prompts


def score(continuation: str, expect: list[str]) -> bool:
    """Pass iff every regex of the rubric occurs in the continuation."""
    return all(re.search(rx, continuation) for rx in expect)


def get_engine(model):
    """``poelm.infer.Engine(model)`` if that module is importable, else None."""
    try:
        from poelm.infer.engine import Engine
    except ImportError:
        return None
    return Engine(model)


def _attr(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _new_tokens(result, prompt: list[int]) -> list[int]:
    toks = _attr(result, "tokens")
    if isinstance(toks, torch.Tensor):
        toks = toks.flatten().tolist()
    toks = list(toks)
    if toks and isinstance(toks[0], (list, tuple)):  # one row per prompt
        toks = list(toks[0])
    if len(toks) >= len(prompt) and toks[: len(prompt)] == prompt:
        toks = toks[len(prompt):]
    return toks


@torch.no_grad()
def greedy_full(model, ids: list[int], max_new: int) -> list[int]:
    """Built-in full-K greedy decoding (alpha=0 PoE argmax) with a KV cache, fp32."""
    dev = next(model.parameters()).device
    cache = KVCache(model.config, 1, len(ids) + max_new, device=dev)
    x = torch.tensor([ids], device=dev)
    out, pos = [], 0
    for _ in range(max_new):
        z = model.stage_log_probs(x, cache=cache, pos=pos)
        pos += x.size(1)
        nxt = int(poe.aggregate(z[:, 0, -1]).argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]], device=dev)
    return out


def _budget(model, prompt_ids: list[int], max_new: int) -> int:
    """New tokens that fit under max_seq_len (0: the prompt leaves no room)."""
    return max(0, min(max_new, model.config.max_seq_len - len(prompt_ids)))


def _sync(model):
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def generate(model, engine, prompt_ids: list[int], n: int, mode: str = "full", m: int = 4):
    """(new tokens, stats or None, wall seconds) for one prompt."""
    _sync(model)
    t0 = time.perf_counter()
    if engine is None:
        toks, stats = greedy_full(model, prompt_ids, n), None
    else:
        res = engine.generate(prompt_ids, n, mode=mode, m=m)
        toks, stats = _new_tokens(res, prompt_ids)[:n], _attr(res, "stats")
    _sync(model)
    return toks, stats, time.perf_counter() - t0


def run_probe(model, tokenizer, prompts: list[dict], label: str, max_new_tokens: int = 60, engine=None, m: int = 4) -> dict:
    """Greedy full-K continuation of every prompt, scored by its rubric (a pass/fail row).

    With an engine, both decoding paths are warmed up first, so the full-K generations double as
    the timed baseline of ``run_spec``. ``results[i]["_gen"]`` = (prompt ids, new ids, seconds) is
    kept in memory for ``run_spec``; the caller drops it from the record."""
    rows = []
    if engine is not None and prompts:
        ids0 = [tokenizer.bos_id] + tokenizer.encode(prompts[0]["prompt"])
        n0 = min(8, _budget(model, ids0, max_new_tokens))
        if n0 > 1:
            for mode in ("full", "speculative"):
                generate(model, engine, ids0, n0, mode, m)
    for p in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(p["prompt"])
        n = _budget(model, ids, max_new_tokens)
        row = {"name": p["name"], "prompt": p["prompt"], "continuation": "", "pass": False, "expect": p["expect"], "_gen": (ids, [], 0.0)}
        if n == 0:  # recorded as a failed row rather than aborting a long measurement
            row["error"] = f"prompt of {len(ids)} tokens leaves no room under max_seq_len {model.config.max_seq_len}"
        else:
            new, _, secs = generate(model, engine, ids, n, "full")
            # A generated BOS starts the next document: the continuation (and its score) ends
            # there. The full generation is kept for the speculative timing (fixed length).
            end = new.index(tokenizer.bos_id) if tokenizer.bos_id in new else len(new)
            text = tokenizer.decode(new[:end])
            row.update(continuation=text, _gen=(ids, new, secs))
            row["pass"] = score(text, p["expect"])
            if len(new) < max_new_tokens:
                row["new_tokens"] = len(new)  # cut short by max_seq_len
        rows.append(row)
    return {"set": label, "max_new_tokens": max_new_tokens, "generator": "engine" if engine is not None else "builtin",
            "results": rows, "passed": sum(r["pass"] for r in rows), "total": len(rows)}


@torch.no_grad()
def teacher_forced_agreement(model, prompt_ids: list[int], new_ids: list[int]) -> tuple[list[bool], int]:
    """One forward over prompt + full-K greedy output: for each new position, does stage 0's
    argmax equal the greedy token? Also counts positions where the batched full-K argmax differs
    from the (incremental) greedy token (0 unless numerics break a near tie)."""
    if not new_ids:
        return [], 0
    dev = next(model.parameters()).device
    seq = torch.tensor([prompt_ids + new_ids[:-1]], device=dev)
    z = model.stage_log_probs(seq)[:, 0, len(prompt_ids) - 1:]  # [K, n, V]
    want = torch.tensor(new_ids, device=dev)
    agree = (z[0].argmax(-1) == want).tolist()
    mismatch = int((poe.aggregate(z).argmax(-1) != want).sum())
    return agree, mismatch


def run_spec(model, probe: dict, m: int = 4, engine=None) -> dict:
    """Self-speculative statistics on the probe's prompts (see the module docstring)."""
    results = [r for r in probe["results"] if r["_gen"][1]]
    tf = {"accepted": 0, "proposed": 0, "rounds": 0}
    mismatch = new_total = 0
    for r in results:
        ids, new, _ = r["_gen"]
        agree, mm = teacher_forced_agreement(model, ids, new)
        s = spec_rounds(agree, m)
        for k in tf:
            tf[k] += s[k]
        mismatch += mm
        new_total += len(new)
    tf_acc = tf["accepted"] / tf["proposed"] if tf["proposed"] else None
    tf_mean = tf["accepted"] / tf["rounds"] if tf["rounds"] else None
    out = {"m": m, "mode": "teacher_forced", "acceptance": tf_acc, "mean_accepted": tf_mean, "speedup": None,
           "prompts": len(results), "new_tokens": new_total, "full_consistency_mismatches": mismatch}
    if engine is None or not results:
        return out
    # Engine mode: the probe's full-K generations (after warm-up) are the baseline; time the
    # speculative path on the same prompts and token counts, in the same process.
    t_full = t_spec = 0.0
    acc = prop = rounds = 0
    accs, means, identical = [], [], 0
    for r in results:
        ids, full, secs = r["_gen"]
        spec, st, ts = generate(model, engine, ids, len(full), "speculative", m)
        t_full += secs
        t_spec += ts
        identical += int(spec == full)
        if st is not None:
            a, p = _attr(st, "accepted"), _attr(st, "proposed")
            rd = _attr(st, "row_rounds", _attr(st, "rounds"))
            if a is not None and p is not None:
                acc, prop, rounds = acc + a, prop + p, rounds + (rd or 0)
            accs.append(_attr(st, "acceptance"))
            means.append(_attr(st, "mean_accepted"))
    if prop:
        acceptance = acc / prop
        mean_acc = acc / rounds if rounds else _mean(means)
    else:
        acceptance, mean_acc = _mean(accs), _mean(means)
    out.update(mode="engine", acceptance=acceptance, mean_accepted=mean_acc,
               speedup=t_full / t_spec if t_spec > 0 else None, full_s=t_full, spec_s=t_spec,
               identical_outputs=identical,
               teacher_forced={"acceptance": tf_acc, "mean_accepted": tf_mean})
    return out


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
