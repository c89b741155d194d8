"""The measurement record (``poelm_measure.json``) as typed dataclasses: the one home of its keys.

``measure`` builds a ``Record`` and writes ``Record.to_dict()``; every reader goes through
``load(d)``, the only place that knows old spellings (``LEGACY``). ``docs/record.md`` is generated
from the field docs here (``python -m poelm.measure.record > docs/record.md``; a test checks it).

A block keeps the keys it does not type in ``extra`` (written back unchanged), so a record written
by a newer poelm, or a block this module types only in part, survives a load / write round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass, field

NOT_MEASURED = "not measured"  # how a report renders a figure that is None (one home: poelm/report/*)
SCHEMA = 1
META_KEYS = ("rel_step", "phase", "lrm", "tokens", "tokens_in_phase", "train_val_bpb")  # copied from the checkpoint's meta


def doc(text: str, default=None, *, factory=None, omit_none: bool = False):
    """A field with its ``docs/record.md`` line; ``omit_none``: not written while None (optional keys)."""
    meta = {"doc": text, "omit_none": omit_none}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Block:
    """A JSON object with typed fields; unknown keys ride in ``extra``."""

    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d):
        if d is None:
            return None
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        hints = typing.get_type_hints(cls, vars(sys.modules[__name__]))
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        kw = {n: _decode(hints[n], d[n]) for n in names if n in d}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _encode(v)
        out.update(self.extra)
        return out

    def get(self, path: str, default=None):
        """The value at dotted ``path`` ("routing.generation.speedup", "bpb.single.0"); ``default`` if absent."""
        return lookup(self, path, default)

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def _decode(tp, v):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if v is None else _decode(args[0], v)
    if isinstance(tp, type) and issubclass(tp, Block):
        return tp.from_dict(v)
    if origin is list and v is not None:
        (arg,) = typing.get_args(tp)
        return [_decode(arg, x) for x in v]
    return v


def _encode(v):
    if isinstance(v, Block):
        return v.to_dict()
    if isinstance(v, list):
        return [_encode(x) for x in v]
    return v


# ----------------------------------------------------------------------------- blocks
@dataclass(kw_only=True)
class Figure(Block):
    """A figure with interval: ``{"value", "ci": [lo, hi]}`` (95 % block bootstrap; ci null when not drawn)."""

    value: float | None = doc("the figure")
    ci: list | None = doc("[lo, hi]")


@dataclass(kw_only=True)
class Bpb(Block):
    full: Figure | None = doc("full K (alpha 0)")
    single: list[Figure] = doc("single stage k", factory=list)
    prefix: list[Figure] = doc("prefix K' = j+1 (K-1 values)", factory=list)


@dataclass(kw_only=True)
class Accuracy(Block):
    single: list[Figure] = doc("top-1 accuracy of stage k alone", factory=list)
    full: Figure | None = doc("top-1 accuracy of the full-K product")


@dataclass(kw_only=True)
class AlphaSweep(Block):
    alphas: list = doc("0, 0.25, 0.5, 0.75, 1", factory=list)
    bpb: list = doc("renormalised BPB at each alpha", factory=list)
    ci: list = doc("its intervals", factory=list)


@dataclass(kw_only=True)
class GenCompare(Block):
    """A decoding mode vs full-K greedy on the generation set (``genset.untimed_figures``)."""

    agreement: float | None = doc("greedy agreement with full K (+ `agreement_ci`)")
    agreement_ci: list | None = doc("its interval over prompts")
    identical: int | None = doc("continuations identical to full K")
    mean_depth: float | None = doc("mean exit depth 1..K (+ `mean_depth_ci`)")
    mean_depth_ci: list | None = doc("its interval over prompts")
    depth_hist: list | None = doc("positions per exit depth")
    stage_positions: list | None = doc("positions computed per stage")
    prompts: int | None = doc("prompts of the generation set")
    new_tokens: int | None = doc("new tokens in all")
    speedup: dict | None = doc("a timed figure: `{value, ci, repeats}` (ratio of summed wall times)")
    tau: float | None = doc("routing only: the threshold used")
    confidence: str | None = doc("routing only: the confidence used")


@dataclass(kw_only=True)
class WandExit(Block):
    fraction_per_stage: list = doc("share of positions exiting at each stage (slice, teacher-forced)", factory=list)
    agreement: float | None = doc("exit top-1 = full-K top-1")


@dataclass(kw_only=True)
class Wand(Block):
    """Per transition s -> s+1 (K-1 values), calibrated on the calibration slice."""

    bounds: list = doc("= p99 = `poe_wand_p99_bounds_per_stage_head`", factory=list)
    p50: list | None = doc("median of the per-position bound statistic (calibration slice)")
    p90: list | None = doc("its 90th percentile")
    p99: list | None = doc("its 99th percentile (= `bounds`)")
    max: list | None = doc("its maximum")
    calib_tokens: int | None = doc("calibration slice size")
    positions: int | None = doc("positions calibrated on")
    histogram_resolution: float | None = doc("quantile resolution")
    exit: WandExit | None = doc("exits at the bounds on the measurement slice")
    generation: GenCompare | None = doc("WAND vs full on the generation set")


@dataclass(kw_only=True)
class Routing(Block):
    """Confidence-aware routing at a cap: tau calibrated on the calibration slice, held out on the measurement slice."""

    cap: float | None = doc("the cap on the metric")
    metric: str | None = doc("`agreement` (default), `target` (old records: `target_regression`) or `nll`")
    confidence: str | None = doc("`maxprob` or `margin`")
    tau: float | None = doc("lowest stage-0 threshold with metric <= cap")
    tau_resolution: float | None = doc("histogram bin width")
    fraction_calib: float | None = doc("routed fraction on the calibration slice")
    value_calib: float | None = doc("metric at tau on the calibration slice")
    value_tau0_calib: float | None = doc("the metric with every position routed (calibration slice)")
    value_tau0: float | None = doc("the same on the measurement slice")
    cap_met_at_tau0: bool | None = doc("tau = 0 already meets the cap (\"cap met with no threshold\")")
    fraction: float | None = doc("routed fraction on the measurement slice (+ `fraction_ci`)")
    fraction_ci: list | None = doc("its interval")
    value: float | None = doc("metric at tau on the measurement slice")
    c0: float | None = doc("stage-0 FLOP share")
    projected_speedup: float | None = doc("FLOP projection at the routed fraction")
    agreement_s0_full: float | None = doc("stage-0 top-1 = full-K top-1 (+ `agreement_ci`)")
    agreement_ci: list | None = doc("its interval")
    generation: GenCompare | None = doc("route mode vs full on the generation set (when routing selects)")


@dataclass(kw_only=True)
class Spec(Block):
    """Self-speculative decoding on the generation set: exact acceptance from one teacher-forced pass
    over each full-K greedy continuation; intervals from a bootstrap over prompts."""

    m: int | None = doc("draft length")
    mode: str | None = doc("`engine` or `teacher_forced` (no engine)")
    prompts: int | None = doc("prompts of the generation set")
    new_tokens: int | None = doc("new tokens in all")
    acceptance: float | None = doc("accepted / proposed (+ `acceptance_ci`)")
    acceptance_ci: list | None = doc("its interval")
    mean_accepted: float | None = doc("drafts accepted per round (+ `mean_accepted_ci`)")
    mean_accepted_ci: list | None = doc("its interval")
    accepted: int | None = doc("drafts accepted, all prompts")
    proposed: int | None = doc("drafts proposed, all prompts")
    rounds: int | None = doc("draft-verify rounds, all prompts")
    full_consistency_mismatches: int | None = doc("teacher-forced vs generated full-K disagreements")
    speedup: dict | None = doc("timed figure on the first `timing.prompts` prompts")
    implied_speedup: dict | None = doc("timed figure implied by acceptance and stage costs")
    c0_time: dict | None = doc("stage-0 share of the time")
    accept_hist: list | None = doc("rounds accepting 0 .. m drafts (timed prompts)")
    identical_outputs: int | None = doc("speculative output equal to full-K greedy")
    timed_prompts: int | None = doc("prompts timed")
    engine_check: dict | None = doc("`acceptance` of the engine on the timed prompts (= the teacher-forced one)")


@dataclass(kw_only=True)
class Timing(Block):
    """The timing protocol (``poelm/measure/timing.py``) on the first prompts of the generation set."""

    prompts: int | None = doc("prompts timed (`--timing-prompts`)")
    new_tokens: int | None = doc("new tokens per round, all prompts")
    new_tokens_per_prompt: int | None = doc("`--timing-tokens`")
    repeats: int | None = doc("interleaved rounds (`--timing-rounds`)")
    warmup: str | None = doc("what ran before the clock")
    order: str | None = doc("how modes interleave")
    interval: str | None = doc("how speedup intervals are drawn (old records: min-max over rounds)")
    modes: list | None = doc("the modes timed")
    ms_per_token: dict | None = doc("mode -> median round, ms per new token")


@dataclass(kw_only=True)
class Probe(Block):
    """The sample-mode probe (``poelm/measure/probe.py``): graded greedy continuations."""

    set: str | None = doc("`card`, `embedded` or a JSONL path")
    max_new_tokens: int | None = doc("greedy tokens per prompt")
    generator: str | None = doc("`engine` or `builtin`")
    grading: str | None = doc("the rubric, in words")
    results: list = doc("rows: `name, prompt, continuation, graded` (the graded start), `pass, answer` and/or `expect`, "
                        "`matched_words, answer_words`, `new_tokens` when cut short", factory=list)
    passed: int | None = doc("prompts passed")
    total: int | None = doc("prompts")
    words_matched: int | None = doc("answer words matched, all prompts", omit_none=True)
    words_total: int | None = doc("answer words, all prompts", omit_none=True)


@dataclass(kw_only=True)
class Generation(Block):
    """The generation prompt set (``poelm/measure/genset.py``)."""

    source: str | None = doc("\"measurement slice\"")
    prompts: int | None = doc("contexts cut (`--gen-prompts`)")
    prompts_requested: int | None = doc("asked for")
    context_tokens: int | None = doc("tokens per context")
    new_tokens_per_prompt: int | None = doc("greedy new tokens (`--gen-tokens`)")
    seed: int | None = doc("offset seed (`--gen-seed`)")
    starts: list | None = doc("each context's offset in the slice")
    interval: str | None = doc("how its intervals are drawn")


@dataclass(kw_only=True)
class Bootstrap(Block):
    block_tokens: int | None = doc("block size")
    blocks: int | None = doc("blocks in the slice")
    samples: int | None = doc("resamples")
    seed: int | None = doc("seed")
    level: float | None = doc("interval level")
    interval: str | None = doc("`percentile`")


@dataclass(kw_only=True)
class Against(Block):
    target: str | None = doc("the reference")
    deltas: dict = doc("key -> `{value, ci, inside_noise}`: paired deltas on the same slice", factory=dict)


@dataclass(kw_only=True)
class Record(Block):
    """One measurement of one checkpoint or branch."""

    schema: int = doc("record version (1)", SCHEMA)
    target: str | None = doc("what was measured (`path` or `REPO@step-XXXXX`)")
    branch: str | None = doc("branch name or null")
    step: int | None = doc("global step")
    rel_step: int | None = doc("step within the phase")
    phase: dict | None = doc("`name, start_step, steps, warmup, peak, warmdown_ratio, final`")
    lrm: float | None = doc("LR multiplier at the save")
    tokens: int | None = doc("tokens trained on")
    tokens_in_phase: int | None = doc("tokens in this phase")
    train_val_bpb: float | None = doc("the training log's val BPB")
    K: int | None = doc("stages")
    stage_layers: list = doc("layers per stage", factory=list)
    split_tokens: int | None = doc("measurement slice size used (`data.val_slices`)")
    calib_tokens: int | None = doc("calibration slice size used (disjoint)")
    split_tokens_requested: int | None = doc("asked for", omit_none=True)
    calib_tokens_requested: int | None = doc("asked for", omit_none=True)
    seq_len: int | None = doc("row length")
    data: str | None = doc("`\"val split\"` or the `--data` path")
    world_size: int | None = doc("processes that measured", omit_none=True)
    bpb: Bpb | None = doc("bits per byte, figures with interval")
    acc: Accuracy | None = doc("top-1 accuracy, figures with interval")
    alpha_sweep: AlphaSweep | None = doc("renormalised BPB over alpha")
    crossover_gap: float | None = doc("BPB(full K) - BPB(single s_{K-1})")
    crossover_gap_ci: list | None = doc("its interval")
    wand: Wand | None = doc("WAND p99 bounds")
    routing: Routing | None = doc("confidence-aware routing")
    spec: Spec | None = doc("self-speculative decoding")
    probe: Probe | None = doc("the sample-mode probe")
    timing: Timing | None = doc("the timing protocol")
    generation: Generation | None = doc("the generation prompt set")
    against: Against | None = doc("paired deltas vs a reference")
    bootstrap: Bootstrap | None = doc("how the intervals were drawn")
    data_override: bool | None = doc("true: measured on `--data` and written into the target by request (`--write-branch`)",
                                     omit_none=True)
    benchmarks: list | None = doc("`poelm eval` scores, one entry per task, metric and stages (kept across re-measurements)",
                                  omit_none=True)
    calibration_written: list | None = doc("calibration files written with the checkpoint", omit_none=True)
    elapsed_s: float | None = doc("wall time of the measurement, seconds")
    device: str | None = doc("the torch device measured on")
    dtype: str | None = doc("`fp32` or `bf16`")
    poelm_version: str | None = doc("writer's version")

    def figure(self, path: str) -> tuple[float | None, tuple | None]:
        return figure(self, path)

    @classmethod
    def from_meta(cls, meta: dict, *, target, branch, K: int, stage_layers, **fields) -> "Record":
        """A record's head from a checkpoint's metadata (step, phase, lrm, tokens, the training
        log's val BPB): what ``measure`` and ``poelm eval`` (for a model never measured) write first."""
        return cls(target=target, branch=branch,
                   step=int(meta["step"]) if meta.get("step") is not None else None,
                   **{k: meta.get(k) for k in META_KEYS}, K=int(K), stage_layers=list(stage_layers), **fields)


def lookup(node, path: str, default=None):
    """The value at dotted ``path`` in a ``Block`` or a raw JSON record (list indices are integers
    in the path); ``default`` when any step is absent or null."""
    for part in path.split("."):
        if isinstance(node, Block):
            node = getattr(node, part) if part in node._names() else node.extra.get(part)
        elif isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
        if node is None:
            return default
    return node


def figure(rec, path: str) -> tuple[float | None, tuple | None]:
    """``(value, ci)`` at dotted ``path`` of a record (typed or raw): a figure with interval yields
    both, a bare number its ``<name>_ci`` sibling (``crossover_gap_ci``, ``spec.acceptance_ci``);
    ``(None, None)`` when absent or not a number."""
    node, ci = lookup(rec, path), None
    if isinstance(node, Figure):
        node, ci = node.value, node.ci
    elif isinstance(node, dict):
        node, ci = node.get("value"), node.get("ci")
    else:
        head, _, name = path.rpartition(".")
        ci = lookup(lookup(rec, head) if head else rec, f"{name}_ci")
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None, None
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci)
    return float(node), (tuple(float(c) for c in ci) if ok else None)


