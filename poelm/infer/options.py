"""The decoding options: one frozen dataclass, passed whole through every layer.

``DecodeOptions`` is what ``Engine.generate`` / ``Engine.stream`` take (as ``options=`` or as its
field names), what ``poelm generate`` builds from its flags, what the measurement times and what
the Hugging Face face (``hf/modeling_poelm.py``, ``infer/hfloop.py``) maps ``poe_*`` keywords and
transformers' resolved generation config onto. The options are spelled here and nowhere else, and
``validate`` is their one check: every problem is one line naming the bad option, raised before
any compute as ``DecodeOptionError`` (a ``PoelmError`` for the CLI's ``error:`` line and a
``ValueError`` for Python callers and transformers users alike).

``parse_mode`` is the one reader of a mode string (``full | stage=K | prefix=K | wand | route |
speculative``), used by the engine, the CLI and the HF face; ``stage_selection`` reads the
fixed-depth ones as ``forward``'s ``stages=`` (the HF face's transformers loop, ``poelm eval``).

Imports the standard library and the core room's error type only; shipped verbatim with the rest of
``infer/`` in every export.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from dataclasses import dataclass, fields, replace

if __package__ == "poelm.infer":  # inside poelm: the core room's error type
    PoelmError = importlib.import_module("poelm.core.errors").PoelmError
else:  # an exported folder: core's files are flat siblings (see engine.py for why importlib above)
    from .errors import PoelmError

MODES = ("full", "stage", "prefix", "wand", "route", "speculative")
BOUNDS_KEY = "poe_wand_p99_bounds_per_stage_head"
CONFIDENCES = ("maxprob", "margin")
# m="auto": the draft length of each round is chosen in 1..AUTO_M_MAX (speculative.choose_m).
AUTO_M_MAX = 8


class DecodeOptionError(PoelmError, ValueError):
    """A bad decoding option: one line naming it (exit code 2 on the CLI, a ValueError elsewhere)."""


def parse_mode(text: str) -> dict:
    """``"full" | "stage=K" | "prefix=K" | "wand" | "route" | "speculative"`` -> ``{"mode": name}``
    plus ``stage`` or ``prefix`` when the text carries a value."""
    name, _, value = str(text).partition("=")
    name = name.strip()
    if name not in MODES:
        raise DecodeOptionError(f"unknown mode {text!r}: use full, stage=K, prefix=K, wand, route or speculative")
    if not value:
        return {"mode": name}
    if name not in ("stage", "prefix"):
        raise DecodeOptionError(f"mode {name!r} takes no value (got {text!r})")
    try:
        return {"mode": name, name: int(value)}
    except ValueError:
        raise DecodeOptionError(f"mode {text!r}: {name} must be an integer, e.g. {name}=1") from None


def stage_selection(text) -> tuple[str, int | list[int] | None]:
    """A fixed-depth mode (``full`` | ``stage=k`` | ``prefix=K'``; a bare ``k`` is ``stage=k``) as
    ``(label, stages)``: the mode written out, and ``PoEGPT`` / ``forward``'s ``stages=`` (None: all
    K stages; k: stage k alone; ``[0, ..., K'-1]``: a prefix). The range against a model's K is
    the caller's check (it knows K)."""
    text = "full" if text is None else str(text).strip()
    kw = parse_mode(f"stage={text}" if text.isdigit() else text)
    mode = kw["mode"]
    if mode == "full":
        return "full", None
    if mode not in ("stage", "prefix") or mode not in kw:
        raise DecodeOptionError(f"{text!r} is not a fixed depth: use full, k (stage k alone, e.g. 0), stage=k or prefix=K' (stages 0..K'-1)")
    n = kw[mode]
    if mode == "stage":
        if n < 0:
            raise DecodeOptionError(f"stage {n} out of range: stages count from 0")
        return f"stage={n}", n
    if n < 1:
        raise DecodeOptionError(f"prefix {n} out of range: a prefix holds at least one stage (prefix=1 is stage 0 alone)")
    return f"prefix={n}", list(range(n))


def wand_bounds_from(meta: dict | None):
    """The checkpoint's ``poe_wand_p99_bounds_per_stage_head`` (top level of ``meta`` or of a
    nested dict such as ``meta["config"]``), or None."""
    if not meta:
        return None
    if meta.get(BOUNDS_KEY) is not None:
        return list(meta[BOUNDS_KEY])
    for v in meta.values():
        if isinstance(v, dict) and v.get(BOUNDS_KEY) is not None:
            return list(v[BOUNDS_KEY])
    return None


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode (module docstring of ``engine.py`` for what each mode does).

    ``mode``: ``full`` | ``stage=K`` | ``prefix=K`` | ``wand`` | ``route`` | ``speculative`` (or the
    bare name with ``stage`` / ``prefix`` set). ``bounds``: wand's K-1 p99 bounds; ``tau`` and
    ``confidence`` (``maxprob`` or ``margin``): route's calibrated threshold and its kind; ``m``
    (an int, or ``"auto"``: chosen each round from the measured acceptance) and ``draft`` (stages
    ``0..draft-1`` draft): speculative. ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` follow
    it (HF's order). ``seed``: an int (a private seeded generator), None (fresh entropy) or
    ``"global"`` (torch's global RNG, as transformers' ``generate`` draws). Stop tokens are emitted
    and end their row, and are banned before ``min_new_tokens``. ``return_logprobs`` keeps each
    token's normalised log-probs."""

    max_new_tokens: int | None = None
    mode: str = "full"
    stage: int | None = None
    prefix: int | None = None
    bounds: tuple | list | None = None
    tau: float | None = None
    confidence: str = "maxprob"
    m: int | str = 4
    draft: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | str | None = None
    stop_tokens: tuple | list | frozenset = ()
    min_new_tokens: int = 0
    return_logprobs: bool = False

    @classmethod
    def of(cls, base: "DecodeOptions | None" = None, **given) -> "DecodeOptions":
        """``base`` (default: the defaults) with the named fields replaced; an unknown name is one
        ``DecodeOptionError`` line listing the known ones."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(given) - names)
        if bad:
            raise DecodeOptionError(f"unknown decoding option {bad[0]!r}: use {', '.join(sorted(names))}")
        return replace(base or cls(), **given)

    # ------------------------------------------------------------------------- derived (validated options)
    @property
    def m_auto(self) -> bool:
        return self.m == "auto"

    @property
    def draft_len(self) -> int:
        """The longest draft of a speculative round (``AUTO_M_MAX`` under ``m="auto"``)."""
        return AUTO_M_MAX if self.m_auto else int(self.m)

    @functools.cached_property
    def remaining_bounds(self) -> list[float] | None:
        """wand: ``sum_{i=s..K-2} bound_i`` for s = 0..K-2."""
        return None if self.bounds is None else [sum(self.bounds[s:]) for s in range(len(self.bounds))]

    def calibrated(self, meta: dict | None) -> "DecodeOptions":
        """These options with what ``poelm measure`` calibrated filled in where not given: wand's
        bounds (``poe_wand_p99_bounds_per_stage_head``, required), route's ``tau`` and its
        ``confidence`` kind (``poe_routing``). ``meta``: a checkpoint's meta or an export's config."""
        mode = parse_mode(self.mode)["mode"]
        if mode == "wand" and self.bounds is None:
            bounds = wand_bounds_from(meta)
            if bounds is None:
                raise DecodeOptionError(f"wand needs {BOUNDS_KEY}, which this checkpoint lacks: calibrate it with `poelm measure` "
                                        "or pass bounds (--bounds, poe_bounds=)")
            return replace(self, bounds=bounds)
        if mode == "route":
            routing = (meta or {}).get("poe_routing") or {}
            tau = self.tau if self.tau is not None else routing.get("tau")
            if tau is None:
                raise DecodeOptionError("route needs tau, which this checkpoint lacks: calibrate it with `poelm measure` "
                                        "or pass tau (--tau, poe_tau=)")
            return replace(self, tau=tau, confidence=routing.get("confidence") or self.confidence)
        return self

    # ------------------------------------------------------------------------- the one check
    def validate(self, n_stages: int, max_seq_len: int | None = None, longest_prompt: int = 0) -> "DecodeOptions":
        """The options resolved against a model of ``n_stages`` stages and ``max_seq_len``
        positions for prompts of at most ``longest_prompt`` tokens: ``mode`` split into its name and
        ``stage`` / ``prefix``, ``bounds`` floats, ``stop_tokens`` a frozenset. Every problem is one
        ``DecodeOptionError`` line naming the option."""
        K = n_stages
        parsed = parse_mode(self.mode)
        for key in ("stage", "prefix"):
            given = getattr(self, key)
            if key in parsed and given is not None and given != parsed[key]:
                raise DecodeOptionError(f"mode {key}={parsed[key]} contradicts {key}={given}")
        mode = parsed["mode"]
        stage, prefix = parsed.get("stage", self.stage), parsed.get("prefix", self.prefix)
        n = self.max_new_tokens
        if not _is_int(n) or n < 0:
            raise DecodeOptionError(f"max_new_tokens must be an integer >= 0 (got {n!r})")
        if max_seq_len is not None and longest_prompt + n > max_seq_len:
            raise DecodeOptionError(f"prompt ({longest_prompt} tokens) + max_new_tokens ({n}) exceeds the model's max_seq_len {max_seq_len}: "
                                    "shorten one of them")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise DecodeOptionError(f"min_new_tokens must be an integer >= 0 (got {self.min_new_tokens!r})")
        out = {"mode": mode, "stage": None, "prefix": None, "stop_tokens": frozenset(int(t) for t in self.stop_tokens)}
        if mode == "stage":
            if not _is_int(stage) or not 0 <= stage < K:
                raise DecodeOptionError(f"stage {stage!r} out of range: this model has stages 0..{K - 1}")
            out["stage"] = stage
        elif mode == "prefix":
            if not _is_int(prefix) or not 1 <= prefix <= K:
                raise DecodeOptionError(f"prefix {prefix!r} out of range: use prefix=1..{K}")
            out["prefix"] = prefix
        elif mode == "wand":
            if self.bounds is None:
                raise DecodeOptionError(f"wand needs bounds: pass {K - 1} floats ({BOUNDS_KEY} of a calibrated checkpoint; run `poelm measure`)")
            b = tuple(float(x) for x in self.bounds)
            if len(b) != K - 1:
                raise DecodeOptionError(f"wand needs {K - 1} bounds (one per stage transition), got {len(b)}")
            if any(math.isnan(x) or x < 0 for x in b):
                raise DecodeOptionError(f"wand bounds must be >= 0 (inf allowed), got {list(b)}")
            out["bounds"] = b
        elif mode == "route":
            if self.tau is None:
                raise DecodeOptionError("route needs tau (the calibrated stage-0 max-probability threshold, from `poelm measure`)")
            if not 0.0 <= float(self.tau) <= 1.0:
                raise DecodeOptionError(f"tau must be a probability in [0, 1], got {self.tau!r}")
            out["tau"] = float(self.tau)
            if self.confidence not in CONFIDENCES:
                raise DecodeOptionError(f"route confidence must be maxprob or margin (the kind `poelm measure` calibrated), got {self.confidence!r}")
        elif mode == "speculative":
            if self.m != "auto" and (not _is_int(self.m) or self.m < 1):
                raise DecodeOptionError(f"m (draft length) must be an integer >= 1 or 'auto', got {self.m!r}")
            if not _is_int(self.draft) or not 1 <= self.draft <= K:
                raise DecodeOptionError(f"draft (stages that draft) must be an integer in 1..{K}, got {self.draft!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise DecodeOptionError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise DecodeOptionError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise DecodeOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and self.seed != "global" and not _is_int(self.seed):
            raise DecodeOptionError(f"seed must be an integer, None or 'global', got {self.seed!r}")
        return replace(self, **out)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
