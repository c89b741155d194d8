"""Corpus readers, the deterministic train/validation split, validation tokens, data fingerprints.

Documents
---------
``read_documents(path)`` yields documents (``str``) from ``"embedded"`` (the public-domain corpus
in ``poelm/data/embedded``), a file, a directory (searched recursively) or a glob; files are taken in
sorted path order. Formats, by suffix:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line with a string ``text`` field;
* ``.parquet``: a ``text`` column, read one row group at a time with pyarrow (the FineWeb /
  nanochat shard convention); null rows are skipped;
* ``.txt`` / ``.txt.gz``: plain UTF-8 text. Document policy: the file is cut at blank lines into
  paragraphs, and consecutive paragraphs are grouped greedily into documents of at most
  ``TXT_DOC_CHARS`` characters (a longer paragraph is a document of its own, never cut). Lines
  are kept verbatim; paragraphs inside a document are separated by exactly one blank line. So a directory of short ``.txt`` files gives one document
  per file, while one long book gives many documents, which both splits can draw from (one
  document per file would put a single-file corpus entirely into train or into validation).

Empty and whitespace-only documents are skipped. Files of other suffixes inside a directory are
ignored; naming one directly is an error.

A path (or a source's path) may also name a shard folder written by ``poelm tokenize``
(``shards.py``): the same documents as ids, read memory-mapped. Every function here gives the
same answer for a shard folder as for the text it was made from (its name, fingerprint, splits,
validation slices, tokenizer texts), so a run moves between the two freely.

Split
-----
A document is in the validation split iff ``blake2b_64(utf8(text)) < val_fraction * 2**64``
(``is_val``), where ``blake2b_64`` is the 8-byte BLAKE2b digest read big-endian. The split
depends on the text alone: a document lands in the same split whatever its file, position,
order or the seed, and exact duplicates never straddle the two splits.

Validation slices
-----------------
``val_slices`` cuts disjoint slices (``poelm measure``'s measurement and calibration slices; the
training evaluation's is the first) from the front of each source's validation stream, each slice
holding every source in proportion to its weight (SPEC "Slices").

The streaming, mixing, resumable training loader lives in ``poelm/data/mixture.py`` (``TrainLoader``,
re-exported here).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from poelm.core.errors import DataError
from poelm.data import shards

EMBEDDED = Path(__file__).resolve().parent / "embedded" / "embedded.jsonl.gz"
SUFFIXES = (".jsonl.gz", ".txt.gz", ".jsonl", ".txt", ".parquet")
TXT_DOC_CHARS = 8192
_SNIFF = 8192  # bytes checked for NUL (binary file) before reading text
_FMT = "txt, jsonl, jsonl.gz or parquet"


# ----------------------------------------------------------------------------- files
def file_format(path) -> str | None:
    name = str(path).lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def corpus_files(path: str, what: str = "data path") -> list[Path]:
    """The files a data path names, sorted; ``what`` names it in errors (e.g. a mixture source)."""
    if str(path) == "embedded":
        return [EMBEDDED]
    p = Path(path).expanduser()
    if any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(str(path)), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{what} {path}: the glob matches no files")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f))
        if not files:
            raise DataError(f"{what} {path}: directory has no {_FMT} files")
        return files
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{what} not found: {path} (give a file, directory or glob of {_FMT} files, or 'embedded')")
    for f in files:
        if not file_format(f):
            raise DataError(f"{what} {path}: unsupported file type {f.name} (use {_FMT})")
    return files


def _sniff(path: Path, opener) -> None:
    try:
        with opener(path, "rb") as f:
            head = f.read(_SNIFF)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (NUL bytes), not UTF-8 text: remove it or convert it to UTF-8")


def _text_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    _sniff(path, opener)
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            yield from f
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid UTF-8 text: convert it to UTF-8 or remove it") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _paragraphs(path: Path) -> Iterator[str]:
    para: list[str] = []
    for line in _text_lines(path):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\n")
            para = []
    if para:
        yield "".join(para).rstrip("\n")


def _txt_docs(path: Path) -> Iterator[str]:
    doc: list[str] = []
    size = 0  # len("\n\n".join(doc))
    for p in _paragraphs(path):
        grown = size + 2 + len(p) if doc else len(p)
        if doc and grown > TXT_DOC_CHARS:
            yield "\n\n".join(doc)
            doc, grown = [], len(p)
        doc.append(p)
        size = grown
    if doc:
        yield "\n\n".join(doc)


def _jsonl_docs(path: Path) -> Iterator[str]:
    for n, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{path} line {n} has no 'text' field (each JSONL line must be an object with a string 'text')")
        if not isinstance(obj["text"], str):
            raise DataError(f"{path} line {n}: 'text' must be a string, got {type(obj['text']).__name__}")
        yield obj["text"]


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(names) or 'none'})")
    return pf


def unit_count(path: Path) -> int:
    """Number of independently readable units of a file: parquet row groups, else 1 (the file)."""
    if file_format(path) == ".parquet":
        return _parquet(path).num_row_groups
    return 1


def read_unit(path: Path, unit: int) -> list[str]:
    """Non-empty documents of one unit (``unit_count``) of a file, in file order."""
    if file_format(path) == ".parquet":
        col = _parquet(path).read_row_group(unit, columns=["text"]).column("text")
        return [t for t in col.to_pylist() if isinstance(t, str) and t.strip()]
    return list(_file_docs(path))


def _file_docs(path: Path) -> Iterator[str]:
    fmt = file_format(path)
    if fmt in (".txt", ".txt.gz"):
        docs = _txt_docs(path)
    elif fmt in (".jsonl", ".jsonl.gz"):
        docs = _jsonl_docs(path)
    else:
        docs = (t for u in range(unit_count(path)) for t in read_unit(path, u))
    return (t for t in docs if t.strip())


def read_documents(path: str) -> Iterator[str]:
    """Every non-empty document under ``path`` (see the module docstring), in a fixed order.

    An empty file (no document) is an error naming the file."""
    for f in corpus_files(path):
        found = False
        for text in _file_docs(f):
            found = True
            yield text
        if not found:
            raise DataError(f"no documents in {f}: the file is empty or whitespace only")


# ----------------------------------------------------------------------------- split
def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def val_threshold(val_fraction: float) -> int:
    """Documents whose ``doc_hash`` is below this are in the validation split."""
    return int(val_fraction * 2**64)


def is_val(text: str, val_fraction: float) -> bool:
    """Validation-split membership; depends on the text only (module docstring)."""
    return doc_hash(text) < val_threshold(val_fraction)


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float  # normalised: the weights of a mixture sum to 1


def resolve_sources(data_cfg) -> list[Source]:
    """The mixture of ``data.sources`` with weights divided by their sum, or the single
    ``data.path`` source (named ``embedded`` or ``data``) when no sources are given.

    Weights are normalised, so they need not sum to 1 (the card's frontier_v1 weights sum to
    99.1%; each is then used as w / 0.991)."""
    raw = list(getattr(data_cfg, "sources", None) or [])
    if not raw:
        path = str(data_cfg.path)
        if shards.is_shard_dir(path):  # shards keep the name the text source had (shuffle keys use it)
            return [Source(shards.ShardSet(path).name, path, 1.0)]
        return [Source(default_name(path), path, 1.0)]
    items = []
    for i, s in enumerate(raw):
        get = s.get if isinstance(s, dict) else (lambda k, d=None, s=s: getattr(s, k, d))
        name, path, w = get("name") or f"source{i}", str(get("path", "")), get("weight", 1.0)
        if not path:
            raise DataError(f"data source '{name}' has no path")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
            raise DataError(f"data source '{name}' weight must be a positive number, got {w!r}")
        items.append((name, path, float(w)))
    names = [n for n, _, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise DataError(f"data source name '{dup}' is used twice: give every source a unique name")
    total = sum(w for _, _, w in items)
    return [Source(n, p, w / total) for n, p, w in items]


def default_name(path: str) -> str:
    """The name of a lone ``data.path`` source (its shuffle keys use it)."""
    return "embedded" if str(path) == "embedded" else "data"


def _what(src: Source) -> str:
    return f"data source '{src.name}' path" if src.name not in ("data", "embedded") else "data path"


def source_shards(src: Source) -> "shards.ShardSet | None":
    """The shard folder a source's path names (``poelm tokenize``), or None for text."""
    return shards.ShardSet(src.path, _what(src)) if shards.is_shard_dir(src.path) else None


