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
            print(f"measure it: poelm measure {args.publish}@{branch} --against {args.publish}@<seed step branch>")
        if args.out:
            out = average.average(paths, args.out, labels=labels, dtype=args.dtype)
            print(f"averaged {len(paths)} saves ({', '.join(labels)}) in fp32 -> {out}")
    return 0
