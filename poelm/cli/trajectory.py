"""``poelm export | publish | branches | checkout | verify | report``: a trajectory's branches and its report."""

from __future__ import annotations

import sys
from pathlib import Path


from poelm.cli.common import float_list as _float_list

# ----------------------------------------------------------------------------- export / publish / branches / checkout / verify
def _add_export(sub):
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (trust_remote_code)")
    p.add_argument("ckpt", metavar="TARGET", help="checkpoint dir, run dir (its newest checkpoint), exported folder, REPO[@step-XXXXX|@main]")
    p.add_argument("out", metavar="OUT", help="output folder (new, empty, or an earlier export)")
    p.add_argument("--bounds", type=_float_list, help="K-1 comma-separated WAND bounds (default: the checkpoint's calibration)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights dtype (default: bf16 for a bf16-autocast run, else the stored dtype)")
    p.add_argument("--format", choices=["hf", "nanochat"], default="hf", help="hf: a Hugging Face folder (default); nanochat: the reference's "
                   "model_XXXXXX.pt + meta_XXXXXX.json + optim_XXXXXX_rank0.pt, for nanochat's own scripts")
    return p


def _run_export(args):
    import tempfile

    from poelm import targets
    from poelm.trajectory import export

    if args.format == "nanochat":
        from poelm.core.errors import ConfigError
        from poelm.trajectory import nanochat

        if args.bounds is not None or args.dtype is not None:
            raise ConfigError("--bounds and --dtype are for --format hf; a nanochat export keeps each tensor's own dtype")
        src = targets.resolve(args.ckpt, want="checkpoint")
        res = nanochat.export_nanochat(src.path, args.out)
        print(f"exported step {res['step']} to {res['dir']}: {', '.join(res['files'])}")
        return 0
    with tempfile.TemporaryDirectory(prefix="poelm-export-") as work:
        src = targets.resolve(args.ckpt, work)
        print(f"exported {export.export(src.path, args.out, bounds=args.bounds, dtype=args.dtype)}")
    return 0


def _add_import(sub):
    p = sub.add_parser("import", help="import a checkpoint of the reference implementation (nanochat) as a poelm run")
    p.add_argument("format", choices=["nanochat"], help="nanochat: a folder of model_XXXXXX.pt, meta_XXXXXX.json, optim_XXXXXX_rank*.pt")
    p.add_argument("dir", metavar="DIR", help="the checkpoint folder (e.g. base_checkpoints/d32)")
    p.add_argument("out", metavar="OUT", help="new run directory; the import is OUT/step-XXXXX")
    p.add_argument("--step", type=int, help="which saved step (default: the newest)")
    p.add_argument("--tokenizer", metavar="PATH", help="the run's tokenizer as a Hugging Face tokenizer.json (default: DIR/tokenizer.json or "
                   "../tokenizer/tokenizer.json); nanochat's tokenizer.pkl is never unpickled")
    p.add_argument("--stage-layers", metavar="N,N,...", help="blocks per stage, e.g. 16,6,5,5 (default: the checkpoint's poe_every)")
    p.add_argument("--config", metavar="PRESET", help="take [data], [optim], [schedule], [train] from this config (e.g. cognica-3b); "
                   "default: the run's own settings from its meta")
    return p


def _run_import(args):
    from poelm.core.errors import ConfigError
    from poelm.trajectory import nanochat

    layers = None
    if args.stage_layers is not None:
        try:
            layers = [int(x) for x in args.stage_layers.split(",")]
        except ValueError:
            raise ConfigError(f"--stage-layers {args.stage_layers!r}: give comma-separated block counts, e.g. 16,6,5,5") from None
    res = nanochat.import_nanochat(args.dir, args.out, step=args.step, tokenizer=args.tokenizer, stage_layers=layers, preset=args.config)
    if res["preset_differs"]:
        print(f"note: --config {args.config} differs from the checkpoint in model.{', model.'.join(res['preset_differs'])}; the checkpoint's "
              "architecture is kept (continue with --set model.KEY=VALUE to match it)")
    if res["weights_only"]:
        print(f"weights-only import: {args.dir} has no optimizer shards for step {res['step']}; "
              f"continue from it with --fresh-optimizer (recorded in the manifest)")
    else:
        print(f"optimizer state gathered from {res['world_size']} rank shard(s)")
    print(f"imported step {res['step']} ({res['tensors']} tensors, {res['source_bytes'] / 1e6:.1f} MB) to {res['path']}")
    return 0