# ----------------------------------------------------------------------------- loading
LEGACY = {"routing.metric": {"target_regression": "target"}}  # old value -> today's, per dotted key


def load(d) -> Record:
    """A record from its JSON object (any schema-1 version); old spellings become today's here, once."""
    rec = Record.from_dict(d)
    if rec.routing is not None and rec.routing.metric in LEGACY["routing.metric"]:
        rec.routing.metric = LEGACY["routing.metric"][rec.routing.metric]
    return rec


def untyped_keys(block: Block, path: str = "") -> list[str]:
    """Dotted keys a record holds that no field types (a record ``measure`` writes has none)."""
    out = [f"{path}{k}" for k in block.extra]
    for name in sorted(block._names() - {"extra"}):
        v = getattr(block, name)
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, Block):
                out += untyped_keys(x, f"{path}{name}.{i}." if isinstance(v, list) else f"{path}{name}.")
    return out


def canonical(records) -> list[dict]:
    """JSON records as today's writer spells them (``load(...).to_dict()``): what the report reads."""
    return [load(r).to_dict() for r in records]


# ----------------------------------------------------------------------------- writing
def json_default(x):
    """numpy scalars (``numbers`` knows them) as Python numbers; anything else is an error."""
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def clean(obj):
    """NaN/inf -> None so the record is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def to_bytes(obj) -> bytes:
    """A record (typed or its JSON object), or ``{"records": [...]}``, as the file's bytes: strict
    JSON (NaN/inf as null), indented, newline-terminated."""
    if isinstance(obj, Block):
        obj = obj.to_dict()
    return (json.dumps(clean(obj), indent=2, allow_nan=False, default=json_default) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- docs/record.md
INTRO = """# The measurement record (`poelm_measure.json`)

