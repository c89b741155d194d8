"""``poelm_devils_cloze``: a 4-way multiple-choice cloze over held-out Devil's Dictionary entries.

The offline benchmark poelm ships (``poelm eval TARGET --tasks poelm_devils_cloze``): built from
the embedded corpus (``poelm/data/embedded``), so it needs no download, and only from entries in
the *validation* split (``poelm.data.corpus.is_val`` at the model's own ``data.val_fraction``), so
a model trained on the embedded corpus has never seen any of its texts.

An item is one entry ``"HEADWORD, pos. Definition ..."`` of Ambrose Bierce's dictionary:

- context: ``"HEADWORD, pos."`` (exactly how the entry starts in the training text);
- choices: the first ``WORDS`` words of its own definition (the gold answer) and of the
  definitions of ``CHOICES - 1`` other held-out entries (distractors). Distractors are held-out
  text too: a distractor the model had memorised from training would score a high likelihood
  whatever the headword, and push the score below chance for the wrong reason;
- lm-eval scores each choice by its log-likelihood after the context (``acc``) and by that
  log-likelihood per byte (``acc_norm``); chance is ``1 / CHOICES`` = 0.25 for both.

Everything is a function of the corpus text and ``val_fraction``: distractors and the gold
position come from a ``random.Random`` seeded with the entry's BLAKE2b hash, and items are
ordered by that hash (not alphabetically), so ``--limit N`` takes a spread of the alphabet.
Entries that do not start with an upper-case headword, a comma and a part of speech (17 of 999:
letters of the alphabet, Latin phrases) or whose definition is shorter than ``MIN_WORDS`` words
are skipped. At ``val_fraction = 0.1`` (the embedded preset) there are 86 items, at 0.05 45.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from poelm.core.errors import DataError
from poelm.data.corpus import EMBEDDED, doc_hash, is_val

NAME = "poelm_devils_cloze"
TEMPLATE = Path(__file__).resolve().parent / "devils_cloze.yaml"
SOURCE = "devils-dictionary"  # the embedded corpus' "source" field (poelm/data/embedded/README.md)
CHOICES = 4
WORDS = 8
MIN_WORDS = 4
# "ABASEMENT, n. A decent ...", "ABSTAINER, n. ...", "ACCORD, v.t. ..."; the headword may hold
# spaces, digits, apostrophes and hyphens ("ALL-ROUND", "AIR, n."); the part of speech is one or
# more dotted abbreviations ("n.", "v.t.", "n.pl.", "adj. and n.").
ENTRY = re.compile(r"([A-Z][A-Z0-9'\- ]*?), ((?:[a-z]+\.(?: ?and | ?& | )?)+?)\s+(\S.*)", re.S)


def entries(path: Path = EMBEDDED) -> list[str]:
    """The Devil's Dictionary entries of the embedded corpus, in file order."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the embedded corpus {path}: {e}; reinstall poelm") from None
    return [r["text"] for r in rows if r.get("source") == SOURCE and isinstance(r.get("text"), str)]


def _parse(text: str):
    m = ENTRY.match(text)
    if m is None:
        return None
    words = m.group(3).split()
    if len(words) < MIN_WORDS:
        return None
    return f"{m.group(1)}, {m.group(2).strip()}", " ".join(words[:WORDS])


def items(val_fraction: float, texts: list[str] | None = None) -> list[dict]:
    """The task's documents: ``{"id", "query", "choices", "gold"}`` per held-out entry, ordered
    by the entry's hash (module docstring)."""
    texts = entries() if texts is None else texts
    held = sorted((doc_hash(t), p) for t in texts if is_val(t, val_fraction) and (p := _parse(t)) is not None)
    if len(held) < CHOICES:
        raise DataError(f"{NAME}: only {len(held)} held-out entries at val_fraction={val_fraction}; need at least {CHOICES}")
    out = []
    for i, (h, (query, answer)) in enumerate(held):
        rng = random.Random(h)
        # distinct distractor texts (two entries may open with the same words)
        others = sorted({a for j, (_, (_, a)) in enumerate(held) if j != i and a != answer})
        picks = rng.sample(others, CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices = picks[:gold] + [answer] + picks[gold:]
        out.append({"id": f"{h:016x}", "query": query, "choices": choices, "gold": gold})
    return out


def write_task(folder, val_fraction: float) -> dict:
    """Write the JSONL data and the task YAML (which includes the shipped template) into
    ``folder`` (a fresh temporary folder: lm-eval's ``include_path``); return
    ``{"name", "yaml", "data", "n", "chance", "val_fraction"}``."""
    folder = Path(folder)
    docs = items(val_fraction)
    data = folder / f"{NAME}.jsonl"
    data.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs), encoding="utf-8")
    yaml = folder / f"{NAME}.yaml"
    # JSON strings are valid YAML scalars: paths with spaces or colons stay one value
    yaml.write_text(f"include: {json.dumps(str(TEMPLATE))}\ntask: {NAME}\ndataset_kwargs:\n"
                    f"  data_files:\n    test: {json.dumps(str(data))}\n  cache_dir: {json.dumps(str(folder / 'hf-datasets'))}\n",
                    encoding="utf-8")
    return {"name": NAME, "yaml": yaml, "data": data, "n": len(docs), "chance": 1.0 / CHOICES, "val_fraction": float(val_fraction)}
