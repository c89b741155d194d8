"""``poelm train | continue | cooldown | plan | demo``: the verbs that run or plan training."""

from __future__ import annotations

import os
from pathlib import Path

from poelm.cli.common import add_tracker_flags, tracker_override, tracking
from poelm.cli.trajectory import WITH_OPTIMIZER_HELP


# ----------------------------------------------------------------------------- train / continue
def _add_train(sub):
    p = sub.add_parser("train", help="train a PoE model (or resume a run)")
    p.add_argument("--config", default="embedded", help="TOML file or preset name under configs/ (default: embedded)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.depth=4")
    p.add_argument("--steps", type=int, help="override schedule.steps")
    p.add_argument("--save-every", type=int, help="override train.save_every")
    p.add_argument("--out", default="runs/embedded", help="run directory (checkpoints, log.jsonl)")
    p.add_argument("--resume", metavar="TARGET", help="checkpoint dir, run dir (its newest save) or REPO@step-XXXXX published --with-optimizer, "
                   "to continue exactly from (a branch's run goes to --out)")
    p.add_argument("--publish", help="publish every save as a step branch of this repo (path or hf://org/name)")
    p.add_argument("--publish-dtype", choices=["bf16", "fp16", "fp32"], help="weights of the published branches (default: bf16 for a bf16-autocast run, else fp32); the checkpoints keep fp32")
    p.add_argument("--with-optimizer", action="store_true", default=None, help=WITH_OPTIMIZER_HELP)
    p.add_argument("--device", help="override train.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracker_flags(p)
    return p


def _add_continue(sub):
    p = sub.add_parser("continue", help="start a continual (cyclic LR) phase from an annealed checkpoint")
    p.add_argument("--from", dest="source", required=True, metavar="TARGET", help="checkpoint dir, run dir (newest save), exported folder, REPO, REPO@main, REPO@step-XXXXX or hf://org/name[@rev]")
    p.add_argument("--config", help="phase config (TOML or preset); default: the checkpoint's own config with the b2 schedule")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, help="phase length in steps")
    p.add_argument("--tokens", help="phase length as a token budget, e.g. 40B (steps = tokens / tokens_per_step)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--out", required=True, help="run directory for the new phase")
    p.add_argument("--publish", help="publish every save (the seed first) as step branches of this repo")
    p.add_argument("--publish-dtype", choices=["bf16", "fp16", "fp32"], help="weights of the published branches (default: bf16 for a bf16-autocast run, else fp32)")
    p.add_argument("--with-optimizer", action="store_true", default=None, help=WITH_OPTIMIZER_HELP)
    p.add_argument("--allow-mismatch", action="store_true", help="allow a different architecture/tokenizer/data mix (not a continual phase then)")
    p.add_argument("--fresh-optimizer", action="store_true", help="start AdamW/Muon from zero state (needed for a source without optimizer "
                   "state, e.g. a weights-only import; recorded in the saves' meta)")
    p.add_argument("--add-data", metavar="PATH", help="domain-adaptive continue: train on this txt/jsonl/parquet corpus (source 'added') "
                   "mixed with the old mix at the --replay share; recorded in every save's meta (added_data)")
    p.add_argument("--replay", type=float, metavar="R", help="with --add-data: the old mix's share of the new mixture, in [0, 1) (default 0.25)")
    p.add_argument("--cooldown-every", type=int, metavar="K", help="a cooldown probe at every K-th save after the seed (run between saves; see `poelm cooldown`)")
    p.add_argument("--cooldown-steps", type=int, metavar="N", help="steps of each probe (with --cooldown-every)")
    p.add_argument("--cooldown-shape", default="linear", help="probe decay shape: linear or 1-sqrt (default linear)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    add_tracker_flags(p)
    return p


def _add_cooldown(sub):
    p = sub.add_parser("cooldown", help="cooldown probe: decay the LR from a checkpoint over N steps, save (\"what would BPB be if we annealed here?\")")
    p.add_argument("target", metavar="TARGET", help="checkpoint dir or run dir (newest save); with --fresh-optimizer also an exported folder, REPO@step-XXXXX, REPO@main")
    p.add_argument("--steps", type=int, required=True, help="N: cooldown length in steps")
    p.add_argument("--shape", default="linear", help="linear or 1-sqrt (Hägele et al. 2024; default linear)")
    p.add_argument("--to-lrm", type=float, default=0.0, help="LR multiplier at the end (default 0; at most the checkpoint's current lrm)")
    p.add_argument("--out", help="directory of the probe (default: <run dir>/cooldowns/cooldown-XXXXX-N, or ./cooldowns/... for a branch)")
    p.add_argument("--publish", metavar="REPO", help="publish it as branch cooldown-XXXXX-N of REPO (which must hold step-XXXXX)")
    p.add_argument("--fresh-optimizer", action="store_true", help="allow a TARGET without optimizer state / loader position: fresh AdamW/Muon state, "
                   "loader position from the token count (recorded in the manifest)")
    p.add_argument("--device", help="override train.device")
    p.add_argument("--quiet", action="store_true")
    add_tracker_flags(p)
    return p


def _run_cooldown(args):
    import tempfile

    from poelm import targets
    from poelm.train import cooldown as cd
    from poelm.trajectory import publish

    cd.check_args(args.steps, args.shape, args.to_lrm)  # before any IO
    names, opts = tracking(args)
    with tempfile.TemporaryDirectory(prefix="poelm-cooldown-") as work:
        src = targets.resolve(args.target, work, want="model" if args.fresh_optimizer else "checkpoint", hint=cd.FRESH_HINT)
        ckpt = cd.load_source(src.path, args.fresh_optimizer)
        if args.device:
            ckpt.config.train.device = args.device
        if names:
            ckpt.config.train.trackers = names
        cool = cd.plan(ckpt, args.steps, args.shape, args.to_lrm)
        if args.out:
            out = Path(args.out)
        elif src.kind == "checkpoint" and src.repo is None:  # a rebuilt branch checkpoint lives in a temp dir
            out = cd.default_out(ckpt.path, ckpt.step, args.steps)
        else:
            out = Path("cooldowns") / cd.probe_name(ckpt.step, args.steps)
        cd.check_out(out)
        if args.publish:
            publish.check_cooldown_source(args.publish, ckpt.step)
        s = cd.cooldown(ckpt, out, args.steps, args.shape, args.to_lrm, publisher=_publisher(args.publish), progress=not args.quiet,
                        fresh_optimizer=args.fresh_optimizer, source_label=src.label, tracking=opts)
    vb = (s.get("val_bpb") or {}).get("full")
    print(f"cooldown: step {cool.start_step} -> {cool.end_step} ({cool.steps} steps, {cool.shape}, lrm {cool.from_lrm:g} -> {cool.to_lrm:g}) "
          f"in {s['elapsed_s']:.1f}s" + (f", training-log val BPB {vb:.4f}" if vb is not None else ""))
    print(f"checkpoint: {s['ckpt']}")
    for b in s["branches"]:
        print(f"published {b} to {args.publish} (measure it: poelm measure {args.publish}@{b})")
    return 0


def _apply_cli_overrides(args) -> list[str]:
    ov = list(args.overrides or [])
    if getattr(args, "steps", None) is not None:
        ov.append(f"schedule.steps={args.steps}")
    if getattr(args, "save_every", None) is not None:
        ov.append(f"train.save_every={args.save_every}")
    if getattr(args, "device", None):
        ov.append(f'train.device="{args.device}"')
    return ov


def _publisher(repo, dtype=None, with_optimizer=None):
    """The factory training calls on rank 0 (the trajectory room sits above training)."""
    if not repo:
        return None
    from functools import partial

    from poelm.trajectory.publish import Publisher

    return partial(Publisher, repo, dtype=dtype, with_optimizer=with_optimizer)


def _run_train(args):
    from poelm import config as config_mod
    from poelm import targets
    from poelm.train import checkpoint as ckpt_mod
    from poelm.core.errors import ConfigError
    from poelm.train.loop import train

    names, opts = tracking(args)
    overrides = _apply_cli_overrides(args) + tracker_override(names)
    publisher = _publisher(args.publish, args.publish_dtype, args.with_optimizer)
    if args.resume:
        import tempfile

        bad = [o for o in overrides if not o.startswith("train.")]
        if bad:
            raise ConfigError(f"--resume continues the run exactly; only train.* settings may change (got {bad[0]}); use 'poelm continue' for a new phase")
        with tempfile.TemporaryDirectory(prefix="poelm-resume-") as work:  # a branch's state is rebuilt here
            target = targets.resolve(args.resume, work, want="checkpoint")
            src = target.path
            base = ckpt_mod.load(src, with_optim=False).config
            cfg = config_mod.validate(config_mod.from_dict(config_mod.apply_overrides(base.to_dict(), overrides)))
            out = args.out if args.out != "runs/embedded" or target.repo else str(Path(src).parent)
            summary = train(cfg, out, resume=src, publisher=publisher, progress=not args.quiet, tracking=opts)
    else:
        cfg = config_mod.load(args.config, overrides)
        summary = train(cfg, args.out, publisher=publisher, progress=not args.quiet, tracking=opts)
    _print_summary(summary)
    return 0


def _run_continue(args):
    import tempfile

    from poelm import config as config_mod
    from poelm import targets
    from poelm.train.loop import continue_phase

    from poelm.core.errors import ConfigError
    from poelm.train.continual import check_replay

    if args.replay is not None and args.add_data is None:
        raise ConfigError("--replay goes with --add-data PATH (the share of the old mix next to the new data)")
    replay = check_replay(0.25 if args.replay is None else args.replay) if args.add_data else 0.0
    names, opts = tracking(args)
    phase_cfg = config_mod.load(args.config, []) if args.config else None
    tokens = config_mod.parse_tokens(args.tokens) if args.tokens else None
    ov = list(args.overrides or [])
    if args.save_every is not None:
        ov.append(f"train.save_every={args.save_every}")
    if args.device:
        ov.append(f'train.device="{args.device}"')
    ov += tracker_override(names)
    prober = None
    if args.cooldown_every is not None or args.cooldown_steps is not None:
        from poelm.train.cooldown import Prober

        if args.cooldown_every is None or args.cooldown_steps is None:
            raise ConfigError("--cooldown-every K and --cooldown-steps N go together")
        prober = Prober(args.cooldown_every, args.cooldown_steps, args.cooldown_shape)
    with tempfile.TemporaryDirectory(prefix="poelm-continue-") as work:
        # Without --fresh-optimizer the source must carry optimizer state and loader position: a
        # checkpoint, or a branch published --with-optimizer (rebuilt into one under ``work``).
        src = targets.resolve(args.source, work, want="model" if args.fresh_optimizer else "checkpoint", hint=CONTINUE_HINT)
        summary = continue_phase(src.path, args.out, phase_cfg, steps=args.steps, tokens_budget=tokens,
                                 publisher=_publisher(args.publish, args.publish_dtype, args.with_optimizer), progress=not args.quiet,
                                 allow_mismatch=args.allow_mismatch, overrides=ov, source_label=src.label, after_save=prober,
                                 fresh_optimizer=args.fresh_optimizer, tracking=opts, add_data=args.add_data, replay=replay)
    _print_summary(summary)
    if prober is not None and prober.probes:
        spent = sum(p["elapsed_s"] for p in prober.probes)
        print(f"cooldown probes: {len(prober.probes)} x {prober.steps} steps, {spent:.1f}s of {summary['elapsed_s']:.1f}s "
              f"({100 * spent / max(summary['elapsed_s'], 1e-9):.1f}% of the phase's wall time)")
    return 0


CONTINUE_HINT = ("pass --fresh-optimizer to start AdamW/Muon from zero state on its weights, or continue from the run's checkpoint dir "
                 "(publish with --with-optimizer to make a branch continuable exactly)")


def _print_summary(s: dict):
    if int(os.environ.get("RANK", 0)) != 0:
        return
    vb = s.get("val_bpb") or {}
    full = vb.get("full")
    print(f"done: step {s['step']}, loss {s['loss']:.4f}, val BPB {full:.4f}" if full is not None else f"done: step {s['step']}")
    print(f"checkpoints: {s['out']}")


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
    p.add_argument("--overwrite", action="store_true", help="delete an earlier demo in --workdir first")
    p.add_argument("--domain", choices=["python"], help="instead: domain-adaptive continue on the Python stdlib's own sources, with and without "
                   "an extended vocabulary, replay 0 and 0.25, measured on old and new slices (default --workdir poelm-demo-python)")
    p.add_argument("--new-tokens", type=int, default=256, help="with --domain: new tokens of the extended vocabulary (default 256)")
    p.add_argument("--files", type=int, default=80, help="with --domain: stdlib files in the new corpus (default 80, sorted path order)")
    p.add_argument("--quiet", action="store_true")
    add_tracker_flags(p)
    return p


def _run_demo(args):
    if args.domain == "python":
        from poelm.demo_python import run_python_demo

        wd = args.workdir if args.workdir != "poelm-demo" else "poelm-demo-python"
        run_python_demo(wd, args.base_steps or 120, args.continual_steps or 40, args.save_every or 20, args.new_tokens, args.files,
                        overrides=args.overrides, progress=not args.quiet, overwrite=args.overwrite)
        return 0
    from poelm import demo

    names, opts = tracking(args)
    demo.run_demo(args.workdir, args.config, args.base_steps, args.continual_steps, args.save_every,
                  args.split_tokens, args.calib_tokens, args.overrides, progress=not args.quiet, overwrite=args.overwrite,
                  trackers=names, tracking=opts)
    return 0


# ----------------------------------------------------------------------------- plan
def _add_plan(sub):
    p = sub.add_parser("plan", help="memory per rank and time of a training run, from its config alone (nothing allocated)")
    p.add_argument("--config", default="embedded", help="TOML file or preset name under configs/ (default: embedded)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 (default: h100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation in (0, 1] (default: 0.4)")
    return p


def _run_plan(args):
    from poelm.train.plan import run_plan

    print(run_plan(args.config, args.world, args.gpu, args.mfu, args.overrides))
    return 0
