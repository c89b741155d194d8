"""``ModelConfig``: the architecture of a poelm model, and the reference implementation's ops.

Field names match the card (``depth``, ``n_embd``, ``stage_layers``...). The defaults are the
reference implementation's model (jaepil/nanochat ``gpt.py``; facts:
../shared/reference/nanochat-poe.md): ``REFERENCE_OPS`` lists its op settings, ``POELM_OPS``
poelm's earlier model, which a saved config names by its own keys (``from_dict`` reads a key it
lacks as ``POELM_OPS`` says: such a config was written while those were the defaults). Pure
Python; shipped verbatim with ``model.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# poelm's model before the reference's ops became the defaults: the value a saved config means by
# a key it lacks. Kept reachable by these explicit keys only, for the checkpoints trained with it;
# on configs/embedded.toml (240 steps, quiet 2-core CPU, README) the reference's ops, init and
# optimizer reached validation BPB 2.1881 against 2.2048 with these and poelm's optimizer.
POELM_OPS = {"qk_scale": 1.0, "ve_gate_scale": 2.0, "ve_gate_channels": 32, "smear": False, "window_pattern": "L",
             "rope_base": 10000.0, "backout": False, "init": "poelm"}
INITS = ("poelm", "nanochat")
ATTN_IMPLS = ("sdpa", "flex")  # core/attention.py (arch.py stays pure Python: the names only)


@dataclass
class ModelConfig:
    """Architecture. Field names match the card: ``depth``, ``n_embd``, ``stage_layers``..."""

    vocab_size: int = 4096
    depth: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    intermediate: int = 512
    max_seq_len: int = 256
    stage_layers: tuple = (3, 1, 1, 1)
    value_embeds: bool = True
    softcap: float = 15.0
    rope_base: float = 100000.0  # the reference's (poelm's earlier model: 10,000)
    objective: str = "poe"  # "poe" (local, detached stages) or "bp" (end-to-end control)
    alpha_train: float = 0.0
    # The reference's ops (facts page ../shared/reference/nanochat-poe.md); POELM_OPS gives
    # poelm's earlier values, which a config (checkpoint, branch, export) lacking a key means.
    qk_scale: float = 1.2  # q and k multiplied after QK-norm
    ve_gate_scale: float = 3.0  # value-embedding gate = scale * sigmoid(ve_gate(x[..., :channels]))
    ve_gate_channels: int = 12
    smear: bool = True  # mix the previous token's normed embedding into x0
    smear_channels: int = 24  # the smear gate reads x[..., :24]
    window_pattern: str = "SSSL"  # per-layer sliding windows, S/L tiled, last layer L ("L": none)
    short_window: int = 0  # S's window in keys; 0 = the reference's ceil(max_seq_len / 4 / 128) * 128
    backout: bool = True  # keep the reference's ``backout_lambda`` (stage logits never use it)
    init: str = "nanochat"  # "nanochat" (the reference's init_weights) or "poelm"
    # The attention kernel (core/attention.py): "sdpa" (masked SDPA for window layers and padded
    # batches) or "flex" (flex_attention block masks: window layers cost T x (W+1), not T x T).
    # Same numbers to fp32 rounding; a pure speed/memory choice, so old configs mean "sdpa".
    attn_impl: str = "sdpa"

    def __post_init__(self):
        self.stage_layers = tuple(int(x) for x in self.stage_layers)

    def check(self) -> None:
        """ValueError naming the first bad reference-op setting (``config.validate`` reports it
        as a ConfigError line; ``PoEGPT`` refuses to build from it)."""
        pat = self.window_pattern
        if not isinstance(pat, str) or not pat or any(c not in "SL" for c in pat.upper()):
            raise ValueError(f"model.window_pattern must be a non-empty string of S (short window) and L (full context) letters, "
                             f"e.g. 'SSSL' or 'L', got {pat!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"model.attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.init not in INITS:
            raise ValueError(f"model.init must be one of {', '.join(INITS)}, got {self.init!r}")
        # The gate reads min(ve_gate_channels, n_embd) channels (poelm's models narrower than 32
        # always did); the smear gate's width is a parameter shape, so it must fit.
        for key, top in (("ve_gate_channels", None), ("smear_channels", self.n_embd if self.smear else None)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (top is not None and v > top):
                raise ValueError(f"model.{key} must be an integer >= 1{f' and <= n_embd={top}' if top else ''}, got {v!r}")
        if not isinstance(self.short_window, int) or isinstance(self.short_window, bool) or self.short_window < 0:
            raise ValueError(f"model.short_window must be an integer >= 0 (0 = ceil(max_seq_len / 4 / 128) * 128), got {self.short_window!r}")
        for key in ("qk_scale", "ve_gate_scale"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"model.{key} must be a positive number, got {v!r}")

    def window_sizes(self) -> list[int]:
        """Per layer, the keys W before a query that it may see (query i sees j with
        ``0 <= i - j <= W``), the reference's ``_compute_window_sizes``: ``window_pattern`` tiled
        over the layers, the last layer always L; L = ``max_seq_len`` (never binding),
        S = ``short_window`` or ``ceil(max_seq_len / 4 / 128) * 128`` (512 at 2048: a multiple of
        flash attention's 128-key tile)."""
        self.check()
        L = self.max_seq_len
        S = self.short_window or -(-L // 4 // 128) * 128
        pat = self.window_pattern.upper()
        out = [S if pat[i % len(pat)] == "S" else L for i in range(self.depth)]
        out[-1] = L
        return out

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def stage_of_layer(self) -> list[int]:
        out = []
        for k, n in enumerate(self.stage_layers):
            out += [k] * n
        return out

    def stage_bounds(self, k: int) -> tuple[int, int]:
        start = sum(self.stage_layers[:k])
        return start, start + self.stage_layers[k]

    def has_value_embed(self, layer: int) -> bool:
        # nanochat: alternating layers, the last layer always included.
        return self.value_embeds and layer % 2 == (self.depth - 1) % 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_layers"] = list(self.stage_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config a saved dict (checkpoint, export, branch) names; a key it lacks means the
        value it had when the dict was written without it (``POELM_OPS``, else the default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**POELM_OPS, **{k: v for k, v in d.items() if k in names}})


# The reference implementation's op settings: with these (the defaults), poelm computes its model.
REFERENCE_OPS = {f.name: f.default for f in fields(ModelConfig) if f.name in POELM_OPS or f.name == "smear_channels"}
