"""The training loader: packed BOS-aligned rows from a weighted mixture, exactly resumable.

Rows
----
Each source turns its training documents into a stream of rows of ``L = seq_len + 1`` tokens
(``x = row[:-1]``, ``y = row[1:]``). Every document is ``[BOS] + encode(text)``; documents are laid
end to end and every row starts with BOS:

* a row that begins at a document boundary starts with that document's own BOS;
* a document longer than the room left in a row is *continued*: its head fills the row, and the
  next row is ``[BOS]`` followed by the rest of it. No token is dropped; the cost is one extra BOS
  in a row that starts inside a document (at most 1/L of the tokens). We continue rather than
  crop (nanochat's BOS-aligned best-fit drops the cropped tail) so that long documents are seen
  whole and the stream position is a plain (document, token offset) pair.

Order and epochs
----------------
A source's files are cut into *units*: a parquet row group, or a whole txt/jsonl file
(``data.unit_count``). Epoch e visits the units in a shuffled order, and the training documents
of each unit in a shuffled order. Both shuffles sort indices by a BLAKE2b key of
``(seed, source name, epoch, unit, index)``: reproducible across machines and library versions.
Only the unit being read is held in memory (read, split, tokenised in one batch); the embedded
corpus is a single unit, so it is tokenised once and kept. For a large corpus use parquet (row
groups of ~1k documents) or many jsonl shards: nothing is tokenised ahead of its unit.

The position of a source is ``(epoch, unit, doc, tok)``: the ``unit``-th unit of the epoch's
order, the ``doc``-th document of that unit's shuffled order, token offset ``tok`` into
``[BOS] + ids``. Resuming re-reads that one unit, re-derives the same shuffles and continues at
the same token, so a resumed run sees exactly the tokens the uninterrupted run would.

Mixture
-------
Global row i is taken from source s where ``u_i = blake2b_64("mix", seed, i) / 2**64`` falls in
s's interval of the cumulative normalised weights (``data.resolve_sources``). The choice is a
pure function of (seed, i), so the loader state needs only the row counter, and the realised
proportions converge to the weights (``proportions()`` reports them).

Ranks
-----
The row stream is global and independent of the world size. ``next_batch(global_rows, rank,
world_size)`` advances every source exactly as a single process would and returns rank r's
contiguous slice ``[r * global_rows / W, (r + 1) * global_rows / W)`` of the global batch. Each
rank therefore holds the same state (checkpoint it from any rank) and a run resumes on a different
world size without skipping or repeating a token. On text every rank tokenises the whole global
batch but materialises only its own rows; on shards (``poelm tokenize``, ``shards.py``) a rank
advances the positions from the document lengths alone and reads only its own rows' ids.

Prefetch
--------
With ``data.prefetch`` (default on) the loader prepares the next batch in a background thread
(``prefetch.Job``) as soon as it hands one out, assuming the same ``(global_rows, rank,
world_size)``; a call with other arguments rewinds to the handed-out position and computes
synchronously. ``state_dict`` is always the position after the batches *handed out*, never after
the one being prepared, so a resumed run sees exactly the rows an uninterrupted one would.

Batch hashes
------------
Rank 0 (the rank that logs) materialises every row of the global batch and records
``row_digest`` of each; ``batch_hash()`` folds the digests of the rows handed out since its last
call into one hash: the training log's per-step hash, which ``poelm batch`` re-derives. Digests
are per row, so the hash of a step does not depend on how its rows were cut into micro-batches
(world size, accumulation).
"""

from __future__ import annotations

import bisect
import copy
import hashlib

import numpy as np
import torch

from poelm.core.errors import DataError
from poelm.data.corpus import (check_shard_tokenizer, data_fingerprint, is_val, read_unit, resolve_sources, source_files, source_shards,
                               unit_count, val_threshold)
from poelm.data.prefetch import Job

STATE_FORMAT = 1


def _u64(*key) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, key)).encode("utf-8"), digest_size=8).digest(), "big")


def shuffled(n: int, *key) -> list[int]:
    """A permutation of range(n): indices sorted by ``blake2b_64(key..., i)`` (``_u64``'s bytes,
    the key's prefix joined once)."""
    prefix = "".join(f"{k}:" for k in key)
    b2 = hashlib.blake2b
    return sorted(range(n), key=lambda i: int.from_bytes(b2(f"{prefix}{i}".encode("utf-8"), digest_size=8).digest(), "big"))