def _add_publish(sub):
    p = sub.add_parser("publish", help="publish a checkpoint as branch step-XXXXX of a trajectory repo")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint dir")
    p.add_argument("repo", metavar="REPO", help="local path (git repo, created if absent) or hf://org/name")
    p.add_argument("--force", action="store_true", help="replace the branch if it exists")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights dtype of the branch (default: bf16 for a bf16-autocast run, else fp32)")
    p.add_argument("--with-optimizer", action="store_true", default=None, help=WITH_OPTIMIZER_HELP)
    return p


WITH_OPTIMIZER_HELP = ("also publish the training state (optimizer state shards, loader position, RNG) in the branch's train_state/ folder, "
                       "so `poelm continue --from REPO@step-XXXXX` / `train --resume` continue it exactly; once a repository's main carries "
                       "it, later publishes do too")


def _run_publish(args):
    from poelm.trajectory import publish

    branch = publish.publish(args.ckpt, args.repo, force=args.force, dtype=args.dtype, with_optimizer=args.with_optimizer)
    print(f"published {branch} to {args.repo}")
    return 0


def _add_branches(sub):
    p = sub.add_parser("branches", help="list the trajectory of a repo (step, tokens, lrm, BPB)")
    p.add_argument("repo", metavar="REPO")
    return p


def _run_branches(args):
    from poelm import targets
    from poelm.trajectory import publish

    rows = publish.list_branches(targets.repository(args.repo)[0], cooldowns=True)
    fmt = "{:<14} {:>9} {:>14} {:>8} {:<10} {:>9} {:<6} {:<30} {}"
    print(fmt.format("branch", "step", "tokens", "lrm", "phase", "bpb", "state", "tokens per source", ""))
    for r in rows:
        lrm = "-" if r["lrm"] is None else f"{r['lrm']:.4f}"
        bpb = "-" if r["bpb"] is None else f"{r['bpb']:.6f}"
        per = ", ".join(f"{n} {t}" for n, t in (r.get("tokens_by_source") or {}).items()) or "-"
        state = "optim" if r.get("with_state") else "-"  # published --with-optimizer: continuable exactly
        print(fmt.format(r["branch"], r["step"], "-" if r["tokens"] is None else r["tokens"], lrm, r["phase"] or "-", bpb, state, per,
                         "<- main" if r["main"] else ""))
    return 0


def _add_checkout(sub):
    p = sub.add_parser("checkout", help="materialise one branch of a trajectory repo as a folder")
    p.add_argument("repo", metavar="TARGET", help="REPO@step-XXXXX, REPO@main or REPO (= main); or REPO BRANCH DIR")
    p.add_argument("rest", nargs="+", metavar="[BRANCH] DIR", help="new or empty folder (BRANCH: step-XXXXX or main)")
    p.add_argument("--with-optimizer", action="store_true", help="also the branch's train_state/ folder (left out by default: the model loads without it)")
    return p


def _run_checkout(args):
    from poelm import targets
    from poelm.trajectory import publish

    if len(args.rest) > 2:
        raise targets.TargetError("checkout takes TARGET DIR or REPO BRANCH DIR")
    text = f"{args.repo}@{args.rest[0]}" if len(args.rest) == 2 else args.repo
    repo, branch = targets.repository(text)
    branch = branch or targets.resolve_branch(repo, "main", text)
    print(f"checked out {branch} to {publish.checkout(repo, branch, args.rest[-1], with_state=args.with_optimizer)}")
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
    from poelm.report import averages as averages_report
    from poelm.report import cooldown as cooldown_report

    for line in report.verdict(records) + cooldown_report.verdict_lines(records) + averages_report.verdict_lines(records):
        print(line)
    for name, path in paths.items():
        print(f"wrote {path}")
    return 0
