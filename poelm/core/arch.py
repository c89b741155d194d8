"""``ModelConfig``: the architecture of a poelm model, and the reference implementation's ops.

Field names match the card (``depth``, ``n_embd``, ``stage_layers``...). ``REFERENCE_OPS`` are the
settings under which poelm computes the reference's model exactly (jaepil/nanochat ``gpt.py``;
facts: ../shared/reference/nanochat-poe.md). Pure Python; shipped verbatim with ``model.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# The reference implementation's op settings (jaepil/nanochat ``gpt.py``; the facts page
# ../shared/reference/nanochat-poe.md): with these, poelm computes the reference's model.
REFERENCE_OPS = {"qk_scale": 1.2, "ve_gate_scale": 3.0, "ve_gate_channels": 12, "smear": True, "smear_channels": 24,
                 "window_pattern": "SSSL", "rope_base": 100000.0, "backout": True, "init": "nanochat"}
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
    rope_base: float = 10000.0
    objective: str = "poe"  # "poe" (local, detached stages) or "bp" (end-to-end control)
    alpha_train: float = 0.0
    # The reference's ops (REFERENCE_OPS; facts page ../shared/reference/nanochat-poe.md). The
    # defaults are poelm's model as it was before these options existed, so a config (checkpoint,
    # branch, export) written without these keys loads to the model it meant.
    qk_scale: float = 1.0  # q and k multiplied after QK-norm (reference 1.2)
    ve_gate_scale: float = 2.0  # value-embedding gate = scale * sigmoid(ve_gate(x[..., :channels]))
    ve_gate_channels: int = 32  # (reference 3.0 over 12 channels)
    smear: bool = False  # mix the previous token's normed embedding into x0 (reference True)
    smear_channels: int = 24  # the smear gate reads x[..., :24]
    window_pattern: str = "L"  # per-layer sliding windows, S/L tiled, last layer L (reference "SSSL")
    short_window: int = 0  # S's window in keys; 0 = the reference's ceil(max_seq_len / 4 / 128) * 128
    backout: bool = False  # keep the reference's ``backout_lambda`` (stage logits never use it)
    init: str = "poelm"  # "poelm" or "nanochat" (the reference's init_weights)
    # The attention kernel (core/attention.py): "sdpa" (masked SDPA for window layers and padded
    # batches) or "flex" (flex_attention block masks: window layers cost T x (W+1), not T x T).
    # Same numbers to fp32 rounding; a pure speed/memory choice, so old configs mean "sdpa".
    attn_impl: str = "sdpa"

    def __post_init__(self):
        self.stage_layers = tuple(int(x) for x in self.stage_layers)

    @classmethod
    def reference(cls, **overrides) -> "ModelConfig":
        """A config with the reference's ops (``REFERENCE_OPS``), then ``overrides``."""
        return cls(**{**REFERENCE_OPS, **overrides})

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
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