Generated from `poelm/measure/record.py` (`python -m poelm.measure.record > docs/record.md`); edit there.

`poelm measure` writes one JSON object per checkpoint or branch (stored in each trajectory branch as
`poelm_measure.json`; read by `poelm report` and `poelm branches`). Where it goes (`--out`, `--no-write`,
`--data`, `--write-branch`): the table of `WritePolicy` in `poelm/measure/options.py`. Definitions of
every figure are in the team's SPEC and in the docstrings of `poelm/measure/metrics.py`,
`poelm/measure/calibrate.py`, `poelm/measure/bootstrap.py` and `poelm/measure/probe.py`. A figure
that was not measured is `null`; a key added after schema 1 was first written may be missing, and a
reader treats it as not measured (`record.load` fills it with null).

A *figure with interval* is `{"value": float, "ci": [lo, hi]}` (95 % block bootstrap), or a bare number
with its interval beside it as `<name>_ci`. A *timed figure* is `{"value", "ci", "repeats": [...]}`:
the ratio of wall times summed over every (round, prompt) cell of the timing protocol
(`poelm/measure/timing.py`) with a 95 % crossed bootstrap over rounds and prompts; `repeats` are the
per-round ratios (records before issue 22: the median of the rounds and their [min, max]).
Old spellings read by `record.load`: """


def _rows(cls, prefix: str):
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        tp = typing.get_type_hints(cls, vars(sys.modules[__name__]))[f.name]
        inner = [a for a in (typing.get_args(tp) or (tp,)) if isinstance(a, type) and issubclass(a, Block) and a is not Figure]
        key = f"{prefix}{f.name}"
        yield f"| `{key}` | {f.metadata['doc']} |"
        if inner:
            yield from _rows(inner[0], key + ".")


def render_doc() -> str:
    legacy = ", ".join(f"`{k}`: " + ", ".join(f"`{a}` -> `{b}`" for a, b in v.items()) for k, v in LEGACY.items())
    return INTRO + legacy + ".\n\n| key | meaning |\n|---|---|\n" + "\n".join(_rows(Record, "")) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_doc())