def source_files(src: Source) -> list[Path]:
    """The files a source reads: its text files, or its shards' token files."""
    sh = source_shards(src)
    return sh.files if sh is not None else corpus_files(src.path, what=_what(src))


def file_listing(files: list[Path]) -> list[list]:
    """``[relative path, size]`` of each file, relative to their common directory (so a moved
    corpus keeps its fingerprint)."""
    root = os.path.commonpath([str(f.parent) for f in files])
    return [[os.path.relpath(f, root), f.stat().st_size] for f in files]


def _quotas(total: int, sources: list[Source]) -> list[int]:
    """Split ``total`` by normalised weight via cumulative rounding (the parts sum to ``total``)."""
    out, cum, prev = [], 0.0, 0
    for s in sources:
        cum += s.weight
        edge = round(total * cum) if s is not sources[-1] else total
        out.append(edge - prev)
        prev = edge
    return out


def _split_docs(src: Source, val_fraction: float, val: bool) -> Iterator[str]:
    sh = source_shards(src)
    if sh is not None:  # decoded back: byte-level BPE decodes an encoded text to itself
        from poelm.data.tokenizer import Tokenizer

        tok = Tokenizer.load(sh.path)
        for ids in sh.split_docs(val_threshold(val_fraction), val):
            yield tok.decode(ids[1:].tolist())
        return
    for f in source_files(src):
        for u in range(unit_count(f)):
            for text in read_unit(f, u):
                if is_val(text, val_fraction) == val:
                    yield text


