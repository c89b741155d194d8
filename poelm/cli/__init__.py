"""``poelm <verb>``: the thin command-line front. Parses, resolves TARGETs, calls the library,
prints.

Every ``PoelmError`` becomes one line ``error: ...`` on stderr and exit code 2, with no traceback;
nothing already saved is touched because every writer in the library is atomic. The library never
imports this package.

Each verb has its own ``_add_<verb>`` (arguments) and ``_run_<verb>`` (call) pair, grouped by the
pipeline stage they drive: ``phases.py`` (train, continue, cooldown, plan, demo), ``decode.py``
(generate), ``trajectory.py`` (export, publish, branches, checkout, verify, report),
``measure.py`` (measure, eval), ``ops.py`` (doctor, selftest), ``data.py`` (tokenize, batch) and
``vocab.py`` (extend-vocab).
"""

from __future__ import annotations

import argparse
import os
import sys

from poelm.cli.decode import TextStream, format_stats  # noqa: F401  (public helpers)
from poelm.cli.compare import _add_average, _add_compare, _run_average, _run_compare
from poelm.cli.decode import _add_generate, _run_generate
from poelm.cli.measure import _add_eval, _add_measure, _run_eval, _run_measure
from poelm.cli.ops import _add_doctor, _add_selftest, _run_doctor, _run_selftest
from poelm.cli.phases import (_add_continue, _add_cooldown, _add_demo, _add_plan, _add_train, _run_continue, _run_cooldown,
                              _run_demo, _run_plan, _run_train)
from poelm.cli.trajectory import (_add_branches, _add_checkout, _add_export, _add_publish, _add_report, _add_verify,
                                  _run_branches, _run_checkout, _run_export, _run_publish, _run_report, _run_verify)
from poelm.cli.trajectory import _add_import, _run_import
from poelm.core.errors import PoelmError
from poelm.cli.data import _add_batch, _add_tokenize, _run_batch, _run_tokenize
from poelm.cli.vocab import _add_extend_vocab, _run_extend_vocab


# ----------------------------------------------------------------------------- registry
VERBS = [
    ("train", _add_train, _run_train),
    ("continue", _add_continue, _run_continue),
    ("extend-vocab", _add_extend_vocab, _run_extend_vocab),
    ("cooldown", _add_cooldown, _run_cooldown),
    ("demo", _add_demo, _run_demo),
    ("report", _add_report, _run_report),
    ("generate", _add_generate, _run_generate),
    ("export", _add_export, _run_export),
    ("publish", _add_publish, _run_publish),
    ("branches", _add_branches, _run_branches),
    ("checkout", _add_checkout, _run_checkout),
    ("verify", _add_verify, _run_verify),
    ("average", _add_average, _run_average),
    ("compare", _add_compare, _run_compare),
    ("measure", _add_measure, _run_measure),
    ("eval", _add_eval, _run_eval),
    ("plan", _add_plan, _run_plan),
    ("doctor", _add_doctor, _run_doctor),
    ("selftest", _add_selftest, _run_selftest),
    ("tokenize", _add_tokenize, _run_tokenize),
    ("batch", _add_batch, _run_batch),
    ("import", _add_import, _run_import),
]


class _Parser(argparse.ArgumentParser):
    """argparse with the house rule for bad input: one line ``error: ...`` on stderr, exit code 2.

    argparse's own ``error`` prints the whole usage block first; a mistyped flag then reads like a
    wall of text. Here the usage is one ``--help`` away, named in the line. Subparsers are built
    from this class too (``add_subparsers`` uses ``type(parser)``), so a bad flag of a verb points
    at that verb's help."""

    verb_hint: str | None = None  # set by main(): the verb in argv, for errors the top level raises

    def error(self, message: str):
        where = self.prog
        if where == "poelm" and self.verb_hint and message.startswith("unrecognized arguments"):
            where = f"poelm {self.verb_hint}"  # unknown flags of a verb are collected by the top level
        line = " ".join(str(message).split())  # one line whatever argparse composed
        self.exit(2, f"error: {line} (see {where} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poelm", description="Product-of-Experts per-stage-head language models")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, add, run in VERBS:
        p = add(sub)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser.verb_hint = next((a for a in argv if a in {v for v, _, _ in VERBS}), None)
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
        sys.stdout.flush()  # a reader that went away surfaces here, in the handler below, not at interpreter exit
        return int(rc or 0)
    except BrokenPipeError:  # before OSError, its base class: `poelm branches REPO | head -1` ends quietly
        # Python's recipe (docs.python.org/3/library/signal.html, "Note on SIGPIPE"): point stdout at
        # devnull so the final flush does not raise again. 141 = 128 + SIGPIPE, the status a shell
        # reports for `yes | head -1`: the writer was cut off, nothing went wrong.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except PoelmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions ...: one line, nothing half-written (atomic writers)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # under torchrun: a collective failed because a peer died or hung
        from poelm.train.runtime import peer_failure

        line = peer_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
