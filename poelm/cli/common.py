"""Helpers more than one verb group uses."""

from __future__ import annotations

import argparse


def float_list(text):
    """``"1.5,2,0.5"`` -> ``[1.5, 2.0, 0.5]`` (WAND bounds on the command line)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