def row_digest(row: np.ndarray) -> bytes:
    """16-byte BLAKE2b of one row's ``seq_len + 1`` ids as little-endian int32."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype="<i4").tobytes(), digest_size=16).digest()


def batch_hash(digests) -> str:
    """The hash of a global batch: BLAKE2b-128 (hex) of its rows' ``row_digest``s in row order."""
    return hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


class _TextUnits:
    """A source's text files: units read, split and tokenised when reached."""

    def __init__(self, files, tokenizer, val_fraction: float):
        self.files, self.tok, self.val_fraction = files, tokenizer, val_fraction
        self.units = [(fi, u) for fi, f in enumerate(files) for u in range(unit_count(f))]

    def load(self, uid: int):
        fi, u = self.units[uid]
        texts = [t for t in read_unit(self.files[fi], u) if not is_val(t, self.val_fraction)]
        ids = self.tok.encode_batch(texts) if texts else []
        lens = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        offs = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        flat = np.empty(int(offs[-1]), dtype=np.int32)
        for k, x in enumerate(ids):
            flat[offs[k]] = self.tok.bos_id
            flat[offs[k] + 1: offs[k + 1]] = x
        return flat, offs[:-1], offs[1:]


class _ShardUnits:
    """A source's shard folder: a unit's training documents are slices of the memory map."""

    def __init__(self, shardset, val_fraction: float):
        self.shards, self.threshold = shardset, val_threshold(val_fraction)
        self.units = shardset.units

    def load(self, uid: int):
        return self.shards.unit_docs(uid, self.threshold, val=False)


class _SourceStream:
    """One source's packed row stream (module docstring) with its position."""

    def __init__(self, name: str, reader, bos_id: int, seed: int):
        self.name, self.reader, self.bos_id, self.seed = name, reader, bos_id, seed
        self.units = reader.units
        if not self.units:
            raise DataError(f"data source '{name}' has no documents (its files hold no row groups)")
        self.epoch = self.unit = self.doc = self.tok = 0
        self._order = (None, None)  # (epoch, unit order)
        self._loaded = None  # (unit id, tokens, doc starts, doc ends)
        self._perm = (None, None)  # ((epoch, unit id), document order)

    def __deepcopy__(self, memo):
        # the caches hold read-only arrays (a shard's memory map among them): share, never copy
        return copy.copy(self)

    # ------------------------------------------------------------ documents
    def _unit_order(self) -> list[int]:
        if self._order[0] != self.epoch:
            self._order = (self.epoch, shuffled(len(self.units), "units", self.seed, self.name, self.epoch))
        return self._order[1]

    def _load(self, uid: int):
        if self._loaded is None or self._loaded[0] != uid:
            self._loaded = (uid, *self.reader.load(uid))
        return self._loaded

    def _settle(self) -> np.ndarray:
        """Move the position onto an existing document (next unit / next epoch as needed) and
        return that document's tokens ``[BOS] + ids`` (a view: nothing is read yet)."""
        empty_units = 0
        while True:
            if self.unit >= len(self.units):
                self.epoch, self.unit, self.doc, self.tok = self.epoch + 1, 0, 0, 0
            uid = self._unit_order()[self.unit]
            _, flat, starts, ends = self._load(uid)
            n = len(starts)
            if self.doc < n:
                key = (self.epoch, uid)
                if self._perm[0] != key:
                    self._perm = (key, shuffled(n, "docs", self.seed, self.name, self.epoch, uid))
                j = self._perm[1][self.doc]
                return flat[starts[j]: ends[j]]
            empty_units = empty_units + 1 if n == 0 else 0
            if empty_units > len(self.units):
                raise DataError(f"data source '{self.name}' has no training documents (all are in the validation split or empty): lower data.val_fraction or add data")
            self.unit, self.doc, self.tok = self.unit + 1, 0, 0

    def next_row(self, length: int, out: np.ndarray | None) -> None:
        """Advance by one row of ``length`` tokens, writing it into ``out`` unless None."""
        filled = 0
        doc = self._settle()
        if self.tok > 0:  # a continued document: the row still starts with BOS
            if out is not None:
                out[0] = self.bos_id
            filled = 1
        while True:
            k = min(length - filled, len(doc) - self.tok)
            if out is not None:
                out[filled: filled + k] = doc[self.tok: self.tok + k]
            filled += k
            self.tok += k
            if self.tok == len(doc):
                self.doc, self.tok = self.doc + 1, 0
            if filled == length:
                return
            doc = self._settle()

    def position(self) -> dict:
        return {"name": self.name, "epoch": self.epoch, "unit": self.unit, "doc": self.doc, "tok": self.tok}


