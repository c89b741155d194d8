"""The embedded retention probe: training-split headwords -> the first words of their definitions.

The card's sample probe asks what the model still knows as continual training goes on. For a
model trained on poelm's embedded corpus (The Devil's Dictionary and the Jargon File) the
equivalent question is whether it still completes an entry of its own training text: the prompt
is an entry's headword (with its part of speech, and for the Jargon File its pronunciation line
and leading sense/tag markers), the expected answer the first ``ANSWER_WORDS`` words of the
definition, graded on the start of the continuation (``probe.grade``).

Selection is deterministic: entries of the training split for every ``val_fraction <=
GUARD_FRACTION`` (``corpus.is_val`` is monotone in the fraction), ordered by ``corpus.doc_hash``,
the first ``per_source`` of each source whose definition's first sentence has at least
``ANSWER_WORDS`` words and is not a cross-reference ("See ..."). Every prompt ends on a boundary
of the tokenizer's pre-tokenisation (``tokenizer.SPLIT_PATTERN``) of the whole entry, so the
prompt's tokens are a prefix of the entry's tokens (the test checks it).

``poelm/measure/prompts/embedded.jsonl`` is the committed output of ``build_retention_set()``
(``python -m poelm.measure.retention > poelm/measure/prompts/embedded.jsonl``); a test checks
that the two agree.
"""

from __future__ import annotations

import gzip
import json
import re

from poelm.data.corpus import EMBEDDED, doc_hash, is_val
from poelm.measure.probe import graded_window, words

ANSWER_WORDS = 4
GUARD_FRACTION = 0.5
PER_SOURCE = 6
_DEVIL = re.compile(r"([A-Z][^\n,]*), ([a-z][a-z. ]*\.)(?= [A-Z])")
_TAGS = re.compile(r"(?:\d+\. )?(?:\[[^\]\n]*\] ?)*")
_SKIP_FIRST = {"see", "same", "syn", "var", "abbreviation"}


def _answer(definition: str) -> str | None:
    """The literal start of ``definition`` that spans its first ANSWER_WORDS words, if its first
    sentence has that many and it is not a cross-reference."""
    first = graded_window(definition)
    ws = words(first)
    if len(ws) < ANSWER_WORDS or ws[0] in _SKIP_FIRST:
        return None
    m = list(re.finditer(r"[\w'\u2019]+", definition))[ANSWER_WORDS - 1]
    return definition[: m.end()]


def split_entry(source: str, text: str) -> tuple[str, str] | None:
    """(prompt, definition) of one entry, or None when it has no usable one-line definition."""
    if source == "devils-dictionary":
        m = _DEVIL.match(text)
        if not m:
            return None
        return text[: m.end()], text[m.end():].lstrip(" ")
    head, sep, rest = text.partition("\n\n")
    if not sep or "\n" in head:
        return None
    para = rest.split("\n\n", 1)[0]
    tags = _TAGS.match(para).group().rstrip(" ")
    if tags:  # "1. [techspeak] A situation..." -> prompt ends after the markers
        if not para[len(tags):].startswith(" "):
            return None
        return text[: len(head) + 2 + len(tags)], para[len(tags):].lstrip(" ")
    return head + "\n\n", para


def build_retention_set(per_source: int = PER_SOURCE) -> list[dict]:
    """The embedded retention prompts (module docstring), Devil's Dictionary first."""
    with gzip.open(EMBEDDED, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for source, tag in (("devils-dictionary", "devil"), ("jargon-file", "jargon")):
        cands = sorted((r["text"] for r in rows if r.get("source") == source and not is_val(r["text"], GUARD_FRACTION)), key=doc_hash)
        n = 0
        for text in cands:
            got = split_entry(source, text)
            answer = _answer(got[1]) if got else None
            if answer is None:
                continue
            prompt = got[0]
            name = re.split(r"[,/\n]| n\.| adj\.| v\.", prompt, maxsplit=1)[0].strip() or prompt.strip()
            out.append({"name": f"{tag}:{name}", "prompt": prompt, "answer": answer})
            n += 1
            if n == per_source:
                break
    return out


def main() -> None:
    for p in build_retention_set():
        print(json.dumps(p, ensure_ascii=False))


if __name__ == "__main__":
    main()
