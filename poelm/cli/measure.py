"""``poelm measure | eval``: every per-checkpoint metric of the card, and benchmark evals."""

from __future__ import annotations

from pathlib import Path

from poelm.cli.common import add_tracker_flags, tracking
from poelm.measure.options import CONFIDENCES, MeasureOptions

D = MeasureOptions()  # every default of `poelm measure` is the dataclass's


def measure_options(args) -> MeasureOptions:
    """The parsed flags as ``MeasureOptions`` (each field has a flag of its name; ``--probe none`` skips)."""
    kw = {f: getattr(args, f) for f in MeasureOptions.__dataclass_fields__ if hasattr(args, f)}
    if kw.get("probe_set") == "none":
        kw["probe_set"] = None
    return MeasureOptions(**kw, progress=not args.quiet)


# ----------------------------------------------------------------------------- measure
def _add_measure(sub):
    p = sub.add_parser("measure", help="measure checkpoints: BPB per stage/prefix, accuracy, alpha sweep, WAND bounds, routing, speculative, probe")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="checkpoint dir, run dir (newest save), exported folder, REPO, REPO@main, REPO@step-XXXXX or hf://org/name[@rev]")
    p.add_argument("--split-tokens", type=int, default=D.split_tokens, help="measurement slice: first N validation tokens (default %(default)s)")
    p.add_argument("--calib-tokens", type=int, default=D.calib_tokens, help="calibration slice right after it, for WAND bounds and routing tau (default %(default)s; 0 skips)")
    p.add_argument("--data", help="measure on this txt/jsonl/parquet corpus instead of the checkpoint's validation split; the record goes "
                                  "to --out only (never into the branch / checkpoint unless --write-branch); calibration is not written back")
    p.add_argument("--out", help="record file (one TARGET) or directory (several); writes ONLY there (the branch / checkpoint is left "
                                 "as it was); default: poelm_measure.json in the checkpoint / a commit on the branch")
    p.add_argument("--write-branch", action="store_true", help="with --data: replace the branch's / checkpoint's record with this one "
                                                               "(marked data_override in the record and the report)")
    p.add_argument("--against", metavar="REF", help="reference checkpoint: paired deltas with 95%% bootstrap intervals on the same slice")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available); bf16 autocast on CUDA")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="rows of seq_len per forward (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=D.seq_len, help="row length (default: the run's train.seq_len, else max_seq_len)")
    p.add_argument("--cap", type=float, default=D.cap, help="routing cap (default %(default)s)")
    p.add_argument("--routing-metric", default=D.routing_metric, choices=["agreement", "target", "nll", "target_regression"],
                   help="routing regression metric: agreement (default: routed positions where stage-0 top-1 != full-K top-1), "
                        "target (full K right, stage 0 wrong; old name target_regression) or nll")
    p.add_argument("--confidence", default=D.confidence, choices=list(CONFIDENCES), help="stage-0 confidence for routing")
    p.add_argument("--m", type=int, default=D.m, help="speculative draft length (default %(default)s)")
    p.add_argument("--probe", dest="probe_set", metavar="PROBE", default=D.probe_set, help="prompt set: card, embedded, a JSONL file, or none (default auto: embedded for embedded-corpus models, else card)")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens, help="greedy tokens per probe prompt (default %(default)s)")
    p.add_argument("--gen-prompts", type=int, default=D.gen_prompts, help="generation set: contexts cut from the measurement slice for acceptance, "
                                                               "agreement in generation and exit depths, with 95%% intervals over prompts (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=D.gen_tokens, help="generation set: greedy new tokens per context (default %(default)s)")
    p.add_argument("--gen-seed", type=int, default=D.gen_seed, help="generation set: seed of the context offsets (default %(default)s)")
    p.add_argument("--timing-prompts", type=int, default=D.timing_prompts, help="timed decoding: the first N prompts of the generation set (default %(default)s)")
    p.add_argument("--timing-tokens", type=int, default=D.timing_tokens, help="timed decoding: new tokens per prompt (default %(default)s)")
    p.add_argument("--timing-rounds", dest="timing_repeats", metavar="TIMING_ROUNDS", type=int, default=D.timing_repeats, help="timed decoding: interleaved rounds; speedup intervals resample rounds "
                                                                "and prompts (default %(default)s)")
    p.add_argument("--block-tokens", type=int, default=D.block_tokens, help="bootstrap block size in tokens (default %(default)s)")
    p.add_argument("--samples", type=int, default=D.samples, help="bootstrap resamples (default %(default)s)")
    p.add_argument("--seed", type=int, default=D.seed, help="bootstrap seed (default %(default)s)")
    p.add_argument("--no-write", action="store_true", help="write nothing into the trajectory / checkpoint (no record, no WAND bounds or "
                                                           "routing tau, no model cards); only --out FILE if given")
    p.add_argument("--slice", action="append", metavar="NAME=PATH", help="BPB and tokens/byte on the validation split of this corpus "
                   "(repeatable; e.g. --slice old=mix --slice new=code.jsonl; PATH 'mix' = the training mix of --against, else of the first TARGET); with --against, paired deltas per slice over documents and "
                   "the answer: gain on --new, retention on --old. Only these figures are measured; --out gets the JSON")
    p.add_argument("--new", metavar="NAME", help="with --slice: the new domain's slice (default: the last --slice)")
    p.add_argument("--old", metavar="NAME", help="with --slice: the old mix's slice (default: the first --slice; when no --slice "
                                                 "is PATH 'mix', an 'old' slice of the training mix's own validation split is added first)")
    p.add_argument("--slice-bytes", type=int, default=262_144, help="with --slice: UTF-8 bytes of documents per slice (default 262,144)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracker_flags(p, measure=True)
    return p


def _run_slices(args):
    import json

    from poelm.fsio import atomic_write_text
    from poelm.measure import domains
    from poelm.report.answer import domain_markdown

    slices = domains.parse_slices(args.slice)
    if domains.MIX not in slices.values():  # the old domain defaults to the training mix's own validation split
        slices = {("old" if "old" not in slices else "mix"): domains.MIX, **slices}
    names = list(slices)
    new, old = args.new or names[-1], args.old or names[0]
    for n in (new, old):
        if n not in slices:
            raise domains.PoelmError(f"--new/--old {n!r} names no --slice (have {', '.join(names)})")
    if args.slice_bytes < 1:
        raise domains.PoelmError(f"--slice-bytes must be positive, got {args.slice_bytes}")
    res = domains.measure_targets(args.targets, slices, args.against, args.slice_bytes, args.seq_len, args.device, args.samples, args.seed)
    md = domain_markdown(res, new, old)
    print(md)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2) + "\n")
        print(f"record: {args.out}")
    return 0


