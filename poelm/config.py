"""Configuration: nested dataclasses, TOML loading, ``--set key=value`` overrides, validation.

A config file has the tables ``[model]``, ``[data]``, ``[optim]``, ``[schedule]`` and
``[train]`` (every key optional; defaults below). ``validate`` is the one place that rejects a
bad configuration, with a message naming the key and what to do. Unknown keys are errors (a typo
must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from poelm.core.errors import ConfigError
from poelm.core.model import POELM_OPS, ModelConfig
from poelm.schedule import Phase

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SourceConfig:
    """One named source of a data mixture (a file, directory or glob of txt/jsonl/parquet)."""

    name: str = ""
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # "embedded" = the public-domain corpus shipped in the package; else a path (file, directory
    # or glob of .txt / .jsonl / .parquet shards). ``sources`` (a mixture) overrides ``path``.
    path: str = "embedded"
    sources: list = field(default_factory=list)
    val_fraction: float = 0.05  # of documents, chosen deterministically by hashing (see data.py)
    tokenizer_train_chars: int = 20_000_000  # characters of the train split used to fit the BPE
    mixture_seed: int = 0
    # prepare the next batch in a background thread while the step runs (data/mixture.py); a
    # path or source path may name a shard folder written by `poelm tokenize` (data/shards.py)
    prefetch: bool = True


@dataclass
class OptimConfig:
    """``optimizer = "nanochat"`` (the default): the reference implementation's groups and rules
    (poelm/train/optim_nanochat.py: per-group betas/eps/weight decay, AdamW lrs x
    (n_embd/768)**-0.5, NorMuon + Polar Express, momentum and weight decay on its schedule).
    ``"poelm"``: poelm's earlier Muon/AdamW (poelm/train/optim.py), kept so that the runs trained
    with it resume exactly (its state format differs); on configs/embedded.toml (240 steps, quiet
    2-core CPU, README) the reference's ops, init and optimizer reached validation BPB 2.1881
    against 2.2048 with poelm's. ``IGNORED_BY`` lists the keys an optimizer does not read:
    ``validate`` refuses them at any value but their default."""

    matrix_lr: float = 0.02  # Muon, 2-D block matrices
    embedding_lr: float = 0.3  # AdamW, token and value embeddings
    unembedding_lr: float = 0.008  # AdamW, shared and per-stage heads
    scalar_lr: float = 0.5  # AdamW, per-layer residual scalars
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables
    optimizer: str = "nanochat"  # "nanochat" | "poelm" (see the docstring)
    # nanochat only: multiplies every group's lr (the fixed smear lr 0.2 included). It is the
    # reference's base_train ``batch_lr_scale = sqrt(total_batch_size / 2**19)``; `poelm import
    # nanochat` derives it from the saved groups' initial_lr. 1.0 keeps the plain group rules.
    lr_scale: float = 1.0
    # poelm only (the reference fixes its own: per-group betas, eps 1e-10, its momentum schedule)
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # Muon momentum warms up start -> muon_momentum (nanochat)
    muon_momentum_warmup: int = 300  # steps of that warm-up (0 disables)
    muon_ns_steps: int = 5
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10


# The optim keys each optimizer does not read (set to anything but the default: a ConfigError).
IGNORED_BY = {"nanochat": ("muon_momentum", "muon_momentum_start", "muon_momentum_warmup", "muon_ns_steps", "adam_beta1",
                           "adam_beta2", "adam_eps"),
              "poelm": ("lr_scale",)}
# What a saved config (checkpoint, export) means by a key it lacks: the default when it was
# written. Model keys: POELM_OPS (as ``ModelConfig.from_dict``); optim: before "nanochat" existed.
SAVED_OPTIM_DEFAULTS = {"optimizer": "poelm"}


@dataclass
class ScheduleConfig:
    name: str = "base"
    steps: int = 1000
    warmup: int = 100
    peak: float = 1.0
    warmdown_ratio: float = 0.65
    final: float = 0.05

    def phase(self, start_step: int = 0) -> Phase:
        return Phase(steps=self.steps, warmup=self.warmup, peak=self.peak, warmdown_ratio=self.warmdown_ratio,
                     final=self.final, start_step=start_step, name=self.name)


@dataclass
class TrainConfig:
    seq_len: int = 0  # 0 = model.max_seq_len
    device_batch_size: int = 8  # rows per micro-step on one device
    tokens_per_step: int = 0  # global batch in tokens; 0 = one micro-batch on every rank
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16
    eval_every: int = 100  # steps; 0 disables periodic validation
    eval_tokens: int = 65_536
    save_every: int = 0  # steps; 0 = only at the end
    log_every: int = 10
    keep_last: int = 0  # checkpoints kept in the run dir; 0 keeps all
    # torch.compile (train/runtime.py apply_compile): "model" (each stage one graph), "blocks"
    # (every block alone), false; "auto" = "model" on CUDA, off on CPU; numbers to fp32 rounding
    compile: bool | str = "auto"
    skip_spikes: float = 0.0  # k: skip an update whose loss or grad norm exceeds k sigma of the window (train/spikes.py); 0 = off
    spike_window: int = 50  # steps in the rolling window of the spike guard
    trackers: list = field(default_factory=list)  # live dashboards: wandb, tensorboard, trackio (poelm/track.py)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["stage_layers"] = list(self.model.stage_layers)
        return d


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig}


def _build(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = dict(values)
    if cls is DataConfig and "sources" in kwargs:
        srcs = kwargs["sources"]
        if not isinstance(srcs, list):
            raise ConfigError("data.sources must be a list of tables [[data.sources]] with name, path, weight")
        kwargs["sources"] = [_build(SourceConfig, s, f"{where}.sources[{i}]") for i, s in enumerate(srcs)]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value in [{where}]: {e}") from None


def from_dict(d: dict) -> Config:
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    parts = {}
    for name, cls in SECTIONS.items():
        sec = d.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"[{name}] must be a table")
        parts[name] = _build(cls, sec, name)
    return Config(**parts)


def from_saved(d: dict) -> Config:
    """``from_dict`` for a config a run saved (config.json, an export's poelm_config): a model or
    optim key it lacks means the default it was written under (``ModelConfig.from_dict``,
    ``SAVED_OPTIM_DEFAULTS``), not today's."""
    model, optim = d.get("model", {}), d.get("optim", {})
    model = {**POELM_OPS, **model} if isinstance(model, dict) else model
    optim = {**SAVED_OPTIM_DEFAULTS, **optim} if isinstance(optim, dict) else optim
    return from_dict({**d, "model": model, "optim": optim})


def resolve_path(name_or_path: str) -> Path:
    """A config file path, or the name of a preset under ``configs/`` (``embedded``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.toml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {name_or_path} (give a TOML path or a preset name from {CONFIG_DIR})")


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as TOML literals) to a raw dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: use --set section.key=value, e.g. --set train.seed=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"bad override key {key!r}: use one of {', '.join(SECTIONS)} then .key, e.g. model.depth")
        d.setdefault(parts[0], {})[parts[1]] = _parse_value(value.strip())
    return d


def load_dict(path: str | None) -> dict:
    if path is None:
        return {}
    p = resolve_path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {p}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None


def load(path: str | None = "embedded", overrides: list[str] | None = None) -> Config:
    """Load, override and validate a config. ``path=None`` starts from the defaults."""
    cfg = from_dict(apply_overrides(load_dict(path), overrides or []))
    validate(cfg)
    return cfg


def _positive(where: str, value, allow_zero: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(f"{where} must be {need}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Reject inconsistent or out-of-range settings with one clear message."""
    m = cfg.model
    for key in ("vocab_size", "depth", "n_embd", "n_head", "n_kv_head", "intermediate", "max_seq_len"):
        v = getattr(m, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"model.{key} must be a positive integer, got {v!r}")
    if not m.stage_layers or any((not isinstance(x, int)) or x <= 0 for x in m.stage_layers):
        raise ConfigError(f"model.stage_layers must be a list of positive integers, got {list(m.stage_layers)}")
    if sum(m.stage_layers) != m.depth:
        raise ConfigError(f"model.stage_layers {list(m.stage_layers)} sums to {sum(m.stage_layers)} but model.depth is {m.depth}: make them equal")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd {m.n_embd} is not divisible by model.n_head {m.n_head}")
    if m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_head {m.n_head} is not divisible by model.n_kv_head {m.n_kv_head} (GQA groups must be whole)")
    if m.head_dim % 2:
        raise ConfigError(f"head dim n_embd/n_head = {m.head_dim} must be even for rotary embeddings")
    if m.objective not in ("poe", "bp"):
        raise ConfigError(f"model.objective must be 'poe' or 'bp', got {m.objective!r}")
    if not 0.0 <= m.alpha_train <= 1.0:
        raise ConfigError(f"model.alpha_train must be in [0, 1], got {m.alpha_train}")
    if m.vocab_size < 260:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is too small: a byte-level BPE needs at least 256 bytes plus specials (use >= 260)")
    try:
        m.check()  # the reference-op fields (window_pattern, init, gate channels...)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    d = cfg.data
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}] ({s.name or 'unnamed'}) has no path")
        _positive(f"data.sources[{i}].weight", s.weight)
    if not isinstance(d.prefetch, bool):
        raise ConfigError(f"data.prefetch must be true or false, got {d.prefetch!r}")
    o = cfg.optim
    for key in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "muon_momentum"):
        _positive(f"optim.{key}", getattr(o, key), allow_zero=True)
    if not 0 <= o.muon_momentum_start < 1 or not 0 <= o.muon_momentum < 1:
        raise ConfigError("optim.muon_momentum and optim.muon_momentum_start must be in [0, 1)")
    _positive("optim.muon_momentum_warmup", o.muon_momentum_warmup, allow_zero=True)
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1):
        raise ConfigError("optim.adam_beta1 and optim.adam_beta2 must be in [0, 1)")
    _positive("optim.lr_scale", o.lr_scale)
    if o.optimizer not in IGNORED_BY:
        raise ConfigError(f"optim.optimizer must be \"nanochat\" or \"poelm\", got {o.optimizer!r}")
    default = OptimConfig()
    for key in IGNORED_BY[o.optimizer]:
        if getattr(o, key) != getattr(default, key):
            other = next(k for k, ignored in IGNORED_BY.items() if key not in ignored)
            raise ConfigError(f"optim.{key} = {getattr(o, key)!r} is ignored by optim.optimizer = \"{o.optimizer}\": "
                              f"remove it (default {getattr(default, key)!r}), or set optim.optimizer = \"{other}\"")
    s = cfg.schedule
    if not isinstance(s.steps, int) or s.steps <= 0:
        raise ConfigError(f"schedule.steps must be a positive integer, got {s.steps!r}")
    if not isinstance(s.warmup, int) or s.warmup < 0:
        raise ConfigError(f"schedule.warmup must be a non-negative integer, got {s.warmup!r}")
    if not 0.0 <= s.warmdown_ratio <= 1.0:
        raise ConfigError(f"schedule.warmdown_ratio must be in [0, 1], got {s.warmdown_ratio}")
    _positive("schedule.peak", s.peak)
    _positive("schedule.final", s.final, allow_zero=True)
    t = cfg.train
    if t.seq_len and t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    for key in ("device_batch_size", "eval_tokens"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("tokens_per_step", "eval_every", "save_every", "log_every", "keep_last", "seq_len"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.skip_spikes", t.skip_spikes, allow_zero=True)
    if isinstance(t.spike_window, bool) or not isinstance(t.spike_window, int) or t.spike_window < 2:
        raise ConfigError(f"train.spike_window must be an integer >= 2 (steps), got {t.spike_window!r}")
    if not (isinstance(t.compile, bool) or t.compile in ("auto", "model", "blocks")):
        raise ConfigError(f"train.compile must be \"model\", \"blocks\", \"auto\" or false, got {t.compile!r}")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    if not isinstance(t.trackers, (list, tuple)) or not all(isinstance(n, str) for n in t.trackers):
        raise ConfigError(f"train.trackers must be a list of tracker names, e.g. [\"tensorboard\"], got {t.trackers!r}")
    t.trackers = list(dict.fromkeys(t.trackers))  # names and packages: poelm.track.check, when a run starts
    row = t.device_batch_size * cfg.seq_len
    if t.tokens_per_step and t.tokens_per_step % row:
        raise ConfigError(f"train.tokens_per_step {t.tokens_per_step} is not a multiple of device_batch_size x seq_len = {row}")
    return cfg


def grad_accum_steps(cfg: Config, world_size: int = 1) -> int:
    """Micro-steps per optimizer step so that one step sees ``tokens_per_step`` tokens."""
    per_micro = cfg.train.device_batch_size * cfg.seq_len * world_size
    if not cfg.train.tokens_per_step:
        return 1
    if cfg.train.tokens_per_step % per_micro:
        raise ConfigError(f"train.tokens_per_step {cfg.train.tokens_per_step} is not divisible by device_batch_size x seq_len x world_size = {per_micro}")
    return cfg.train.tokens_per_step // per_micro


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Phase length from a token budget (the card: 40B / 786,432 = 50,863; see README)."""
    return int(round(tokens / tokens_per_step))


def parse_tokens(text: str) -> int:
    """'40B' -> 40_000_000_000; accepts K, M, B, T suffixes (decimal) and plain integers."""
    t = text.strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise ConfigError(f"bad token count {text!r}: use an integer or a suffix K/M/B/T, e.g. 40B") from None


def resolve_global_batch(cfg, world: int, meta: dict | None = None) -> int:
    """Fix the run's global batch ``train.tokens_per_step`` (in place; returns accum).

    The global batch is what the schedule, the loader position and the optimizer state are
    defined against, so it is a property of the run, not of the launch: ``0`` means "one
    micro-batch per rank" *at the run's first start* (``device_batch_size x seq_len x W``) and
    is then recorded, resolved, in every checkpoint's config.json. A resume or continual phase
    on another number of ranks keeps it and re-derives the accumulation
    ``tokens_per_step / (device_batch_size x seq_len x W)``; a checkpoint written before the
    value was recorded supplies it from ``meta["tokens_per_step"]``."""
    t = cfg.train
    if not t.tokens_per_step:
        prev = (meta or {}).get("tokens_per_step")
        t.tokens_per_step = int(prev) if prev else t.device_batch_size * cfg.seq_len * world
    micro = t.device_batch_size * cfg.seq_len * world
    if t.tokens_per_step % micro:
        rows = t.tokens_per_step // cfg.seq_len
        raise ConfigError(f"global batch train.tokens_per_step = {t.tokens_per_step} ({rows} rows of {cfg.seq_len}) does not split over "
                          f"{world} ranks x train.device_batch_size {t.device_batch_size}: use ranks x device_batch_size dividing {rows}")
    return grad_accum_steps(cfg, world)