def data_fingerprint(data_cfg) -> str:
    """sha256 identifying the data a run trains on: the split rule and ``val_fraction``, the txt
    document policy, and per source its name, normalised weight and file list (paths relative to
    the source's common directory, with sizes). Moving a corpus to another directory keeps the
    fingerprint; adding, removing or resizing a file, or changing a weight, changes it. The
    shuffle seed is not part of it (the loader state records its own seed)."""
    desc = {"split": ["blake2b-64", float(data_cfg.val_fraction)], "txt_doc_chars": TXT_DOC_CHARS, "sources": []}
    for s in resolve_sources(data_cfg):
        sh = source_shards(s)
        listing = sh.index["listing"] if sh is not None else file_listing(source_files(s))
        desc["sources"].append({"name": s.name, "weight": round(s.weight, 12), "files": listing})
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode("utf-8")).hexdigest()


def check_shard_tokenizer(sh: "shards.ShardSet", tokenizer) -> None:
    if sh.tokenizer_fingerprint != tokenizer.fingerprint:
        raise DataError(f"shards in {sh.path} hold the ids of another tokenizer ({sh.tokenizer_fingerprint[:12]}) than this run's "
                        f"({tokenizer.fingerprint[:12]}): tokenise again with `poelm tokenize ... --tokenizer RUN_DIR`, or train with the text data")


# ----------------------------------------------------------------------------- validation slices
# Share of a too-short validation stream given to the first (measurement) slice when a second
# (calibration) slice is asked for: the card's 1,048,576 : 131,072 = 8 : 1.
MEAS_SHARE = 8 / 9


def slice_sizes(have: int, sizes: list[int]) -> list[int]:
    """Token counts of consecutive slices cut from the front of a stream of ``have`` tokens.

    With room for all (``have >= stream_need(sizes)``) every slice gets its size. Otherwise the
    first slice gets ``min(sizes[0], floor(have * MEAS_SHARE))`` when any later slice is asked
    for (``have`` when none is) and every later slice what is left, in order. So the first slice
    depends on ``have`` and ``sizes[0]`` alone, never on how large the later slices are (only on
    whether there is one): the measurement slice is the same whatever ``--calib-tokens`` is."""
    sizes = [max(0, int(n)) for n in sizes]
    more = any(sizes[1:])
    first = sizes[0] if have >= stream_need(sizes) else min(sizes[0], int(have * MEAS_SHARE) if more else have)
    out, left = [first], have - first
    for n in sizes[1:]:
        out.append(min(n, left))
        left -= out[-1]
    return out


