"""``poelm tokenize | batch``: the verbs about the training data itself."""

from __future__ import annotations

import sys


# ----------------------------------------------------------------------------- tokenize
def _add_tokenize(sub):
    p = sub.add_parser("tokenize", help="tokenise a corpus once into memory-mapped shards the loader reads (data.path = OUT)")
    p.add_argument("data", metavar="DATA", help="a data path (file, directory, glob or 'embedded') or a config .toml whose [data] it tokenises ([[data.sources]]: one folder per source)")
    p.add_argument("out", metavar="OUT", help="shard folder to write (a mixture: OUT/<source name>/); a rerun finishes a killed one")
    p.add_argument("--tokenizer", metavar="TARGET", help="tokenizer.json, or a run / checkpoint / exported folder holding one (default: train it as `poelm train` would for this data)")
    p.add_argument("--workers", type=int, default=2, help="files tokenised at once (default 2)")
    return p


def _data_config(text: str):
    """(config, is_config): a .toml config as is, or the embedded preset with data.path = DATA
    (what ``poelm train --set data.path=DATA`` would train on)."""
    from poelm import config as config_mod

    if text.endswith(".toml"):
        return config_mod.load(text)
    cfg = config_mod.load("embedded")
    cfg.data.path, cfg.data.sources = text, []
    return cfg


def _run_tokenize(args):
    from poelm.core.errors import ConfigError
    from poelm.data import corpus, pretokenize
    from poelm.data.tokenizer import Tokenizer, train_tokenizer

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    cfg = _data_config(args.data)
    pretokenize.plan(cfg.data, args.out)  # every path checked before any work
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        print(f"training a {cfg.model.vocab_size}-token BPE on the training split (pass --tokenizer to reuse a run's)", file=sys.stderr)
        tok = train_tokenizer(corpus.tokenizer_texts(cfg.data), cfg.model.vocab_size)
    idx = pretokenize.tokenize(cfg.data, args.out, tok, workers=args.workers, log=lambda m: print(m, file=sys.stderr))
    print(f"{sum(i['tokens'] for i in idx):,} tokens in {sum(len(i['shards']) for i in idx)} shards ({idx[0]['dtype']}), tokenizer {tok.fingerprint[:12]}")
    print(f"use them with these [data] lines (copy {args.out}/tokenizer.json into a new run's --out to skip fitting the BPE again):\n"
          + pretokenize.sources_toml(cfg.data, args.out))
    return 0


# ----------------------------------------------------------------------------- batch
def _add_batch(sub):
    p = sub.add_parser("batch", help="the exact rows of global step N of a run (ids, source, text), re-derived and checked against its log")
    p.add_argument("target", metavar="TARGET", help="a run directory (log.jsonl + step-XXXXX checkpoints) or one of its checkpoints")
    p.add_argument("--step", type=int, required=True, help="N: the step of the training log (the N-th optimizer update, 1-based)")
    p.add_argument("--rank", type=int, help="only the rows rank R took (at the world size the run had at step N)")
    p.add_argument("--decode", action="store_true", help="add each row's decoded text")
    p.add_argument("--out", metavar="FILE", help="write the JSONL there (atomically) instead of stdout")
    return p


def _read_log(run):
    import json

    from poelm.core.errors import DataError

    path = run / "log.jsonl"
    if not path.is_file():
        raise DataError(f"{run} has no log.jsonl: give the directory of the run that trained (or one of its checkpoints)")
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line a crash cut short
            continue
    return [r for r in recs if isinstance(r, dict)]


def _checkpoints(run):
    from poelm.train.checkpoint import STEP_RE

    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := STEP_RE.match(p.name)) and (p / "meta.json").is_file() and (p / "config.json").is_file()]
    return sorted(found)


