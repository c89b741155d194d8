"""``poelm extend-vocab``: a trained checkpoint with its tokenizer extended for new data."""

from __future__ import annotations

import sys


def _add_extend_vocab(sub):
    p = sub.add_parser("extend-vocab", help="extend a checkpoint's tokenizer (old ids kept) and grow every per-token table for the new tokens")
    p.add_argument("target", metavar="TARGET", help="a training checkpoint: checkpoint dir or run dir (its newest save)")
    p.add_argument("out", metavar="OUT", help="new run directory: OUT/step-XXXXX is the extended checkpoint (continue from it with `poelm continue --from OUT`)")
    p.add_argument("--from", dest="corpus", metavar="CORPUS", help="txt/jsonl/parquet corpus of the new domain: continued BPE on its training split")
    p.add_argument("--new-tokens", type=int, metavar="N", help="merges to learn on CORPUS (fewer if the corpus supports fewer)")
    p.add_argument("--tokenizer", metavar="NEW.json", help="instead of --from: a tokenizer.json whose vocabulary and merges extend the old ones")
    p.add_argument("--max-chars", type=int, help="characters of CORPUS read for the BPE (default: the run's data.tokenizer_train_chars)")
    return p


def _run_extend_vocab(args):
    import tempfile

    from poelm import targets
    from poelm.train.vocab import check_out, extend_vocab

    check_out(args.out)
    with tempfile.TemporaryDirectory(prefix="poelm-extend-") as work:
        src = targets.resolve(args.target, work, want="checkpoint")
        s = extend_vocab(src.path, args.out, corpus_path=args.corpus, new_tokens=args.new_tokens, tokenizer_path=args.tokenizer,
                         max_chars=args.max_chars, log=lambda m: print(m, file=sys.stderr))
    print(f"vocabulary {s['from_vocab']} -> {s['to_vocab']}; new rows = mean of their old-token pieces, e.g. "
          + ", ".join(f"{t!r} = mean{tuple(ps)}" for t, ps in s["examples"][:3]))
    print(f"checkpoint: {s['checkpoint']} (WAND bounds are recalibrated by the first `poelm measure`)")
    return 0
