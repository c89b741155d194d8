"""``poelm doctor | selftest``: environment checks, fault injection and the bad-input suite."""

from __future__ import annotations


# ----------------------------------------------------------------------------- doctor / selftest
def _add_doctor(sub):
    p = sub.add_parser("doctor", help="check torch/device/bf16, git, write access and free disk for a config; say what to fix")
    p.add_argument("--config", default="embedded", help="TOML file or preset whose checkpoints are planned (default: embedded)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", default=".", help="where the run will write (default: .)")
    p.add_argument("--device", help="override train.device")
    return p


def _run_doctor(args):
    from poelm.ops import doctor

    return doctor.report(doctor.run_checks(args.config, args.overrides, args.workdir, args.device))


def _add_selftest(sub):
    p = sub.add_parser("selftest", help="fault injection (kill -9, trajectory) or the bad-input suite, with counts")
    p.add_argument("suite", choices=["faults", "inputs"], help="faults: kill -9 trials; inputs: bad inputs through the CLI")
    p.add_argument("--trials", type=int, default=20, help="faults: number of kill trials (default 20)")
    p.add_argument("--seed", type=int, default=0, help="faults: seed of the trial plan (default 0)")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed after)")
    return p


def _run_selftest(args):
    from poelm.ops import selftest

    keep = args.workdir is not None
    if args.suite == "faults":
        results = selftest.faults(args.trials, seed=args.seed, workdir=args.workdir, keep=keep)
    else:
        from poelm.ops import badinputs

        results = badinputs.bad_inputs(workdir=args.workdir, keep=keep)
    return 0 if all(r.ok for r in results) else 1