def _run_measure(args):

    from poelm.measure import run as measure

    if args.slice:
        return _run_slices(args)

    names, track_opts = tracking(args)
    track_opts["dir"] = args.tracker_dir

    opts = measure_options(args)
    many = len(args.targets) > 1
    for t in args.targets:
        out = args.out
        if out and many:
            out = str(Path(out) / (Path(t.replace("@", "_")).name + ".json"))
        rec = measure.measure_target(t, opts, data=args.data, out=out, against=args.against, device=args.device,
                                     write=not args.no_write, write_branch=args.write_branch)
        if rec is None:  # torchrun: a rank other than 0 (rank 0 prints and writes)
            continue
        from poelm.report.summary import format_summary

        print(format_summary(rec))
        print(f"  record: {rec['record_path'] or 'not written (--no-write)'}"
              + (f"; calibration: {', '.join(rec['calibration_written'])}" if rec["calibration_written"] else ""))
        if names:  # the card's metrics at the branch's step, in the run that saved it
            from poelm.measure.dashboard import log_measurement

            logged = log_measurement(rec, names, track_opts)
            print(f"  dashboards ({', '.join(names)}): {len(logged)} metrics at step {rec.get('step')}")
        if rec.get("branch") and rec.get("repo") and rec["record_written"]:
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