def _reader(src, tokenizer, val_fraction: float):
    sh = source_shards(src)
    if sh is None:
        return _TextUnits(source_files(src), tokenizer, val_fraction)
    check_shard_tokenizer(sh, tokenizer)
    return _ShardUnits(sh, val_fraction)


class TrainLoader:
    """Mixture of packed source streams; see the module docstring.

    ``TrainLoader(data_cfg, tokenizer, seq_len, seed=None, prefetch=None)``; ``seed`` defaults to
    ``data_cfg.mixture_seed`` and drives both the mixture draw and the per-epoch shuffles;
    ``prefetch`` defaults to ``data_cfg.prefetch``."""

    def __init__(self, data_cfg, tokenizer, seq_len: int, seed: int | None = None, prefetch: bool | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len = seq_len
        self.seed = int(data_cfg.mixture_seed if seed is None else seed)
        self.sources = resolve_sources(data_cfg)
        self.streams = [_SourceStream(s.name, _reader(s, tokenizer, data_cfg.val_fraction), tokenizer.bos_id, self.seed) for s in self.sources]
        self._cum = list(np.cumsum([s.weight for s in self.sources]))
        self.data_fingerprint = data_fingerprint(data_cfg)
        self.tokenizer_fingerprint = tokenizer.fingerprint
        self.prefetch = bool(getattr(data_cfg, "prefetch", True) if prefetch is None else prefetch)
        self._rows = 0  # global rows produced so far (the prefetched batch included) ...
        self._counts = [0] * len(self.sources)  # ... of which from each source
        self._handed = self._snapshot()  # the position after the batches handed out
        self._job = None  # (arguments, Job) of the batch being prepared
        self._digests: list[bytes] = []  # row digests handed out since the last batch_hash()

    # ------------------------------------------------------------ position
    @property
    def rows(self) -> int:
        """Global rows handed out so far."""
        return self._handed["rows"]

    @property
    def counts(self) -> list[int]:
        """... of which from each source."""
        return list(self._handed["counts"])

    def _snapshot(self) -> dict:
        return {"rows": self._rows, "counts": list(self._counts), "pos": [(st.epoch, st.unit, st.doc, st.tok) for st in self.streams]}

    def _restore(self, snap: dict) -> None:
        self._rows, self._counts = snap["rows"], list(snap["counts"])
        for st, pos in zip(self.streams, snap["pos"]):
            st.epoch, st.unit, st.doc, st.tok = pos

    def _settle_job(self) -> None:
        """Drop a prepared batch: wait for it and rewind to the handed-out position."""
        if self._job is not None:
            self._job[1].wait()
            self._job = None
            self._restore(self._handed)

    def close(self) -> None:
        """Stop preparing: wait for a batch in preparation and drop it (nothing runs after)."""
        self._settle_job()

    def __deepcopy__(self, memo):
        if self._job is not None:
            self._job[1].wait()  # the streams are not moving while they are copied
        new = copy.copy(self)
        new.streams = [copy.copy(st) for st in self.streams]
        new._job, new._digests, new._handed = None, list(self._digests), copy.deepcopy(self._handed)
        new._restore(new._handed)
        return new

    def source_of(self, i: int) -> int:
        """Index of the source global row ``i`` comes from (a pure function of seed and i)."""
        if len(self.sources) == 1:
            return 0
        u = _u64("mix", self.seed, i) / 2.0**64
        return min(bisect.bisect_right(self._cum, u), len(self.sources) - 1)

    # ------------------------------------------------------------ rows
    def _produce(self, global_rows: int, rank: int, world_size: int):
        """Advance by ``global_rows``; (this rank's rows, row digests if rank 0, position after)."""
        per = global_rows // world_size
        lo = rank * per
        length = self.seq_len + 1
        everything = rank == 0  # the logging rank hashes the whole global batch
        buf = np.empty((global_rows if everything else per, length), dtype=np.int64)
        for j in range(global_rows):
            s = self.source_of(self._rows)
            out = buf[j] if everything else (buf[j - lo] if lo <= j < lo + per else None)
            self.streams[s].next_row(length, out)
            self._rows += 1
            self._counts[s] += 1
        digests = [row_digest(r) for r in buf] if everything else None
        return (buf[lo:lo + per] if everything else buf), digests, self._snapshot()

    def next_batch(self, global_rows: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by ``global_rows`` global rows; return this rank's (x, y), each
        LongTensor[global_rows // world_size, seq_len]."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad rank {rank} for world size {world_size}")
        if global_rows < world_size or global_rows % world_size:
            raise DataError(f"global batch of {global_rows} rows does not split evenly over {world_size} ranks")
        key = (global_rows, rank, world_size)
        res = None
        if self._job is not None and self._job[0] == key:
            job, self._job = self._job[1], None
            try:
                res = job.result()
            except BaseException:
                self._restore(self._handed)
                raise
        self._settle_job()
        if res is None:
            res = self._produce(*key)
        own, digests, self._handed = res
        if digests is not None:
            self._digests.extend(digests)
        if self.prefetch:
            self._job = (key, Job(lambda: self._produce(*key)))
        t = torch.from_numpy(own)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def batch_hash(self) -> str | None:
        """``batch_hash`` of the rows handed out since the last call (None off rank 0)."""
        digests, self._digests = self._digests, []
        return batch_hash(digests) if digests else None

    def skip(self, rows: int) -> None:
        """Advance by ``rows`` global rows without materialising any (shards: no ids read)."""
        self._settle_job()
        length = self.seq_len + 1
        for _ in range(int(rows)):
            s = self.source_of(self._rows)
            self.streams[s].next_row(length, None)
            self._rows += 1
            self._counts[s] += 1
        self._handed = self._snapshot()

    def take(self, rows: int) -> tuple[np.ndarray, list[int], str]:
        """The next ``rows`` global rows whole: (ids [rows, seq_len + 1], source index of each,
        their ``batch_hash``); the rows of a step for ``poelm batch``."""
        self._settle_job()
        first = self._rows
        buf, digests, self._handed = self._produce(int(rows), 0, 1)
        return buf, [self.source_of(i) for i in range(first, first + int(rows))], batch_hash(digests)

    def proportions(self) -> dict[str, float]:
        """Realised fraction of rows drawn from each source so far (for logging)."""
        rows, counts = self.rows, self.counts
        return {s.name: (c / rows if rows else 0.0) for s, c in zip(self.sources, counts)}

    def state_dict(self) -> dict:
        """JSON-serialisable position after the batches handed out: identical on every rank."""
        pos = [dict(zip(("epoch", "unit", "doc", "tok"), p)) for p in self._handed["pos"]]
        return {"format": STATE_FORMAT, "seed": self.seed, "rows": self.rows,
                "data_fingerprint": self.data_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "sources": [{"name": s.name, **p, "rows": c} for s, p, c in zip(self.sources, pos, self.counts)]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the data, tokenizer and seed must be those it was saved with."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state has an unknown format {state.get('format') if isinstance(state, dict) else type(state).__name__}: it was not written by this poelm")
        if state["data_fingerprint"] != self.data_fingerprint:
            raise DataError("loader state was saved with different data (sources, weights, files or val_fraction): use the same data to resume, or start a new phase without the loader state")
        if state["tokenizer_fingerprint"] != self.tokenizer_fingerprint:
            raise DataError("loader state was saved with a different tokenizer: resume with the checkpoint's tokenizer")
        if int(state["seed"]) != self.seed:
            raise DataError(f"loader state was saved with data seed {state['seed']} but this loader uses {self.seed}: resume with the seed the run started with")
        names = [s["name"] for s in state["sources"]]
        if names != [s.name for s in self.sources]:
            raise DataError(f"loader state sources {names} differ from the configured {[s.name for s in self.sources]}")
        self._settle_job()
        self._handed = {"rows": int(state["rows"]), "counts": [int(p["rows"]) for p in state["sources"]],
                        "pos": [tuple(int(p[k]) for k in ("epoch", "unit", "doc", "tok")) for p in state["sources"]]}
        self._restore(self._handed)
        self._digests = []
