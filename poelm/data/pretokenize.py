"""``poelm tokenize``: tokenise a corpus once into shard folders (format: ``shards.py``).

Why: the text loader tokenises every unit when it reaches it, on every rank, in every phase (at
the card's batch, 786,432 tokens a step, every one of 12 ranks encodes the whole global batch).
Shards move that work to one parallel pass; the loader then only slices memory-mapped ids.

What: a data path (file, directory, glob, ``embedded``) gives one shard folder ``OUT``; a config
with ``[[data.sources]]`` gives ``OUT/<source name>/`` per source. Every source file becomes one
shard holding *all* its non-empty documents (both splits: the split key is stored), tokenised as
``Tokenizer.encode_batch`` does for the text loader, so the rows the loader packs from shards
are the rows it packs from text (tested). Files are tokenised by ``workers`` threads
(``encode_batch`` runs in Rust without the GIL and is itself parallel).

Resumable: a shard is written whole (``fsio.atomic_dir``) and records its source file's sha256
and the tokenizer's fingerprint; a rerun keeps every shard whose file and tokenizer are
unchanged and redoes the rest; ``index.json`` is written last.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from poelm.core.errors import DataError
from poelm.data import corpus, shards
from poelm.fsio import atomic_write_json, recover_swaps, sha256_file, sweep_temps


def plan(data_cfg, out) -> list[tuple[corpus.Source, Path, list[Path]]]:
    """(source, shard folder, text files) for every source; validates paths before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file: give a directory for the shards")
    if out.is_dir() and any(out.iterdir()) and not _ours(out):
        raise DataError(f"output {out} is a non-empty directory that is not a shard folder: give a new or empty directory")
    sources = corpus.resolve_sources(data_cfg)
    mixture = bool(getattr(data_cfg, "sources", None))
    jobs = []
    for s in sources:
        if shards.is_shard_dir(s.path):
            raise DataError(f"{corpus._what(s)} {s.path} already holds shards: give the text it was made from")
        jobs.append((s, out / s.name if mixture else out, corpus.source_files(s)))
    return jobs


def _ours(out: Path) -> bool:
    """An earlier (maybe killed) ``poelm tokenize`` wrote here: resume it."""
    return shards.is_shard_dir(out) or any(shards.is_shard_dir(p) for p in out.iterdir() if p.is_dir())


def _units(f: Path):
    for u in range(corpus.unit_count(f)):
        texts = corpus.read_unit(f, u)
        yield texts, [corpus.doc_hash(t) for t in texts]


def tokenize(data_cfg, out, tokenizer, workers: int = 1, log=None) -> list[dict]:
    """Write the shard folder(s) of ``data_cfg`` under ``out``; returns each folder's index."""
    jobs = plan(data_cfg, out)
    dtype = shards.token_dtype(tokenizer.vocab_size)
    fp = tokenizer.fingerprint
    tasks = []
    for src, folder, files in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        recover_swaps(folder)
        sweep_temps(folder, "shard-")
        root = os.path.commonpath([str(f.parent) for f in files])
        for i, f in enumerate(files):
            tasks.append((folder / shards.shard_name(i), f, os.path.relpath(f, root)))
    lock = threading.Lock()
    done = [0, 0]  # written, kept

    def one(task):
        d, f, rel = task
        meta = {"file": rel, "bytes": f.stat().st_size, "sha256": sha256_file(f), "tokenizer_fingerprint": fp, "dtype": dtype.name}
        old = shards.read_shard_meta(d)
        if old is not None and all(old.get(k) == v for k, v in meta.items()):
            with lock:
                done[1] += 1
            return old
        rec = shards.write_shard(d, _units(f), tokenizer.encode_batch, tokenizer.bos_id, dtype, meta)
        with lock:
            done[0] += 1
            if log:
                log(f"{d}: {rec['docs']:,} documents, {rec['tokens']:,} tokens ({done[0] + done[1]}/{len(tasks)} shards)")
        return rec

    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        recs = list(pool.map(one, tasks))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure: finished shards stay
        raise
    pool.shutdown()
    indexes, at = [], 0
    for src, folder, files in jobs:
        mine = recs[at:at + len(files)]
        at += len(files)
        idx = {"format": shards.FORMAT, "version": shards.VERSION, "name": src.name, "tokenizer_fingerprint": fp,
               "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "dtype": dtype.name,
               "split": "blake2b-64", "txt_doc_chars": corpus.TXT_DOC_CHARS, "listing": corpus.file_listing(files),
               "shards": [{"dir": shards.shard_name(i), **r} for i, r in enumerate(mine)],
               "docs": sum(r["docs"] for r in mine), "tokens": sum(r["tokens"] for r in mine)}
        tokenizer.save(folder)
        atomic_write_json(folder / shards.INDEX, idx)
        indexes.append(idx)
    if len(jobs) > 1 or jobs[0][1] != Path(out):
        tokenizer.save(out)  # beside the source folders too: the one a run on them copies
    if log:
        log(f"{done[0]} shards written, {done[1]} kept from an earlier run")
    return indexes


def sources_toml(data_cfg, out) -> str:
    """The ``[data]`` lines that point a config at the shards of ``out``."""
    out = Path(out).resolve()
    srcs = getattr(data_cfg, "sources", None) or []
    lines = ["[data]", f"val_fraction = {data_cfg.val_fraction}", f"mixture_seed = {data_cfg.mixture_seed}"]
    if not srcs:
        return "\n".join(lines[:1] + [f'path = "{out}"'] + lines[1:]) + "\n"
    for s, raw in zip(corpus.resolve_sources(data_cfg), srcs):
        w = raw.get("weight", 1.0) if isinstance(raw, dict) else raw.weight
        lines += ["", "[[data.sources]]", f'name = "{s.name}"', f'path = "{out / s.name}"', f"weight = {w}"]
    return "\n".join(lines) + "\n"
