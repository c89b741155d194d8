"""Helpers more than one verb group uses."""

from __future__ import annotations

import argparse


def float_list(text):
    """``"1.5,2,0.5"`` -> ``[1.5, 2.0, 0.5]`` (WAND bounds on the command line)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_tracker_flags(p, measure: bool = False) -> None:
    """``--tracker`` (repeatable), ``--run-name``, ``--project``: live dashboards (poelm/track.py)."""
    p.add_argument("--tracker", action="append", default=[], choices=["wandb", "tensorboard", "trackio"],
                   help="log to this dashboard too (repeatable; replaces train.trackers); needs pip install \"poelm[track]\"")
    p.add_argument("--run-name", help="the tracker run's name (default: <out dir name>-<run id>)")
    p.add_argument("--project", help="the tracker project (default: poelm, or the resumed / base run's)")
    if measure:
        p.add_argument("--tracker-dir", help="where TensorBoard / W&B files of the measurement go (default: the run dir "
                       "the checkpoint records, else the current directory)")


def tracking(args) -> dict:
    """The trackers asked for, checked (one error line naming the extra, before any compute), and
    the run options: ``(names, {"project", "run_name"})``."""
    from poelm import track

    names = track.check(args.tracker)
    return names, {"project": args.project, "run_name": args.run_name}


def tracker_override(names) -> list[str]:
    """``--set`` form of ``--tracker``: it replaces the config's ``train.trackers``."""
    return [f"train.trackers={list(names)!r}".replace("'", '"')] if names else []
