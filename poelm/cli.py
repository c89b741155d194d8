"""``poelm <verb>``: the thin command-line front. Parses, calls the library, prints.

Every ``PoelmError`` becomes one line ``error: ...`` on stderr and exit code 2, with no traceback;
nothing already saved is touched because every writer in the library is atomic. The library never
imports this module.

Each verb has its own ``_add_<verb>`` (arguments) and ``_run_<verb>`` (call) pair below.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys

from poelm.core.errors import PoelmError


# ----------------------------------------------------------------------------- train / continue
def _add_train(sub):
    p = sub.add_parser("train", help="train a PoE model (or resume a run)")
    p.add_argument("--config", default="embedded", help="TOML file or preset name under configs/ (default: embedded)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.depth=4")
    p.add_argument("--steps", type=int, help="override schedule.steps")
    p.add_argument("--save-every", type=int, help="override train.save_every")
    p.add_argument("--out", default="runs/embedded", help="run directory (checkpoints, log.jsonl)")
    p.add_argument("--resume", metavar="TARGET", help="checkpoint dir or run dir (its newest save) to continue exactly from")
    p.add_argument("--publish", help="publish every save as a step branch of this repo (path or hf://org/name)")
    p.add_argument("--publish-dtype", choices=["bf16", "fp16", "fp32"], help="weights of the published branches (default: bf16 for a bf16-autocast run, else fp32); the checkpoints keep fp32")
    p.add_argument("--device", help="override train.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    p.add_argument("--allow-mismatch", action="store_true", help="allow a different architecture/tokenizer/data mix (not a continual phase then)")
    p.add_argument("--cooldown-every", type=int, metavar="K", help="a cooldown probe at every K-th save after the seed (run between saves; see `poelm cooldown`)")
    p.add_argument("--cooldown-steps", type=int, metavar="N", help="steps of each probe (with --cooldown-every)")
    p.add_argument("--cooldown-shape", default="linear", help="probe decay shape: linear or 1-sqrt (default linear)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
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
    return p


def _run_cooldown(args):
    import tempfile

    from poelm import targets
    from poelm.train import cooldown as cd
    from poelm.trajectory import publish

    cd.check_args(args.steps, args.shape, args.to_lrm)  # before any IO
    with tempfile.TemporaryDirectory(prefix="poelm-cooldown-") as work:
        src = targets.resolve(args.target, work, want="model" if args.fresh_optimizer else "checkpoint", hint=cd.FRESH_HINT)
        ckpt = cd.load_source(src.path, args.fresh_optimizer)
        if args.device:
            ckpt.config.train.device = args.device
        cool = cd.plan(ckpt, args.steps, args.shape, args.to_lrm)
        if args.out:
            out = Path(args.out)
        elif src.kind == "checkpoint":
            out = cd.default_out(ckpt.path, ckpt.step, args.steps)
        else:
            out = Path("cooldowns") / cd.probe_name(ckpt.step, args.steps)
        cd.check_out(out)
        if args.publish:
            publish.check_cooldown_source(args.publish, ckpt.step)
        s = cd.cooldown(ckpt, out, args.steps, args.shape, args.to_lrm, publisher=_publisher(args.publish), progress=not args.quiet,
                        fresh_optimizer=args.fresh_optimizer, source_label=src.label)
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


def _publisher(repo, dtype=None):
    """The factory training calls on rank 0 (the trajectory room sits above training)."""
    if not repo:
        return None
    from functools import partial

    from poelm.trajectory.publish import Publisher

    return partial(Publisher, repo, dtype=dtype)


def _run_train(args):
    from poelm import config as config_mod
    from poelm import targets
    from poelm.train import checkpoint as ckpt_mod
    from poelm.core.errors import ConfigError
    from poelm.train.loop import train

    overrides = _apply_cli_overrides(args)
    if args.resume:
        src = targets.resolve(args.resume, want="checkpoint").path
        base = ckpt_mod.load(src, with_optim=False).config
        bad = [o for o in overrides if not o.startswith("train.")]
        if bad:
            raise ConfigError(f"--resume continues the run exactly; only train.* settings may change (got {bad[0]}); use 'poelm continue' for a new phase")
        cfg = config_mod.validate(config_mod.from_dict(config_mod.apply_overrides(base.to_dict(), overrides)))
        out = args.out if args.out != "runs/embedded" else str(Path(src).parent)
        summary = train(cfg, out, resume=src, publisher=_publisher(args.publish, args.publish_dtype), progress=not args.quiet)
    else:
        cfg = config_mod.load(args.config, overrides)
        summary = train(cfg, args.out, publisher=_publisher(args.publish, args.publish_dtype), progress=not args.quiet)
    _print_summary(summary)
    return 0


def _run_continue(args):
    import tempfile

    from poelm import config as config_mod
    from poelm import targets
    from poelm.train.loop import continue_phase

    phase_cfg = config_mod.load(args.config, []) if args.config else None
    tokens = config_mod.parse_tokens(args.tokens) if args.tokens else None
    ov = list(args.overrides or [])
    if args.save_every is not None:
        ov.append(f"train.save_every={args.save_every}")
    if args.device:
        ov.append(f'train.device="{args.device}"')
    prober = None
    if args.cooldown_every is not None or args.cooldown_steps is not None:
        from poelm.core.errors import ConfigError
        from poelm.train.cooldown import Prober

        if args.cooldown_every is None or args.cooldown_steps is None:
            raise ConfigError("--cooldown-every K and --cooldown-steps N go together")
        prober = Prober(args.cooldown_every, args.cooldown_steps, args.cooldown_shape)
    with tempfile.TemporaryDirectory(prefix="poelm-continue-") as work:
        src = targets.resolve(args.source, work)
        summary = continue_phase(src.path, args.out, phase_cfg, steps=args.steps, tokens_budget=tokens,
                                 publisher=_publisher(args.publish, args.publish_dtype), progress=not args.quiet,
                                 allow_mismatch=args.allow_mismatch, overrides=ov, source_label=src.label, after_save=prober)
    _print_summary(summary)
    if prober is not None and prober.probes:
        spent = sum(p["elapsed_s"] for p in prober.probes)
        print(f"cooldown probes: {len(prober.probes)} x {prober.steps} steps, {spent:.1f}s of {summary['elapsed_s']:.1f}s "
              f"({100 * spent / max(summary['elapsed_s'], 1e-9):.1f}% of the phase's wall time)")
    return 0


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
    p.add_argument("--quiet", action="store_true")
    return p


def _run_demo(args):
    from poelm import demo

    demo.run_demo(args.workdir, args.config, args.base_steps, args.continual_steps, args.save_every,
                  args.split_tokens, args.calib_tokens, args.overrides, progress=not args.quiet, overwrite=args.overwrite)
    return 0


# ----------------------------------------------------------------------------- report
def _add_report(sub):
    p = sub.add_parser("report", help="trajectory report: the card's tables, verdict and plots from measurement records")
    p.add_argument("source", metavar="REPO", help="trajectory repo (path or hf://org/name), a directory of records, or record files")
    p.add_argument("more", nargs="*", metavar="FILE", help="further record files (when REPO is a record file)")
    p.add_argument("--out", default="report", help="output directory for report.md and the PNGs (default ./report)")
    return p


def _run_report(args):
    from poelm import targets
    from poelm.report import tables as report

    source = args.source
    if not args.more and "@" in source and not Path(source).exists():
        source = targets.repository(source)[0]  # REPO@rev: the report is of the whole trajectory
    records = report.load_records([source, *args.more] if args.more else source)
    paths = report.write_report(records, args.out)
    from poelm.report import cooldown as cooldown_report

    for line in report.verdict(records) + cooldown_report.verdict_lines(records):
        print(line)
    for name, path in paths.items():
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- generate
def _float_list(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- generate helpers
class TextStream:
    """``on_token`` callback that writes decoded text as it is produced (one row).

    Byte-level BPE tokens can end inside a UTF-8 character, so the whole continuation is decoded
    each time and only a suffix that does not end in U+FFFD (an incomplete character) is written."""

    def __init__(self, tokenizer, write, skip=()):
        self.tokenizer, self.write, self.skip = tokenizer, write, set(skip)
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        if token in self.skip:  # a stop token ends the text; it is not part of it
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.shown :])
        self.shown = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)


def mode_kwargs(mode_text: str, meta: dict | None, bounds=None, tau=None) -> dict:
    """``Engine.generate`` keywords for a CLI mode string; wand bounds default to the checkpoint's
    ``poe_wand_p99_bounds_per_stage_head`` and are required."""
    from poelm.infer.engine import BOUNDS_KEY, parse_mode, wand_bounds_from

    kw = parse_mode(mode_text)
    if kw["mode"] == "wand":
        kw["bounds"] = bounds if bounds is not None else wand_bounds_from(meta)
        if kw["bounds"] is None:
            raise PoelmError(f"wand needs {BOUNDS_KEY}, which this checkpoint lacks: calibrate it with `poelm measure` or pass --bounds")
    if kw["mode"] == "route":
        routing = (meta or {}).get("poe_routing") or {}
        kw["tau"] = tau if tau is not None else routing.get("tau")  # calibrated by `poelm measure`
        kw["confidence"] = routing.get("confidence") or "maxprob"  # threshold the kind that was calibrated
    return kw


def format_stats(stats: dict) -> str:
    """One line of the per-call statistics."""
    parts = [f"{stats['new_tokens']} tokens in {stats['elapsed_s']:.2f}s ({stats['tokens_per_s']:.1f} tok/s)",
             f"mean depth {stats['mean_depth']:.2f}"]
    if stats.get("acceptance") is not None:
        parts.append(f"acceptance {stats['acceptance']:.3f}, mean accepted {stats['mean_accepted']:.2f} over {stats['rounds']} rounds")
    return ", ".join(parts)


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text: full, stage=K, prefix=K, wand, route or speculative")
    p.add_argument("target", metavar="TARGET", help="checkpoint dir, run dir (newest save), exported folder, REPO, REPO@main, REPO@step-XXXXX or hf://org/name[@rev]")
    p.add_argument("--prompt", required=True, help="prompt text (BOS is prepended)")
    p.add_argument("--mode", default="full", help="full | stage=K | prefix=K | wand | route | speculative (default full)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--m", type=int, default=4, help="speculative draft length (default 4)")
    p.add_argument("--tau", type=float, help="route: stage-0 max-probability threshold")
    p.add_argument("--bounds", type=_float_list, help="wand: K-1 comma-separated bounds (default: the checkpoint's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at BOS (the next document)")
    p.add_argument("--device", default="cpu")
    return p


def _run_generate(args):
    import tempfile

    from poelm import targets
    from poelm.infer import engine as infer
    from poelm.train import checkpoint

    with tempfile.TemporaryDirectory(prefix="poelm-generate-") as work:
        model, tok, meta = checkpoint.load_model(targets.resolve(args.target, work).path, device=args.device)
    kw = mode_kwargs(args.mode, meta, bounds=args.bounds, tau=args.tau)
    stop = () if args.no_stop else (tok.bos_id,)
    out = TextStream(tok, lambda s: (sys.stdout.write(s), sys.stdout.flush()), skip=stop)
    res = infer.Engine(model).generate(tok.encode_doc(args.prompt), args.max_new_tokens, m=args.m, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop, on_token=out, **kw)
    out.flush()
    print()
    print(format_stats(res.stats), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export / publish / branches / checkout / verify
def _add_export(sub):
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (trust_remote_code)")
    p.add_argument("ckpt", metavar="TARGET", help="checkpoint dir, run dir (its newest checkpoint), exported folder, REPO[@step-XXXXX|@main]")
    p.add_argument("out", metavar="OUT", help="output folder (new, empty, or an earlier export)")
    p.add_argument("--bounds", type=_float_list, help="K-1 comma-separated WAND bounds (default: the checkpoint's calibration)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights dtype (default: bf16 for a bf16-autocast run, else the stored dtype)")
    return p


def _run_export(args):
    import tempfile

    from poelm import targets
    from poelm.trajectory import export

    with tempfile.TemporaryDirectory(prefix="poelm-export-") as work:
        src = targets.resolve(args.ckpt, work)
        print(f"exported {export.export(src.path, args.out, bounds=args.bounds, dtype=args.dtype)}")
    return 0


def _add_publish(sub):
    p = sub.add_parser("publish", help="publish a checkpoint as branch step-XXXXX of a trajectory repo")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint dir")
    p.add_argument("repo", metavar="REPO", help="local path (git repo, created if absent) or hf://org/name")
    p.add_argument("--force", action="store_true", help="replace the branch if it exists")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights dtype of the branch (default: bf16 for a bf16-autocast run, else fp32)")
    return p


def _run_publish(args):
    from poelm.trajectory import publish

    print(f"published {publish.publish(args.ckpt, args.repo, force=args.force, dtype=args.dtype)} to {args.repo}")
    return 0


def _add_branches(sub):
    p = sub.add_parser("branches", help="list the trajectory of a repo (step, tokens, lrm, BPB)")
    p.add_argument("repo", metavar="REPO")
    return p


def _run_branches(args):
    from poelm import targets
    from poelm.trajectory import publish

    rows = publish.list_branches(targets.repository(args.repo)[0], cooldowns=True)
    fmt = "{:<14} {:>9} {:>14} {:>8} {:<10} {:>9} {}"
    print(fmt.format("branch", "step", "tokens", "lrm", "phase", "bpb", ""))
    for r in rows:
        lrm = "-" if r["lrm"] is None else f"{r['lrm']:.4f}"
        bpb = "-" if r["bpb"] is None else f"{r['bpb']:.6f}"
        print(fmt.format(r["branch"], r["step"], "-" if r["tokens"] is None else r["tokens"], lrm, r["phase"] or "-", bpb, "<- main" if r["main"] else ""))
    return 0


def _add_checkout(sub):
    p = sub.add_parser("checkout", help="materialise one branch of a trajectory repo as a folder")
    p.add_argument("repo", metavar="TARGET", help="REPO@step-XXXXX, REPO@main or REPO (= main); or REPO BRANCH DIR")
    p.add_argument("rest", nargs="+", metavar="[BRANCH] DIR", help="new or empty folder (BRANCH: step-XXXXX or main)")
    return p


def _run_checkout(args):
    from poelm import targets
    from poelm.trajectory import publish

    if len(args.rest) > 2:
        raise targets.TargetError("checkout takes TARGET DIR or REPO BRANCH DIR")
    text = f"{args.repo}@{args.rest[0]}" if len(args.rest) == 2 else args.repo
    repo, branch = targets.repository(text)
    branch = branch or targets.resolve_branch(repo, "main", text)
    print(f"checked out {branch} to {publish.checkout(repo, branch, args.rest[-1])}")
    return 0


def _add_verify(sub):
    p = sub.add_parser("verify", help="audit a trajectory repo: manifests, distinct weights, tokens increasing, main newest")
    p.add_argument("repo", metavar="REPO")
    return p


def _run_verify(args):
    from poelm.trajectory import publish, verify

    problems = verify.verify(args.repo)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"ok: {len(publish.list_branches(args.repo))} branches of {args.repo} verified")
    return 0


# ----------------------------------------------------------------------------- measure
def _add_measure(sub):
    p = sub.add_parser("measure", help="measure checkpoints: BPB per stage/prefix, accuracy, alpha sweep, WAND bounds, routing, speculative, probe")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="checkpoint dir, run dir (newest save), exported folder, REPO, REPO@main, REPO@step-XXXXX or hf://org/name[@rev]")
    p.add_argument("--split-tokens", type=int, default=1_048_576, help="measurement slice: first N validation tokens (default 1,048,576)")
    p.add_argument("--calib-tokens", type=int, default=131_072, help="calibration slice right after it, for WAND bounds and routing tau (default 131,072; 0 skips)")
    p.add_argument("--data", help="measure on this txt/jsonl/parquet corpus instead of the checkpoint's validation split (calibration is then not written back)")
    p.add_argument("--out", help="record file (one TARGET) or directory (several); default: poelm_measure.json in the checkpoint / the branch")
    p.add_argument("--against", metavar="REF", help="reference checkpoint: paired deltas with 95%% bootstrap intervals on the same slice")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available); bf16 autocast on CUDA")
    p.add_argument("--batch-size", type=int, default=8, help="rows of seq_len per forward (default 8)")
    p.add_argument("--seq-len", type=int, help="row length (default: the run's train.seq_len, else max_seq_len)")
    p.add_argument("--cap", type=float, default=0.02, help="routing cap (default 0.020)")
    p.add_argument("--routing-metric", default="agreement", choices=["agreement", "target", "nll", "target_regression"],
                   help="routing regression metric: agreement (default: routed positions where stage-0 top-1 != full-K top-1), "
                        "target (full K right, stage 0 wrong; old name target_regression) or nll")
    p.add_argument("--confidence", default="maxprob", choices=["maxprob", "margin"], help="stage-0 confidence for routing")
    p.add_argument("--m", type=int, default=4, help="speculative draft length (default 4)")
    p.add_argument("--probe", default="auto", help="prompt set: card, embedded, a JSONL file, or none (default: embedded for embedded-corpus models, else card)")
    p.add_argument("--max-new-tokens", type=int, default=60, help="greedy tokens per probe prompt (default 60)")
    p.add_argument("--block-tokens", type=int, default=1024, help="bootstrap block size in tokens (default 1024)")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-write", action="store_true", help="do not write the WAND bounds / routing tau back to the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run_measure(args):
    from pathlib import Path

    from poelm.measure import run as measure

    many = len(args.targets) > 1
    for t in args.targets:
        out = args.out
        if out and many:
            out = str(Path(out) / (Path(t.replace("@", "_")).name + ".json"))
        rec = measure.measure_target(
            t, data=args.data, out=out, against=args.against, device=args.device, write_calibration=False if args.no_write else None,
            probe_set=None if args.probe == "none" else args.probe, split_tokens=args.split_tokens, calib_tokens=args.calib_tokens,
            batch_size=args.batch_size, seq_len=args.seq_len, cap=args.cap, routing_metric=args.routing_metric,
            confidence=args.confidence, m=args.m, max_new_tokens=args.max_new_tokens, block_tokens=args.block_tokens,
            samples=args.samples, seed=args.seed, progress=not args.quiet)
        if rec is None:  # torchrun: a rank other than 0 (rank 0 prints and writes)
            continue
        from poelm.report.tables import format_summary

        print(format_summary(rec))
        print(f"  record: {rec['record_path']}" + (f"; calibration: {', '.join(rec['calibration_written'])}" if rec["calibration_written"] else ""))
        if rec.get("branch") and rec.get("repo") and not args.out:
            from poelm.report import tables as report

            updated = report.update_cards(rec["repo"], [rec["branch"]])
            print(f"  model cards refreshed: {', '.join(updated)}")
    return 0


# ----------------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="lm-evaluation-harness benchmarks on a branch or every branch; scores go into each measurement record")
    p.add_argument("target", metavar="TARGET", help="REPO (every step branch), REPO@step-XXXXX, REPO@main, checkpoint dir, run dir or exported folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. poelm_devils_cloze (offline, shipped) or hellaswag")
    p.add_argument("--stages", default="full", help="full (default), k (stage k alone) or prefix=K' (stages 0..K'-1)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward (default 8)")
    p.add_argument("--limit", type=int, help="the first N documents of each task")
    p.add_argument("--out", metavar="FILE", help="write the records to this JSON file instead of the branches / folders")
    p.add_argument("--include-path", action="append", metavar="DIR", help="folder of your own lm-eval task YAMLs (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's own log and progress bars")
    return p


def _run_eval(args):
    from poelm.measure import evals

    tasks = [t.strip() for t in args.tasks.split(",")]
    records = evals.run_eval(args.target, tasks, stages=args.stages, batch_size=args.batch_size, limit=args.limit, out=args.out,
                             device=args.device, include_path=args.include_path, quiet=not args.verbose)
    if args.out:
        print(f"records: {args.out}")
        return 0
    done = [r for r in records if r["repo"]]
    if done:  # the branches' model cards show the new scores (the report's benchmarks section)
        from poelm.report import tables as report

        print(f"model cards refreshed: {', '.join(report.update_cards(done[0]['repo'], [r['branch'] for r in done]))}")
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


# ----------------------------------------------------------------------------- registry
VERBS = [
    ("train", _add_train, _run_train),
    ("continue", _add_continue, _run_continue),
    ("cooldown", _add_cooldown, _run_cooldown),
    ("demo", _add_demo, _run_demo),
    ("report", _add_report, _run_report),
    ("generate", _add_generate, _run_generate),
    ("export", _add_export, _run_export),
    ("publish", _add_publish, _run_publish),
    ("branches", _add_branches, _run_branches),
    ("checkout", _add_checkout, _run_checkout),
    ("verify", _add_verify, _run_verify),
    ("measure", _add_measure, _run_measure),
    ("eval", _add_eval, _run_eval),
    ("plan", _add_plan, _run_plan),
    ("doctor", _add_doctor, _run_doctor),
    ("selftest", _add_selftest, _run_selftest),
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
        return int(rc or 0)
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
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
