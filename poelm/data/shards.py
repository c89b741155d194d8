"""Token shards: a corpus tokenised once, read back memory-mapped.

A *shard folder* holds one data source (``poelm tokenize`` writes one per source of a mixture):

* ``index.json`` (written last: its presence marks the folder complete): format, the source's
  default name, the tokenizer's fingerprint, ``bos_id``, ``dtype`` (``uint16`` when the
  vocabulary fits in 65,536 ids, else ``uint32``), the source files' listing (for
  ``data_fingerprint``: a shard folder and the text it came from fingerprint the same) and one
  entry per shard;
* ``tokenizer.json``: the tokenizer the ids belong to;
* ``shard-XXXXX/`` per source file, in the source's sorted file order, each written as a whole
  with ``fsio.atomic_dir`` (so a kill leaves complete shards and a temp dir, never half of one):
  ``tokens.bin`` (every non-empty document of the file as ``[BOS] + ids``, end to end, in file
  order), ``docs.npy`` (int64 token offsets, ``n_docs + 1``), ``hashes.npy`` (uint64: the
  document's ``blake2b_64`` split key, so any ``val_fraction`` splits the shards exactly as it
  splits the text), ``units.npy`` (int64 document offsets of the file's units: parquet row
  groups, else one), and ``shard.json`` (the file's sha256, size and counts).

Validation documents are kept (the split is applied when reading, from the stored key). The
loader reads through ``np.memmap``: a rank touches only the pages of the rows it materialises.
This module knows the format only; ``pretokenize.py`` reads text and writes shard folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from poelm.core.errors import DataError
from poelm.fsio import atomic_dir, atomic_write_json

FORMAT = "poelm-shards"
VERSION = 1
INDEX = "index.json"
SHARD_META = "shard.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_shard_dir(path) -> bool:
    """A folder ``poelm tokenize`` wrote to (complete or not): a poelm shard index, a finished
    shard or a shard being written. A text corpus's own ``index.json`` or ``shard-0001.jsonl``
    files do not count."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        return False
    try:  # atomic_write_json sorts keys: "format" comes within the first lines
        with open(p / INDEX, "rb") as f:
            if f'"format": "{FORMAT}"'.encode() in f.read(512):
                return True
    except OSError:
        pass
    return any((d / SHARD_META).is_file() for d in p.glob("shard-[0-9]*") if d.is_dir()) or any(d.is_dir() for d in p.glob(".shard-[0-9]*.tmp"))


def split_mask(hashes: np.ndarray, threshold: int, val: bool) -> np.ndarray:
    """Documents in the validation (``val``) or training split: ``hash < threshold`` is validation
    (``corpus.is_val`` with ``threshold = corpus.val_threshold(val_fraction)``)."""
    if threshold >= 1 << 64:
        inval = np.ones(len(hashes), dtype=bool)
    else:
        inval = hashes < np.uint64(threshold)
    return inval if val else ~inval


# ----------------------------------------------------------------------------- writing
def write_shard(final: Path, units, encode_batch, bos_id: int, dtype: np.dtype, meta: dict) -> dict:
    """Write one shard directory atomically from ``units``: an iterable of ``(texts, hashes)``
    per unit of the source file. Returns its ``shard.json`` record."""
    with atomic_dir(final, overwrite=True) as tmp:
        doc_offs, hashes, unit_offs = [0], [], [0]
        with open(tmp / "tokens.bin", "wb") as f:
            for texts, keys in units:
                ids = encode_batch(texts) if texts else []
                lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
                flat = np.empty(int(lens.sum()), dtype=dtype)
                at = 0
                for x in ids:
                    flat[at] = bos_id
                    flat[at + 1: at + 1 + len(x)] = x
                    at += 1 + len(x)
                f.write(flat.tobytes())
                doc_offs.extend((doc_offs[-1] + np.cumsum(lens)).tolist())
                hashes.extend(keys)
                unit_offs.append(unit_offs[-1] + len(ids))
        np.save(tmp / "docs.npy", np.asarray(doc_offs, dtype=np.int64))
        np.save(tmp / "hashes.npy", np.asarray(hashes, dtype=np.uint64))
        np.save(tmp / "units.npy", np.asarray(unit_offs, dtype=np.int64))
        rec = {**meta, "docs": len(hashes), "tokens": int(doc_offs[-1]), "units": len(unit_offs) - 1}
        atomic_write_json(tmp / SHARD_META, rec)
    return rec


