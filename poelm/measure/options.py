"""What ``poelm measure`` is asked to do: ``MeasureOptions`` (every knob of one measurement, with
its default spelled once; the CLI builds one) and ``WritePolicy`` (where the record goes).

``measure(model, tokenizer, meta, opts)`` and ``measure_target(target, opts, ...)`` take them
(``poelm/measure/run.py``); keywords with the fields' names still work and build the options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from poelm.core.errors import PoelmError  # no torch here: `poelm --help` builds the flags from these defaults

CONFIDENCES = ("maxprob", "margin")


@dataclass(frozen=True)
class MeasureOptions:
    """One measurement's knobs (the module docstring of ``run.py`` says what each slice is).

    ``probe_set``: ``card``, ``embedded``, a JSONL path, ``auto`` (``embedded`` for a model trained
    on the embedded corpus alone, else ``card``) or None to skip the probe and every generation
    figure. ``gen_*``: the generation prompt set cut from the measurement slice (``genset``);
    ``timing_*``: the timing protocol over its first prompts (``timing``). ``routing_metric``:
    ``agreement``, ``target`` (old name ``target_regression``) or ``nll`` (``calibrate``)."""

    split_tokens: int = 1_048_576  # the card's --split-tokens
    calib_tokens: int = 131_072  # the card's WAND calibration slice; 0 skips calibration
    batch_size: int = 8
    seq_len: int | None = None  # None: the run's train.seq_len, else max_seq_len
    cap: float = 0.02
    routing_metric: str = "agreement"
    confidence: str = "maxprob"
    m: int = 4  # speculative draft length
    probe_set: str | None = "auto"
    max_new_tokens: int = 60
    block_tokens: int = 1024
    samples: int = 1000  # bootstrap resamples (the home of bootstrap.DEFAULT_SAMPLES)
    level: float = 0.95  # interval level (bootstrap.DEFAULT_LEVEL reads it)
    seed: int = 0
    dtype: str = "auto"
    progress: bool = True
    timing_repeats: int = 3  # interleaved timing rounds (timing.DEFAULT_REPEATS)
    timing_prompts: int = 8
    timing_tokens: int = 16
    gen_prompts: int = 32  # the generation set (genset.DEFAULT_*)
    gen_tokens: int = 32
    gen_seed: int = 0
    gen_context: int = 64

    @classmethod
    def of(cls, opts: "MeasureOptions | None" = None, **kw) -> "MeasureOptions":
        """``opts`` with the keywords replaced (a keyword that is no field: TypeError, as a call's)."""
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown measure option(s): {', '.join(unknown)}")
        return dataclasses.replace(opts or cls(), **kw)

    def replace(self, **kw) -> "MeasureOptions":
        return dataclasses.replace(self, **kw)

    def checked(self, max_seq_len: int) -> "MeasureOptions":
        """PoelmError on a bad value (before any work); the routing metric under its canonical name."""
        from poelm.measure.metrics import RoutingHistogram

        if RoutingHistogram.ALIASES.get(self.routing_metric, self.routing_metric) not in RoutingHistogram.METRICS:
            raise PoelmError(f"unknown routing metric {self.routing_metric!r}: use one of {', '.join(RoutingHistogram.METRICS)}")
        if self.confidence not in CONFIDENCES:
            raise PoelmError(f"unknown confidence {self.confidence!r}: use maxprob or margin")
        for name in ("split_tokens", "block_tokens", "batch_size", "gen_prompts", "gen_tokens", "gen_context",
                     "timing_prompts", "timing_tokens"):
            if int(getattr(self, name)) <= 0:
                raise PoelmError(f"{name} must be positive, got {getattr(self, name)}")
        if int(self.calib_tokens) < 0:
            raise PoelmError(f"calib_tokens must be >= 0, got {self.calib_tokens}")
        if int(self.gen_tokens) + 3 > max_seq_len:
            raise PoelmError(f"gen_tokens {self.gen_tokens} leaves no room for a context under max_seq_len {max_seq_len}: "
                             f"use at most {max_seq_len - 3}")
        return self.replace(routing_metric=RoutingHistogram.canonical(self.routing_metric))

    def probe_for(self, meta: dict) -> str | None:
        """``probe_set`` with ``auto`` resolved from the checkpoint's data config."""
        if self.probe_set != "auto":
            return self.probe_set
        dcfg = (meta.get("config") or {}).get("data") or {}
        return "embedded" if dcfg.get("path") == "embedded" and not dcfg.get("sources") else "card"


@dataclass(frozen=True)
class WritePolicy:
    """Where a measurement's record goes, from the flags ``--out``, ``--no-write``, ``--data``,
    ``--write-branch`` (``--against`` never changes it: the deltas ride in the record).

    A measurement never overwrites what it was told to leave alone:

    ==================  ===========  =========  ===============  =================  ====================
    --out FILE          --no-write   --data     --write-branch   record goes to     calibration written
    ==================  ===========  =========  ===============  =================  ====================
    -                   -            -          -                the target         yes
    FILE                -            -          -                FILE only          no
    any                 yes          any        -                FILE if given      no
    -                   -            CORPUS     -                refused (nowhere)  -
    FILE                -            CORPUS     -                FILE only          no
    any                 -            any        yes              the target (+FILE) yes without --data
    any                 yes          any        yes              refused (contradiction)
    ==================  ===========  =========  ===============  =================  ====================

    "The target": ``<checkpoint dir>/poelm_measure.json``, or for ``REPO@branch`` a commit on the
    branch. A ``--data`` record written into the target by request is marked
    ``data_override: true``. "Calibration written" is the default of ``write_calibration`` (WAND
    bounds and routing tau stored with the checkpoint); an explicit value overrides it.
    Refusals are PoelmErrors raised before anything is loaded or computed."""

    into: bool  # the record goes into the target
    out: str | None  # and/or to this file
    write_calibration: bool
    data_override: bool  # a --data record written into the target (marked in the record)

    @classmethod
    def of(cls, target: str, *, out=None, write=True, data=None, write_branch=False, write_calibration=None) -> "WritePolicy":
        if write_branch and not write:
            raise PoelmError("--write-branch and --no-write contradict each other: pass one")
        into = write and (write_branch or (out is None and data is None))
        if data is not None and write and not into and out is None:
            raise PoelmError(f"--data {data}: a measurement on another corpus is not written into {target} unless asked; "
                             f"pass --out FILE for the record, or --write-branch to replace the target's record (marked as such)")
        if write_calibration is None:
            write_calibration = into and data is None
        return cls(into=bool(into), out=out, write_calibration=bool(write_calibration), data_override=bool(into and data is not None))
