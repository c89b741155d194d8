"""``poelm average | compare``: a weight average of saves of one run; runs side by side."""

from __future__ import annotations

from pathlib import Path


# ----------------------------------------------------------------------------- average
def _add_average(sub):
    p = sub.add_parser("average", help="the mean of the weights of saves of one run (LAWA), as branch avg-XXXXX-N or a folder")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="saves to average: REPO@step-A REPO@step-B ..., checkpoint dirs or exported "
                   "folders; with --last N one TARGET: REPO (main), REPO@step-XXXXX, a run dir or one of its checkpoints")
    p.add_argument("--last", type=int, metavar="N", help="the N saves ending at TARGET (inclusive)")
    p.add_argument("--publish", metavar="REPO", help="publish as branch avg-XXXXX-N of REPO (which must hold every averaged step)")
    p.add_argument("--out", metavar="DIR", help="write the averaged model as a Hugging Face folder (new or an earlier export)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights of the result (default: the run's published dtype); "
                   "the mean itself is always accumulated in fp32")
    p.add_argument("--force", action="store_true", help="replace an existing avg-XXXXX-N branch")
    return p


def _average_sources(args) -> list[str]:
    """The TARGET texts to average (``--last N`` expanded; no weights read)."""
    from poelm import targets
    from poelm.trajectory import average

    if args.last is None:
        return list(args.targets)
    if len(args.targets) != 1:
        raise targets.TargetError("--last N takes one TARGET (the newest save to average)")
    text = args.targets[0]
    where, rev = targets.split(text)
    if rev is not None or targets._is_repo(Path(where)) or where.startswith(targets.HUB):
        repo, branch = targets.repository(text)
        branch = branch or targets.resolve_branch(repo, "main", text)
        return [f"{repo}@{b}" for b in average.last_branches(repo, branch, args.last)]
    return [str(p) for p in average.last_checkpoints(where, args.last)]


def _run_average(args):
    import tempfile

    from poelm import targets
    from poelm.core.errors import PoelmError
    from poelm.trajectory import average

    if not args.publish and not args.out:
        raise PoelmError("poelm average writes a branch (--publish REPO) or a folder (--out DIR): give one")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()) and not (Path(args.out) / "config.json").is_file():
        raise PoelmError(f"{args.out} exists and is not an earlier export; choose a new --out folder")
    texts = _average_sources(args)
    with tempfile.TemporaryDirectory(prefix="poelm-average-") as work:
        srcs = [targets.resolve(t, Path(work) / str(i)) for i, t in enumerate(texts)]  # every TARGET resolves first
        paths, labels = [s.path for s in srcs], [s.label for s in srcs]
        if args.publish:
            branch = average.publish_average(paths, args.publish, labels=labels, dtype=args.dtype, force=args.force)
            print(f"averaged {len(paths)} saves ({', '.join(labels)}) in fp32 -> {args.publish}@{branch}")
            from poelm.trajectory import publish

            seed = publish.step_branches(publish.open_repo(args.publish).refs())[0]
            print(f"measure it: poelm measure {args.publish}@{branch} --against {args.publish}@{seed}   (or the phase's seed branch)")
        if args.out:
            out = average.average(paths, args.out, labels=labels, dtype=args.dtype)
            print(f"averaged {len(paths)} saves ({', '.join(labels)}) in fp32 -> {out}")
    return 0


# ----------------------------------------------------------------------------- compare
def _add_compare(sub):
    p = sub.add_parser("compare", help="two or more runs side by side on one slice: BPB, the gap with paired 95%% intervals, its course, LR schedules")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="trajectory repos (every step branch), run dirs (every checkpoint), "
                   "REPO@step-XXXXX or a checkpoint (one save); the gap is the first minus each other")
    p.add_argument("--labels", help="comma-separated names of the runs, in order (default: the TARGETs)")
    p.add_argument("--by", default="step", choices=["step", "tokens"], help="align saves by step (default) or by tokens seen")
    p.add_argument("--out", default="compare", help="output directory for compare.md, compare.json, compare.png (default ./compare)")
    p.add_argument("--split-tokens", type=int, help="measurement slice (default: poelm measure's, 1,048,576, fitted to the split)")
    p.add_argument("--seq-len", type=int, help="row length (default: the smallest train.seq_len of the runs)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8, as poelm measure)")
    p.add_argument("--block-tokens", type=int, default=1024, help="bootstrap block size in tokens (default 1024)")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    return p


def _run_compare(args):
    from poelm.core.errors import PoelmError
    from poelm.measure import compare as cmp
    from poelm.report import compare as report

    if args.labels is None:  # the TARGETs name the runs; the same one twice names nothing apart
        twice = next((t for i, t in enumerate(args.targets) if t in args.targets[:i]), None)
        if twice is not None:
            raise PoelmError(f"TARGET {twice} is given twice: compare different runs, or name each with --labels (e.g. --labels A,B)")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else list(args.targets)
    if len(labels) != len(args.targets) or not all(labels) or len(set(labels)) != len(labels):
        raise PoelmError(f"--labels needs {len(args.targets)} distinct comma-separated names, one per TARGET, got {args.labels!r}")
    for name, v in (("--split-tokens", args.split_tokens), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                    ("--block-tokens", args.block_tokens), ("--samples", args.samples)):
        if v is not None and v <= 0:
            raise PoelmError(f"{name} must be positive, got {v}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PoelmError(f"--out {out} is a file; give a directory")
    runs = [cmp.load_run(t, lb) for t, lb in zip(args.targets, labels)]
    cmp.check_comparable(runs)
    keys = cmp.align(runs, args.by)
    print(f"compare: {len(keys)} aligned save(s) by {args.by} ({', '.join(f'{k:,}' for k in keys)}) x {len(runs)} runs, one slice")
    comp = cmp.measure(runs, keys, by=args.by, split_tokens=args.split_tokens, seq_len=args.seq_len, block_tokens=args.block_tokens,
                       batch_size=args.batch_size, device=args.device, log=print)
    result = report.build(comp, samples=args.samples, seed=args.seed)
    paths = report.write(result, out)
    for j in range(1, len(runs)):
        print(report.course(result, j))
    for p in paths.values():
        print(f"wrote {p}")
    return 0