def read_shard_meta(d: Path) -> dict | None:
    """A complete shard's record, or None (missing or unreadable: the shard is redone)."""
    try:
        return json.loads((d / SHARD_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- reading
class ShardSet:
    """A complete shard folder, opened read-only (arrays memory-mapped on first use)."""

    def __init__(self, path, what: str = "data path"):
        self.path = Path(str(path)).expanduser()
        ipath = self.path / INDEX
        if not ipath.is_file():
            raise DataError(f"{what} {path} is an incomplete shard folder (no {INDEX}): run the same `poelm tokenize` again to finish it")
        try:
            idx = json.loads(ipath.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{what} {path}: {INDEX} is not valid JSON; tokenise the data again") from None
        if not isinstance(idx, dict) or idx.get("format") != FORMAT or idx.get("version") != VERSION:
            raise DataError(f"{what} {path}: {INDEX} is not a poelm shard index (version {VERSION}); tokenise the data again")
        self.index = idx
        self.name = idx["name"]
        self.dtype = np.dtype(idx["dtype"])
        self.bos_id = int(idx["bos_id"])
        self.tokenizer_fingerprint = idx["tokenizer_fingerprint"]
        self.shards = idx["shards"]
        self.units = [(si, u) for si, sh in enumerate(self.shards) for u in range(sh["units"])]
        self._open: dict[int, tuple] = {}

    @property
    def files(self) -> list[Path]:
        return [self.path / sh["dir"] / "tokens.bin" for sh in self.shards]

    def arrays(self, si: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, doc offsets, split keys, unit offsets) of shard ``si``, memory-mapped."""
        if si not in self._open:
            d = self.path / self.shards[si]["dir"]
            try:
                n = self.shards[si]["tokens"]
                toks = np.memmap(d / "tokens.bin", dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
                docs, keys, units = (np.load(d / f, mmap_mode="r", allow_pickle=False) for f in ("docs.npy", "hashes.npy", "units.npy"))
                # plain ndarray views of the same mapping: np.memmap's Python-level slicing costs
                # ~10 us a slice, and the packer slices every document it reaches
                toks, docs, keys, units = (a.view(np.ndarray) for a in (toks, docs, keys, units))
            except (OSError, ValueError) as e:
                raise DataError(f"shard {d} is unreadable ({e}); tokenise the data again") from None
            if len(docs) != self.shards[si]["docs"] + 1 or int(docs[-1]) != n:
                raise DataError(f"shard {d} does not match {INDEX} (documents or tokens differ); tokenise the data again")
            self._open[si] = (toks, docs, keys, units)
        return self._open[si]

    def unit_docs(self, uid: int, threshold: int, val: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, starts, ends): the documents of unit ``uid`` in one split, in file order;
        document k is ``tokens[starts[k]:ends[k]]`` (``[BOS] + ids``)."""
        si, u = self.units[uid]
        toks, docs, keys, units = self.arrays(si)
        a, b = int(units[u]), int(units[u + 1])
        keep = np.flatnonzero(split_mask(np.asarray(keys[a:b]), threshold, val)) + a
        docs = np.asarray(docs[a:b + 1])
        return toks, docs[keep - a], docs[keep - a + 1]

    def split_docs(self, threshold: int, val: bool):
        """Every document of one split as a token array, in file order."""
        for uid in range(len(self.units)):
            toks, starts, ends = self.unit_docs(uid, threshold, val)
            for s, e in zip(starts.tolist(), ends.tolist()):
                yield toks[s:e]
