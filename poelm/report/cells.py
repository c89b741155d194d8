"""Table cells of every report section: one home for "not measured", value [lo, hi] cells and
markdown tables (``sections``, ``tables``, ``answer``, ``cooldown``, ``averages``, ``benchmarks``,
``judge`` and the terminal summary read them from here)."""

from __future__ import annotations

from poelm.measure.record import NOT_MEASURED, figure

NM = NOT_MEASURED  # a missing measurement, in every table and sentence
NO_THRESHOLD = "cap met with no threshold"


def times(d):
    """A speedup format with ``d`` decimals: ``1.23x``."""
    return lambda v: f"{v:.{d}f}x"


def ci_cell(v, ci, fmt) -> str:
    """``value [lo, hi]`` (``value`` alone without an interval; ``NM`` without a value)."""
    if v is None:
        return NM
    return fmt(v) if ci is None else f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def cell(rec, key, fmt) -> str:
    """The figure at dotted ``key`` of a record (``record.figure``) as a ``ci_cell``."""
    return ci_cell(*figure(rec, key), fmt)


def esc(text) -> str:
    """Make free text safe inside one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]], keep: int = 2) -> str | None:
    """A markdown table. Columns after the first ``keep`` that are "not measured" in every row are
    left out (an old record, or a figure this trajectory never measured, would otherwise fill the
    report with empty columns); None when no such column is left: the caller drops the section."""
    cols = [i for i in range(len(header)) if i < keep or not rows or any(r[i] != NM for r in rows)]
    if len(header) > keep and len(cols) == keep and rows:
        return None
    lines = ["| " + " | ".join(header[i] for i in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[i] for i in cols) + " |" for r in rows]
    return "\n".join(lines)


def tokens(n) -> str:
    if n is None:
        return "? tokens"
    return f"{n / 1e6:.2f}M tokens" if n >= 1e6 else f"{n:,} tokens"
