"""The sample probe: greedy continuations of a fixed prompt set, graded on their start (SPEC
"Sample probe").

Prompt sets are JSONL files, one object per line: ``name``, ``prompt``, and a rubric: ``answer``
(a string: the expected first words of the continuation) and/or ``expect`` (a list of regexes,
``(?i)`` inside one for case-insensitive facts); optional ``window`` (tokens, default
``WINDOW_TOKENS``) and ``sentence`` (default true).

Grading looks at the START of the continuation only, the "graded window": its first ``window``
tokens, leading whitespace dropped, cut after the first sentence (the first ``.``/``!``/``?``
followed by whitespace, or the first line break) unless ``sentence`` is false. A prompt passes
when the window's words begin with the answer's words (words = ``[\\w']+``, case-folded;
``matched_words`` counts the leading words that agree) and every ``expect`` regex occurs in the
window. A right answer buried later in a rambling continuation is therefore not a pass, and a
regex cannot be met by a generic word somewhere in 60 tokens.

Shipped sets: ``card`` (the model card's 7 concepts: capital of France, gold's symbol and atomic
number, the day after Friday, the opposite of hot, the planets, a favourite colour, 5x+3=13) and
``embedded``, a retention probe built from the TRAINING split of the embedded corpus
(``retention.build_retention_set``: a Devil's Dictionary or Jargon File headword -> the first
words of its definition), so a trajectory shows what continual training keeps and forgets. Every
prompt is encoded with BOS first, as the model saw documents in training.

Generation is full-K greedy in fp32 (SPEC: speculative output must be token-identical to it),
through the engine (``poelm.infer.engine.Engine``) when it is importable, otherwise a small
built-in greedy decoder with a KV cache. The timed comparison of decoding modes on the same
prompts is ``timing.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from poelm.core import poe
from poelm.core.errors import PoelmError
from poelm.core.model import KVCache

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
BUILTIN_SETS = ("card", "embedded")
WINDOW_TOKENS = 24
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WORD = re.compile(r"[\w']+")


def load_prompt_set(name_or_path: str) -> tuple[str, list[dict]]:
    """(label, prompts) for a shipped set name (``card``, ``embedded``) or a JSONL path."""
    if name_or_path in BUILTIN_SETS:
        path, label = PROMPT_DIR / f"{name_or_path}.jsonl", name_or_path
    else:
        path, label = Path(name_or_path), str(name_or_path)
    if not path.is_file():
        raise PoelmError(f"prompt set not found: {name_or_path} (use card, embedded or a JSONL file of "
                         f"{{\"name\",\"prompt\",\"answer\" or \"expect\"}} lines)")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise PoelmError(f"{path}:{i}: not valid JSON (each line must be {{\"name\",\"prompt\",\"answer\" or \"expect\"}})") from None
        prompts.append(_prompt(d, f"{path}:{i}", i))
    if not prompts:
        raise PoelmError(f"prompt set {path} is empty")
    return label, prompts


def _prompt(d, where: str, i: int) -> dict:
    if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
        raise PoelmError(f"{where}: needs a string \"prompt\"")
    answer, expect = d.get("answer"), d.get("expect", [])
    if answer is not None and (not isinstance(answer, str) or not words(answer)):
        raise PoelmError(f"{where}: \"answer\" must be a string with at least one word")
    if not isinstance(expect, list):
        raise PoelmError(f"{where}: \"expect\" must be a list of regexes")
    if answer is None and not expect:
        raise PoelmError(f"{where}: give an \"answer\" or a non-empty \"expect\" list (a prompt without a rubric cannot fail)")
    for rx in expect:
        try:
            re.compile(rx)
        except (re.error, TypeError) as e:
            raise PoelmError(f"{where}: bad regex {rx!r} in \"expect\": {e}") from None
    window = d.get("window", WINDOW_TOKENS)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise PoelmError(f"{where}: \"window\" must be a positive number of tokens")
    return {"name": str(d.get("name", f"prompt{i}")), "prompt": d["prompt"], "answer": answer, "expect": list(expect),
            "window": window, "sentence": bool(d.get("sentence", True))}


# ----------------------------------------------------------------------------- grading
def words(text: str) -> list[str]:
    """Case-folded words ``[\\w']+`` (typographic apostrophes read as ')."""
    return _WORD.findall(text.replace("\u2019", "'").casefold())


def graded_window(text: str, sentence: bool = True) -> str:
    """The start of a continuation that is graded: leading whitespace dropped, then (with
    ``sentence``) cut after the first sentence end (``.``/``!``/``?`` before whitespace or the end)
    or before the first line break. ``text`` is already limited to the window's tokens."""
    text = text.lstrip()
    if sentence:
        m = _SENTENCE_END.search(text)
        if m:
            text = text[: m.end()] if m.group() != "\n" else text[: m.start()]
    return text


