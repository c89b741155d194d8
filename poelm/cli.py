"""``poelm <verb>``: the thin command-line front. Parses, calls the library, prints.

Every ``PoelmError`` becomes one line ``error: ...`` on stderr and exit code 2, with no traceback;
nothing already saved is touched because every writer in the library is atomic. The library never
imports this module.

Each verb has its own ``_add_<verb>`` (arguments) and ``_run_<verb>`` (call) pair below.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import PoelmError


# ----------------------------------------------------------------------------- train / continue
def _add_train(sub):
    p = sub.add_parser("train", help="train a PoE model (or resume a run)")
    p.add_argument("--config", default="embedded", help="TOML file or preset name under configs/ (default: embedded)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.depth=4")
    p.add_argument("--steps", type=int, help="override schedule.steps")
    p.add_argument("--save-every", type=int, help="override train.save_every")
    p.add_argument("--out", default="runs/embedded", help="run directory (checkpoints, log.jsonl)")
    p.add_argument("--resume", help="checkpoint directory to continue exactly from")
    p.add_argument("--publish", help="publish every save as a step branch of this repo (path or hf://org/name)")
    p.add_argument("--device", help="override train.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run_train(args):
    from . import train

    return train.main_train(args)


def _add_continue(sub):
    p = sub.add_parser("continue", help="start a continual (cyclic LR) phase from an annealed checkpoint")
    p.add_argument("--from", dest="source", required=True, help="checkpoint dir, or REPO@step-XXXXX branch")
    p.add_argument("--config", help="phase config (TOML or preset); default: the checkpoint's own config with the b2 schedule")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, help="phase length in steps")
    p.add_argument("--tokens", help="phase length as a token budget, e.g. 40B (steps = tokens / tokens_per_step)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--out", required=True, help="run directory for the new phase")
    p.add_argument("--publish", help="publish every save (the seed first) as step branches of this repo")
    p.add_argument("--allow-mismatch", action="store_true", help="allow a different architecture/tokenizer/data mix (not a continual phase then)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    return p


def _run_continue(args):
    from . import train

    return train.main_continue(args)


# ----------------------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default (minutes on a CPU)")
    p.add_argument("--workdir", default="poelm-demo", help="where everything goes (default ./poelm-demo)")
    p.add_argument("--config", default="embedded")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--base-steps", type=int, help="base phase length (default: the config's schedule.steps)")
    p.add_argument("--continual-steps", type=int, help="continual phase length (default: half the base phase)")
    p.add_argument("--save-every", type=int, help="continual save interval (default: 1/6 of the phase)")
    p.add_argument("--split-tokens", type=int, help="measurement slice (tokens)")
    p.add_argument("--calib-tokens", type=int, help="WAND/routing calibration slice (tokens)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run_demo(args):
    from . import demo

    demo.run_demo(args.workdir, args.config, args.base_steps, args.continual_steps, args.save_every,
                  args.split_tokens, args.calib_tokens, args.overrides, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------------------- registry
VERBS = [
    ("train", _add_train, _run_train),
    ("continue", _add_continue, _run_continue),
    ("demo", _add_demo, _run_demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poelm", description="Product-of-Experts per-stage-head language models")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, add, run in VERBS:
        p = add(sub)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
        return int(rc or 0)
    except PoelmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
