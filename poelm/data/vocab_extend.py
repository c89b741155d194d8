"""Extending a trained tokenizer without renumbering it: continued BPE, prefix checks, pieces.

A trained PoE model's embedding rows, head rows and optimizer state are indexed by token id, so a
vocabulary extended for new data (a new domain, a new language) must keep every old id and every
old merge: new tokens get the ids ``V_old, V_old+1, ...`` and new merges go after the old ones.

**Continued BPE.** ``tokenizers`` trains a BPE only from scratch (its ``BpeTrainer`` has no
"start from these merges"), and a fresh BPE on the new corpus renumbers everything. So the
continuation is written here, as the standard BPE training loop (Sennrich et al. 2016) run on top
of the old model: the new corpus is pre-tokenised with the old tokenizer's own pre-tokeniser, each
word is segmented by the *old* BPE (``models.BPE.tokenize``), then the most frequent adjacent pair
(ties: the smallest pair of strings, so the result is a pure function of the texts) is merged, N
times, or until no pair occurs ``min_frequency`` times. A pair whose concatenation is already a
token is never merged: that merge would change how some old text is encoded without adding a
token. Because every new merge ranks after every old merge and no old merge involves a new token,
the extended tokenizer encodes any text exactly as the old one would and then applies the new
merges; text in which no new merge fires keeps its old ids.

**Pieces.** The old-token ids that spell a new token: the old BPE's segmentation of the new
token's byte-level string (what the old model would have seen for those bytes). ``train.vocab``
initialises every new row as the mean of its pieces' rows.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable

import tokenizers

from poelm.data.tokenizer import Tokenizer, TokenizerError

MIN_FREQUENCY = 2  # a pair seen once is no pattern worth a token (the BpeTrainer default is 0; nanochat's rustbpe uses 2)


def _backend(tok: Tokenizer) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(tok.to_json())


def _words(backend: tokenizers.Tokenizer, texts: Iterable[str]) -> Counter:
    """Pre-tokenised words (byte-level symbol strings) of ``texts`` with their counts."""
    pre = backend.pre_tokenizer
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    return words


def _merge_word(seg: list[str], a: str, b: str) -> list[str]:
    out, i = [], 0
    while i < len(seg):
        if i + 1 < len(seg) and seg[i] == a and seg[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(seg[i])
            i += 1
    return out


def continue_bpe(old: Tokenizer, texts: Iterable[str], new_tokens: int, min_frequency: int = MIN_FREQUENCY) -> Tokenizer:
    """``old`` with up to ``new_tokens`` merges learned on ``texts`` appended (ids ``V_old..``).

    Raises TokenizerError when the texts support no new merge (the corpus brings no new token)."""
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise TokenizerError(f"--new-tokens must be a positive integer, got {new_tokens!r}")
    backend = _backend(old)
    model = backend.model
    vocab = dict(backend.get_vocab(with_added_tokens=True))
    counts = _words(backend, texts)
    if not counts:
        raise TokenizerError("the new corpus has no text: nothing to extend the vocabulary with")
    segs = [[t.value for t in model.tokenize(w)] for w in counts]
    freqs = list(counts.values())
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (seg, f) in enumerate(zip(segs, freqs)):
        for p in zip(seg, seg[1:]):
            pairs[p] += f
            where[p].add(i)
    # Max-heap by (count, then the smallest pair), entries checked against the live counts.
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < new_tokens and heap:
        negc, p = heapq.heappop(heap)
        if pairs.get(p, 0) != -negc:
            continue  # stale entry
        if -negc < min_frequency:
            break
        a, b = p
        if a + b in vocab:
            continue  # would re-encode old text without adding a token
        merges.append(p)
        vocab[a + b] = len(vocab)
        touched = set()
        for i in list(where.pop(p, ())):
            seg, f = segs[i], freqs[i]
            for q in zip(seg, seg[1:]):
                pairs[q] -= f
                where[q].discard(i)
                touched.add(q)
            seg = segs[i] = _merge_word(seg, a, b)
            for q in zip(seg, seg[1:]):
                pairs[q] += f
                where[q].add(i)
                touched.add(q)
        for q in touched:
            c = pairs.get(q, 0)
            if c <= 0:
                pairs.pop(q, None)
                where.pop(q, None)
            elif q != p:
                heapq.heappush(heap, (-c, q))
        pairs.pop(p, None)
    if not merges:
        raise TokenizerError(f"the new corpus brings no new token: no pair of existing tokens occurs {min_frequency}+ times that is not "
                             "already a token; give a corpus of the new domain (or more of it)")
    j = json.loads(backend.to_str())
    j["model"]["vocab"].update({a + b: old.vocab_size + k for k, (a, b) in enumerate(merges)})
    j["model"]["merges"] = list(j["model"]["merges"]) + [[a, b] for a, b in merges]
    return Tokenizer.from_json(json.dumps(j, ensure_ascii=False), source="extended tokenizer")


def _merge_list(tok: Tokenizer) -> list[tuple[str, str]]:
    ms = json.loads(tok.to_json())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in ms]


def check_prefix(old: Tokenizer, new: Tokenizer, where: str = "the new tokenizer") -> None:
    """``new`` extends ``old``: every old token keeps its id, old merges are a prefix of the new
    ones, and at least one token is added. One TokenizerError line otherwise."""
    ov, nv = _backend(old).get_vocab(with_added_tokens=True), _backend(new).get_vocab(with_added_tokens=True)
    for t, i in sorted(ov.items(), key=lambda kv: kv[1]):
        if nv.get(t) != i:
            got = "drops it" if t not in nv else f"gives it id {nv[t]}"
            raise TokenizerError(f"{where} renumbers the old vocabulary: token {i} {t!r} {got}; an extended tokenizer must keep every old id "
                                 "(train it with `poelm extend-vocab --from CORPUS --new-tokens N`)")
    if new.vocab_size <= old.vocab_size:
        raise TokenizerError(f"{where} adds no token ({new.vocab_size} tokens, the model has {old.vocab_size}): nothing to extend")
    if sorted(nv.values()) != list(range(new.vocab_size)):
        raise TokenizerError(f"{where} has gaps in its ids: the new tokens must take ids {old.vocab_size}..{new.vocab_size - 1}")
    om, nm = _merge_list(old), _merge_list(new)
    if nm[:len(om)] != om:
        k = next(i for i, (a, b) in enumerate(zip(om, nm + [None] * len(om))) if a != b)
        raise TokenizerError(f"{where} changes old merge {k} {om[k]!r}: old text would be encoded differently; append new merges after the old ones")
    if json.loads(new.to_json()).get("pre_tokenizer") != json.loads(old.to_json()).get("pre_tokenizer"):
        raise TokenizerError(f"{where} splits text with another pre-tokenizer: old text would be encoded differently")


def pieces(old: Tokenizer, new: Tokenizer) -> dict[int, list[int]]:
    """``{new id: [old ids that spell it]}``: the old BPE's segmentation of each new token."""
    model = _backend(old).model
    nv = _backend(new).get_vocab(with_added_tokens=True)
    out = {}
    for t, i in nv.items():
        if i >= old.vocab_size:
            out[i] = [tk.id for tk in model.tokenize(t)]
    return dict(sorted(out.items()))