def grade(window: str, prompt: dict) -> dict:
    """``{"pass", "matched_words", "answer_words"}`` of a graded window under a prompt's rubric
    (module docstring): the window's words must begin with the answer's, and every regex occur."""
    out = {"pass": all(re.search(rx, window) for rx in prompt.get("expect") or [])}
    if prompt.get("answer") is not None:
        want, got = words(prompt["answer"]), words(window)
        k = 0
        while k < len(want) and k < len(got) and got[k] == want[k]:
            k += 1
        out.update(matched_words=k, answer_words=len(want))
        out["pass"] = out["pass"] and k == len(want)
    return out


# ----------------------------------------------------------------------------- generation
def get_engine(model):
    """``poelm.infer.engine.Engine(model)`` if that module is importable, else None."""
    try:
        from poelm.infer.engine import Engine
    except ImportError:
        return None
    return Engine(model)


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


def budget(model, prompt_ids: list[int], max_new: int) -> int:
    """New tokens that fit under max_seq_len (0: the prompt leaves no room)."""
    return max(0, min(max_new, model.config.max_seq_len - len(prompt_ids)))


def encode(tokenizer, prompt: dict) -> list[int]:
    return [tokenizer.bos_id] + tokenizer.encode(prompt["prompt"])


def full_greedy(model, engine, ids: list[int], n: int) -> list[int]:
    if engine is None:
        return greedy_full(model, ids, n)
    return list(engine.generate(ids, n, mode="full").tokens[0])[:n]


def run_probe(model, tokenizer, prompts: list[dict], label: str, max_new_tokens: int = 60, engine=None) -> dict:
    """Greedy full-K continuation of every prompt, graded on its start (a pass/fail row each).

    ``results[i]["_gen"]`` = (prompt ids, new ids) is kept in memory for the speculative
    cross-check; the caller drops it from the record."""
    rows = []
    for p in prompts:
        ids = encode(tokenizer, p)
        n = budget(model, ids, max_new_tokens)
        row = {"name": p["name"], "prompt": p["prompt"], "continuation": "", "graded": "", "pass": False,
               **({"answer": p["answer"]} if p.get("answer") is not None else {}), "expect": p["expect"], "_gen": (ids, [])}
        if n == 0:  # recorded as a failed row rather than aborting a long measurement
            row["error"] = f"prompt of {len(ids)} tokens leaves no room under max_seq_len {model.config.max_seq_len}"
            if p.get("answer") is not None:
                row.update(matched_words=0, answer_words=len(words(p["answer"])))
        else:
            new = full_greedy(model, engine, ids, n)
            # A generated BOS starts the next document: the continuation (and its grade) ends there.
            end = new.index(tokenizer.bos_id) if tokenizer.bos_id in new else len(new)
            window = graded_window(tokenizer.decode(new[: min(end, p["window"])]), p["sentence"])
            row.update(continuation=tokenizer.decode(new[:end]), graded=window, _gen=(ids, new), **grade(window, p))
            if len(new) < max_new_tokens:
                row["new_tokens"] = len(new)  # cut short by max_seq_len
        rows.append(row)
    out = {"set": label, "max_new_tokens": max_new_tokens, "generator": "engine" if engine is not None else "builtin",
           "grading": "start of the continuation: first sentence within the first N tokens (per prompt 'window'); "
                      "answer = the window's first words; expect = regexes inside the window",
           "results": rows, "passed": sum(r["pass"] for r in rows), "total": len(rows)}
    scored = [r for r in rows if "answer_words" in r]
    if scored:
        out["words_matched"] = sum(r["matched_words"] for r in scored)
        out["words_total"] = sum(r["answer_words"] for r in scored)
    return out


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