def _run_batch(args):
    import json
    from pathlib import Path

    from poelm import config as config_mod
    from poelm.core.errors import DataError
    from poelm.data import batches
    from poelm.data.tokenizer import Tokenizer
    from poelm.fsio import atomic_write_text
    from poelm.train.checkpoint import read_json

    run = Path(args.target)
    if (run / "meta.json").is_file() and not (run / "log.jsonl").is_file():
        run = run.parent  # a checkpoint of the run
    if not run.is_dir():
        raise DataError(f"run not found: {args.target} (give a run directory)")
    recs = _read_log(run)
    reached = [r["step"] for r in recs if r.get("kind") in ("train", "batch") and isinstance(r.get("step"), int)]
    n = args.step
    if not reached or not min(reached) <= n <= max(reached):
        span = f"steps {min(reached)}..{max(reached)}" if reached else "no step"
        raise DataError(f"{run} did not train step {n} (its log has {span}): give a step it reached")
    ckpts = _checkpoints(run)
    if not ckpts:
        raise DataError(f"{run} has no checkpoint: its config and loader position are needed to re-derive a batch")
    before = [(s, p) for s, p in ckpts if s <= n - 1]
    s, ref = before[-1] if before else ckpts[0]
    cfg = config_mod.from_saved(read_json(ref / "config.json", "checkpoint config"))
    meta = read_json(ref / "meta.json", "checkpoint meta")
    state = meta.get("loader_state")
    if not state:
        raise DataError(f"checkpoint {ref} holds no loader position: the batches of {run} cannot be re-derived")
    per_step = (cfg.train.tokens_per_step or int(meta.get("tokens_per_step", 0))) // cfg.seq_len
    layout = [r for r in recs if r.get("kind") == "dist" and isinstance(r.get("step"), int) and r["step"] <= n]
    world = layout[-1]["world_size"] if layout else 1
    dbs = layout[-1]["device_batch_size"] if layout else cfg.train.device_batch_size
    if args.rank is not None and not 0 <= args.rank < world:
        raise DataError(f"--rank {args.rank}: step {n} ran on {world} rank(s) (0..{world - 1})")
    if before:
        rows_before = int(state["rows"]) + (n - 1 - s) * per_step
    else:  # the stream from its start: only a base phase that began at step 0 consumed it from row 0
        base = "continued_from" not in meta and "cooldown" not in meta and int(state["rows"]) == s * per_step
        if not base:
            raise DataError(f"{run} keeps no checkpoint at or before step {n - 1} and did not start at step 0: "
                            f"the loader position of step {n} is unknown (its earliest checkpoint is step {s})")
        rows_before = (n - 1) * per_step
    tok = Tokenizer.load(ref)
    batches.check_same_data(cfg.data, tok, state, str(run))
    ids, names, h = batches.step_rows(cfg.data, tok, cfg.seq_len, int(state["seed"]),
                                        state if before else None, rows_before, per_step)
    logged = next((r.get("hash") for r in reversed(recs) if r.get("kind") == "batch" and r.get("step") == n), None)
    if logged is not None and logged != h:
        raise DataError(f"step {n}'s re-derived batch hash {h} differs from the logged {logged}: the data or tokenizer changed "
                        f"in a way the fingerprints do not see (same file sizes); its batch cannot be shown")
    owner = {}
    for r in range(world):
        for i in batches.rank_rows(per_step, world, dbs, r):
            owner[i] = r
    order = batches.rank_rows(per_step, world, dbs, args.rank) if args.rank is not None else range(per_step)
    head = {"run": str(run), "step": n, "hash": h, "logged_hash": logged, "rows": per_step, "first_row": rows_before,
            "seq_len": cfg.seq_len, "world_size": world, "device_batch_size": dbs, "rank": args.rank,
            "note": "ids are seq_len + 1 tokens: the model reads ids[:-1] and predicts ids[1:]"}
    lines = [json.dumps(head)]
    for i in order:
        row = {"row": rows_before + i, "step_row": i, "rank": owner[i], "source": names[i], "ids": ids[i].tolist()}
        if args.decode:
            row["text"] = tok.decode(row["ids"])
        lines.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
        print(f"step {n}: {len(lines) - 1} rows, hash {h}{' (matches the log)' if logged else ''} -> {args.out}")
    else:
        sys.stdout.write(text)
    return 0