def stream_need(sizes: list[int]) -> int:
    """Tokens of a stream to read so that ``slice_sizes`` can decide: all of the slices, and at
    least ``sizes[0] / MEAS_SHARE`` when later slices are asked for (below that the first one
    would shrink)."""
    sizes = [max(0, int(n)) for n in sizes]
    if not any(sizes[1:]):
        return sizes[0]
    return max(sum(sizes), -(-sizes[0] * 9 // 8))


def _val_stream(src: Source, data_cfg, tokenizer, want: int) -> list[int]:
    """The first ``want`` tokens (fewer if the split is shorter) of a source's validation stream
    ``[BOS] + encode(doc)`` over its validation documents in file order."""
    sh = source_shards(src)
    if sh is not None:
        check_shard_tokenizer(sh, tokenizer)
        got = []
        for ids in sh.split_docs(val_threshold(data_cfg.val_fraction), val=True):
            got.extend(ids.tolist())
            if len(got) >= want:
                break
        return got[:want]
    got, batch = [], []

    def flush():
        for ids in tokenizer.encode_batch(batch):
            got.append(tokenizer.bos_id)
            got.extend(ids)
        batch.clear()

    for text in _split_docs(src, data_cfg.val_fraction, val=True):
        batch.append(text)
        if len(batch) >= 64:
            flush()
            if len(got) >= want:
                break
    if len(got) < want:
        flush()
    return got[:want]


def val_slices(data_cfg, tokenizer, sizes: list[int], allow_fewer: bool = False) -> list[torch.Tensor]:
    """Disjoint, deterministic validation slices of ``sizes`` tokens each (measurement first, then
    calibration), every one holding every source of a mixture in proportion to its weight.

    Source s's validation stream is cut in order: slice i gets the ``q[i][s]`` tokens after the
    ones slices ``0..i-1`` took, ``q[i]`` = cumulative rounding of ``sizes[i] * w_s`` (the parts sum
    to ``sizes[i]``); a slice is its sources' parts concatenated in source order. So slice i
    depends on the data, the tokenizer and ``sizes[0..i]`` only: the measurement slice is the same
    whatever the calibration size, and both hold the same mixture. ``allow_fewer`` (single source
    only) fits the slices into a shorter split by ``slice_sizes`` instead of raising."""
    sizes = [int(n) for n in sizes]
    if not sizes or sizes[0] <= 0 or any(n < 0 for n in sizes):
        raise DataError(f"asked for validation slices of {sizes} tokens: ask for a positive number")
    sources = resolve_sources(data_cfg)
    quotas = [_quotas(n, sources) for n in sizes]  # [slice][source]
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    for j, src in enumerate(sources):
        mine = [q[j] for q in quotas]
        if not any(mine):
            continue
        single = len(sources) == 1
        stream = _val_stream(src, data_cfg, tokenizer, stream_need(mine) if single and allow_fewer else sum(mine))
        have = len(stream)
        if have < sum(mine) and allow_fewer and single and have >= 2:
            mine = slice_sizes(have, mine)
        if have < sum(mine):
            label = "the validation split" if single else f"the validation split of source '{src.name}'"
            raise DataError(f"{label} has only {have} tokens but {sum(mine)} were asked: ask for fewer (train.eval_tokens / "
                            f"--split-tokens / --calib-tokens) or raise data.val_fraction")
        at = 0
        for i, n in enumerate(mine):
            parts[i].append(torch.tensor(stream[at:at + n], dtype=torch.long))
            at += n
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts]


def val_tokens(data_cfg, tokenizer, n_tokens: int, allow_fewer: bool = False) -> torch.Tensor:
    """LongTensor[n_tokens]: the first ``n_tokens`` tokens of the validation split (the first of
    ``val_slices``; the training evaluation's slice). ``allow_fewer`` (single source only)
    returns the whole split when it is shorter than ``n_tokens`` instead of raising."""
    n_tokens = int(n_tokens)
    if n_tokens <= 0:
        raise DataError(f"asked for {n_tokens} validation tokens: ask for a positive number")
    return val_slices(data_cfg, tokenizer, [n_tokens], allow_fewer=allow_fewer)[0]


def val_batches(tokens: torch.Tensor, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over a token slice: window j is ``tokens[j*T : j*T + T + 1]`` split into
    x = window[:-1], y = window[1:], so each of the n-1 targets ``tokens[1:]`` appears exactly once.
    Full windows come ``batch_size`` at a time; a final shorter window (if (n-1) % T != 0) comes
    last as a batch of one row."""
    n, T = tokens.numel(), int(seq_len)
    full = (n - 1) // T
    for b in range(0, full, batch_size):
        rows = torch.stack([tokens[j * T: j * T + T + 1] for j in range(b, min(b + batch_size, full))])
        yield rows[:, :-1], rows[:, 1:]
    if (n - 1) % T:
        tail = tokens[full * T:].unsqueeze(0)
        yield tail[:, :-1], tail[:, 1:]


def tokenizer_texts(data_cfg, max_chars: int | None = None) -> Iterator[str]:
    """Training-split documents for fitting the tokenizer, in file order, at most ``max_chars``
    characters in all (default ``data.tokenizer_train_chars``), shared between mixture sources by
    weight; the last document of a source is cut to fit its share."""
    total = int(data_cfg.tokenizer_train_chars if max_chars is None else max_chars)
    sources = resolve_sources(data_cfg)
    for src, budget in zip(sources, _quotas(total, sources)):
        for text in _split_docs(src, data_cfg.val_fraction, val=False):
            if budget <= 0:
                break
            yield text[:budget]
            budget -= len(text)
