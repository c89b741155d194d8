"""``PoelmForCausalLM``: a thin ``PreTrainedModel`` around poelm's own ``PoEGPT``.

Shipped verbatim into every exported folder. The model itself is not re-implemented here: the
export ships poelm's ``model.py`` and ``poe.py`` unchanged next to this file and this wrapper
imports them relatively (transformers' dynamic-module loader copies every file named in a
``from .x import`` line), so the Hub model and poelm run the same code.

- ``forward`` returns ``CausalLMOutputWithPast`` whose ``logits`` are the PoE log-probs of the
  chosen stages (``poe.aggregate``: renormalised, so they are valid logits and ``softmax`` of them
  is the PoE distribution). ``stages=None`` is full K; an int is one stage; a range is a prefix K'.
  ``alpha`` is the PoE aggregation exponent (SPEC "PoE aggregation").
- Padding: ``attention_mask`` (2-D, past + new columns, 1 = token) and ``position_ids`` go to
  poelm's model, which masks padded keys and rotates each row by its own positions (derived
  from the mask, ``cumsum - 1``, when ``position_ids`` are not given). Left padding (generation,
  ``pipeline(batch_size>1)``) and right padding (loglikelihood scoring, lm-eval) both give each
  row what it gets alone. Without padding no mask is built (the fast path).
- The KV cache is the transformers ``DynamicCache`` that ``generate()`` creates; a small adapter
  presents it to ``PoEGPT`` as the ``write(layer, pos, k, v)`` interface of poelm's own
  ``KVCache``, refusing a write that would leave a gap (a stage that was skipped). With
  ``smear`` (the reference's ops) the pre-smear token embeddings ride in one extra cache layer
  (index ``depth``), so a new token finds its predecessor's, beam reordering and cropping included.
- ``generate(..., poe_mode=...)`` reaches every PoE decoding mode (see ``generate``);
  ``generate_wand`` / ``generate_speculative`` / ``generate_route`` are shorthands for it with
  the branch's own calibrated bounds / threshold from config.json.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

if __package__ == "poelm.hf":  # inside the poelm package: the same modules, one level up
    from .configuration_poelm import PoelmConfig

    _model = importlib.import_module("poelm.core.model")
    _poe = importlib.import_module("poelm.core.poe")
    ModelConfig, PoEGPT, aggregate = _model.ModelConfig, _model.PoEGPT, _poe.aggregate
    _inputs = importlib.import_module("poelm.core.inputs")
    check_input_ids, positions_from_mask = _inputs.check_input_ids, _inputs.positions_from_mask
    gather_previous = importlib.import_module("poelm.core.cache").gather_previous
else:  # the exported folder: verbatim copies of poelm/core/model.py and poelm/core/poe.py
    from .cache import gather_previous
    from .configuration_poelm import PoelmConfig
    from .inputs import check_input_ids, positions_from_mask
    from .model import ModelConfig, PoEGPT
    from .poe import aggregate

# transformers >= 5 names the cache argument/output ``cache``; 4.x named it ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_GEN_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
# Cache implementations that keep DynamicCache's growing per-layer storage (what the adapter needs).
DYNAMIC_CACHES = (None, "dynamic", "offloaded")
ENGINE_MODES = ("wand", "route", "speculative")


@dataclass
class PoelmCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``stage_hidden_states``: with ``output_hidden_states``,
    the residual stream at the end of each computed stage (``hidden_states[end of stage k]``)."""

    stage_hidden_states: tuple | None = None


@dataclass
class PoelmGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` of a PoE engine mode, plus its statistics:
    ``poe_mode``; ``acceptance`` (accepted / proposed draft tokens, speculative); ``accepted``
    (per row, accepted drafts per round); ``exit_depths`` (per row, stages whose heads decided each
    new token: the WAND / route exit depth, K for full-depth tokens); ``mean_depth``;
    ``poe_stats`` (the engine's whole ``stats`` dict: tokens/s, histograms, rounds...)."""

    poe_mode: str | None = None
    acceptance: float | None = None
    accepted: list | None = None
    exit_depths: list | None = None
    mean_depth: float | None = None
    poe_stats: dict | None = None


class _CacheAdapter:
    """A transformers ``Cache`` seen through poelm's ``KVCache`` interface (``write``,
    ``smear_previous``)."""

    def __init__(self, cache: Cache, depth: int):
        self.cache, self.depth = cache, depth

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        have = self.cache.get_seq_length(layer)
        if have != pos:
            raise ValueError(
                f"KV cache holds {have} positions at layer {layer} but the input starts at {pos}: "
                "a cache filled with fewer stages (forward(stages=...)) cannot serve a deeper forward"
            )
        return self.cache.update(k, v, layer)

    def smear_previous(self, e: torch.Tensor, pos: int, valid=None):
        """``KVCache.smear_previous`` over a transformers cache: the pre-smear embeddings
        ``[B, T, d]`` are kept as one extra cache layer (index ``depth``, keys ``[B, 1, T, d]``),
        so beam-search reordering and cropping move them together with the keys and values."""
        layers = getattr(self.cache, "layers", None)  # transformers >= 5: built per config layer
        if layers is not None and len(layers) <= self.depth and getattr(self.cache, "layer_class_to_replicate", None) is None:
            from transformers.cache_utils import DynamicLayer

            while len(layers) <= self.depth:
                layers.append(DynamicLayer())
        keys, _ = self.write(self.depth, pos, e.unsqueeze(1), e[:, :1, :1].unsqueeze(1).expand(-1, -1, e.size(1), -1))
        return gather_previous(keys[:, 0], e.size(1), valid)


def _select(stages, n_stages: int) -> list[int]:
    if stages is None:
        return list(range(n_stages))
    sel = [int(stages)] if isinstance(stages, int) else sorted(int(s) for s in stages)
    if not sel or sel[0] < 0 or sel[-1] >= n_stages:
        raise ValueError(f"stages {stages!r} out of range for K={n_stages}")
    return sel


def _engine_module():
    """``infer/engine.py``: imported when first needed, so loading a model never pays for it."""
    if __package__ == "poelm.hf":
        return importlib.import_module("poelm.infer.engine")
    from . import engine
    from .engine import Engine  # noqa: F401  (the ``from .x import`` form the remote-code loader scans to ship it)

    return engine


def _hfloop_module():
    """``infer/hfloop.py``, the engine as ``generate``'s decoding loop (imported on first use)."""
    if __package__ == "poelm.hf":
        return importlib.import_module("poelm.infer.hfloop")
    from . import hfloop
    from .hfloop import decode  # noqa: F401  (the form the remote-code loader scans)

    return hfloop


class PoelmPreTrainedModel(PreTrainedModel):
    config_class = PoelmConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        # Every parameter is in model.safetensors; only the rotary tables are non-persistent
        # buffers, which transformers leaves uninitialised when it builds the model on the meta
        # device. Recompute them exactly as PoEGPT does (fp32 angles).
        if isinstance(module, PoEGPT):
            cos, sin = module._rotary(module.config.max_seq_len, device=module.cos.device)
            module.cos.copy_(cos)
            module.sin.copy_(sin)
            module._merged_cache.clear()


class PoelmForCausalLM(PoelmPreTrainedModel, GenerationMixin):
    def __init__(self, config: PoelmConfig):
        super().__init__(config)
        self.model = PoEGPT(ModelConfig.from_dict(config.to_poelm_dict()))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return None  # the stage heads are not a single tied unembedding

    # ------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        stages=None,
        alpha: float = 0.0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Log-probs of the PoE over ``stages`` for every position (see module docstring).

        ``labels`` follow the transformers convention (shifted inside, -100 ignored); the loss is
        the mean NLL of the chosen PoE, not poelm's training loss. ``logits_to_keep=n`` returns
        the last n positions only (0 = all; ``generate`` asks for 1).

        ``output_hidden_states=True``: ``hidden_states`` is the transformers tuple of ``1 + L``
        tensors ``[B, T, n_embd]`` (L = the layers that ran: all ``depth`` for the full model,
        fewer with ``stages=``): entry 0 is the stream entering the first block
        (``x0 = norm(wte(ids))``, plus the smear when ``smear`` is on), entry i the residual
        stream after block i. Stage k ends after block ``sum(stage_layers[:k+1])``, so its hidden state, the input of its head
        (``lm_head(norm(h)) + stage_head[k](norm(h))``), is ``hidden_states[sum(stage_layers[:k+1])]``;
        ``stage_hidden_states[k]`` is that per-stage view. ``output_attentions=True`` raises:
        attention runs in ``F.scaled_dot_product_attention``, which does not return weights."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds are not supported: pass input_ids (the PoE stages read token ids for their value embeddings)")
        if input_ids is None:
            raise ValueError("PoelmForCausalLM needs input_ids [batch, seq]")
        check_input_ids(input_ids, self.config.vocab_size)
        if output_attentions:
            raise ValueError("output_attentions is not supported: poelm's attention runs in F.scaled_dot_product_attention, which does "
                             "not return attention weights; call with output_attentions=False")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{type(cache).__name__} is not supported: poelm's stages fill their layers' caches separately and need a "
                             "DynamicCache (pass none, or transformers.DynamicCache())")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        pos = cache.get_seq_length(0) if cache is not None else 0
        B, T = input_ids.shape
        valid, positions = self._padding(attention_mask, position_ids, pos, B, T, input_ids.device)
        top = int(positions.max()) + 1 if positions is not None else pos + T
        if top > self.config.max_seq_len:
            raise ValueError(f"the input reaches position {top} (cached {pos} + {T} new) but this model's max_seq_len is "
                             f"{self.config.max_seq_len}: shorten the input or generate fewer tokens")
        sel = _select(stages, self.model.config.n_stages)
        adapter = _CacheAdapter(cache, self.model.config.depth) if cache is not None else None
        collect = [] if output_hidden_states else None
        hs = self.model.hiddens(input_ids, upto=sel[-1] + 1, cache=adapter, pos=pos, detach=False, positions=positions, valid=valid,
                                collect=collect)
        keep = int(logits_to_keep) if logits_to_keep and labels is None else 0
        z = torch.stack([F.log_softmax(self.model.stage_logits(k, h[:, -keep:] if keep else h), dim=-1) for k, h in enumerate(hs)])
        logits = aggregate(z[sel], alpha)
        loss = None
        if labels is not None:
            loss = F.nll_loss(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        out = {"loss": loss, "logits": logits, _CACHE_FIELD: cache if use_cache else None}
        if collect is not None:
            ends = [sum(self.model.config.stage_layers[: k + 1]) for k in range(len(hs))]
            out["hidden_states"] = tuple(collect)
            out["stage_hidden_states"] = tuple(collect[e] for e in ends)
        return PoelmCausalLMOutput(**out)

    def _padding(self, attention_mask, position_ids, pos: int, B: int, T: int, device):
        """(valid [B, pos+T] or None, positions [B, T] or None) for ``PoEGPT``; both None when the
        batch is unpadded and positions are the plain ``pos..pos+T-1`` (the fast path)."""
        valid = positions = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, pos + T):
                raise ValueError(f"attention_mask must be 2-D [batch, cached + new] = [{B}, {pos + T}], got {tuple(attention_mask.shape)}: "
                                 "pass the tokenizer's attention_mask (extended by one column per generated token)")
            if not bool(attention_mask.all()):
                valid = attention_mask.to(device).bool()
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.size(1) != T or position_ids.size(0) not in (1, B):
                raise ValueError(f"position_ids must be [batch or 1, {T}] (one per new token), got {tuple(position_ids.shape)}")
            position_ids = position_ids.to(device)
            if int(position_ids.min()) < 0:
                raise ValueError("position_ids must be >= 0")
            plain = torch.arange(pos, pos + T, device=device)
            if valid is not None or not bool((position_ids == plain).all()):
                positions = position_ids.expand(B, T)
        elif valid is not None:
            positions = positions_from_mask(valid)[:, -T:]
        return valid, positions

    # ------------------------------------------------------------------------ vocabulary
    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True):
        """Resize every vocabulary-sized parameter together: the token embedding, every value
        embedding, the shared head and every per-stage head (rows are kept or cut; the config's
        ``vocab_size`` follows). New rows: with ``mean_resizing`` (transformers' default) the
        embeddings and the shared head get the mean of their existing rows; otherwise the
        distributions of ``PoEGPT.init_weights`` (wte N(0, 1), value embeddings U(+-sqrt(3/d)), shared
        head N(0, 0.001^2)). Per-stage head rows start at zero either way (SPEC: a stage head starts
        at zero, so a new token is predicted by the shared head alone). Returns the token embedding."""
        if new_num_tokens is None:
            return self.model.wte
        n = int(new_num_tokens)
        if pad_to_multiple_of:
            n = int(math.ceil(n / int(pad_to_multiple_of)) * int(pad_to_multiple_of))
        if n < 1:
            raise ValueError(f"new_num_tokens must be >= 1, got {new_num_tokens!r}")
        old = self.config.vocab_size
        d = self.model.config.n_embd
        bound = math.sqrt(3.0) * d ** -0.5

        def grow(weight: torch.Tensor, fresh) -> torch.Tensor:
            w = weight.new_empty((n,) + tuple(weight.shape[1:]))
            keep = min(n, old)
            w[:keep] = weight[:keep]
            if n > old:
                if fresh == "zero":
                    w[old:] = 0
                elif mean_resizing:
                    w[old:] = weight.mean(0, keepdim=True)
                else:
                    fresh(w[old:])
            return w

        m = self.model
        m.wte = _embedding(grow(m.wte.weight, lambda t: t.normal_(0.0, 1.0)))
        for key in list(m.value_embeds.keys()):
            m.value_embeds[key] = _embedding(grow(m.value_embeds[key].weight, lambda t: t.uniform_(-bound, bound)))
        m.lm_head = _linear(grow(m.lm_head.weight, lambda t: t.normal_(0.0, 0.001)))
        for k in range(len(m.stage_heads)):
            m.stage_heads[k] = _linear(grow(m.stage_heads[k].weight, "zero"))
        m._merged_cache.clear()
        m.config.vocab_size = n
        self.config.vocab_size = n
        return m.wte

    # ------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, poe_mode: str | None = None, poe_bounds=None, poe_tau=None, poe_m=None,
                 poe_draft: int | None = None, **kwargs):
        """transformers ``generate()``, with every PoE decoding mode one keyword away.

        ``poe_mode``: ``"full"`` (default; PoE over all K stages), ``"stage=k"``, ``"prefix=K'"``,
        ``"wand"`` (adaptive depth, ``poe_bounds`` default this branch's calibrated
        ``poe_wand_p99_bounds_per_stage_head``), ``"route"`` (stage 0 alone when its max probability
        >= ``poe_tau``, default the calibrated ``poe_routing.tau``) or ``"speculative"`` (stage-0
        drafts of ``poe_m`` tokens, default 4, or ``"auto"``: chosen each round from the measured
        acceptance; ``poe_draft=J`` drafts with the PoE of stages 0..J-1). When not passed it is
        read from ``generation_config.poe_mode`` (transformers keeps unknown GenerationConfig
        attributes, so a saved generation config or a pipeline can carry it). The ``poe_*``
        keywords are the engine's ``DecodeOptions`` fields ``mode`` / ``bounds`` / ``tau`` / ``m`` /
        ``draft`` (``infer/options.py``, the one place they are checked); the generation config
        supplies the rest (length, sampling, EOS, min length; ``infer/hfloop.py``).

        Why a keyword: the mode is this model's own decoding method, which no GenerationConfig
        field names. full / stage / prefix are transformers' own decoding loop over ``forward(stages=...)``
        (beam search and every logits processor work). wand / route / speculative run poelm's
        engine through transformers' ``custom_generate`` hook in its callable form ("generate will
        perform the usual input preparation steps, then call the provided callable to run the
        decoding loop", ``GenerationMixin.generate``): generation-config merging, max/min length,
        EOS / pad defaults, the sampling processors and the streamer's prompt are transformers'
        own, and the engine reads the resolved values. The string form of ``custom_generate`` (a
        Hub repo's ``custom_generate/generate.py``) would need a second copy of the engine per
        branch and ``trust_remote_code`` at every call.

        The contract is ``generate``'s in every mode: the result holds prompt + new tokens (rows
        that end early are filled with ``pad_token_id``), ``eos_token_id``, ``pad_token_id``,
        ``max_new_tokens`` / ``max_length``, ``min_new_tokens`` / ``min_length``, ``streamer``,
        ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` are honoured, left-padded batches
        decode together (each row as it would alone), and ``return_dict_in_generate=True`` gives a
        ``GenerateDecoderOnlyOutput`` (``PoelmGenerateOutput`` in engine modes, whose extra fields
        carry the acceptance, per-row accepted counts and exit depths; ``output_scores`` /
        ``output_logits`` there hold each step's normalised log-probs of the mode, before
        temperature / top-k / top-p, zeros for rows already finished). Greedy speculative output,
        and WAND output whenever its bounds hold, equal greedy ``poe_mode="full"`` output token for
        token. Engine modes refuse what the engine does not implement (beam search, other logits
        processors, stopping criteria other than EOS and length, a filled cache) with a ValueError
        before any compute; so does any mode for bad ``input_ids``, a generation that would pass
        ``max_seq_len``, or a cache implementation other than the dynamic cache."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        gc = generation_config if generation_config is not None else self.generation_config
        text = poe_mode if poe_mode is not None else (getattr(gc, "poe_mode", None) or "full")
        eng = _engine_module()
        parsed = eng.parse_mode(text)  # a DecodeOptionError is a ValueError
        mode = parsed["mode"]
        if mode not in ENGINE_MODES and any(v is not None for v in (poe_bounds, poe_tau, poe_m, poe_draft)):
            raise ValueError(f"poe_bounds / poe_tau / poe_m / poe_draft apply to poe_mode wand / route / speculative, not {text!r}")
        self._check_generate(ids, gc, kwargs)
        if mode not in ENGINE_MODES:  # full / stage / prefix: transformers' own loop over forward(stages=...)
            stages = eng.stage_selection(text)[1]
            if stages is not None:
                _select(stages, self.model.config.n_stages)  # range check before compute
                kwargs["stages"] = stages
            return super().generate(inputs, generation_config, **kwargs)
        # the poe_* keywords onto the engine's options; bounds / tau / confidence default to this
        # branch's calibration in config.json (the rule ``poelm generate`` applies to a checkpoint)
        given = {"bounds": poe_bounds, "tau": poe_tau, "m": poe_m, "draft": poe_draft}
        poe = eng.DecodeOptions.of(mode=mode, **{k: v for k, v in given.items() if v is not None}).calibrated(self.config.to_dict())
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.get(key) or getattr(gc, key, False):
                raise ValueError(f"{key} is not available with poe_mode={text!r} (the engine keeps its own cache); use poe_mode='full'")
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(f"poe_mode={text!r} keeps its own KV cache: drop {key}= (continuing a cache needs poe_mode='full')")
        # transformers hands a callable custom_generate no streamer (5.x replaces the mode kwargs by
        # the callable's own new ones), so it travels in the partial.
        decode = functools.partial(_engine_decode, poe=poe, poe_streamer=kwargs.get("streamer"))
        return super().generate(inputs, generation_config, custom_generate=decode, **kwargs)

    def _check_generate(self, ids, gc, kwargs) -> None:
        """The ValueErrors ``generate`` raises before any compute."""
        impl = kwargs.get("cache_implementation", getattr(gc, "cache_implementation", None))
        if impl not in DYNAMIC_CACHES:
            raise ValueError(f"cache_implementation={impl!r} is not supported: poelm's stages fill their layers' caches separately "
                             "(forward(stages=...), adaptive depth) and need the dynamic cache; drop cache_implementation")
        for key in ("cache", "past_key_values"):
            c = kwargs.get(key)
            if c is not None and not isinstance(c, DynamicCache):
                raise ValueError(f"{type(c).__name__} is not supported: poelm needs a transformers.DynamicCache (or no cache)")
        if ids is None:
            return
        check_input_ids(ids, self.config.vocab_size)
        mask = kwargs.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: pass the tokenizer's pair")
        longest = int(mask.sum(1).max()) if mask is not None else ids.size(1)
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        width = ids.size(1)
        new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
        if new is None:
            max_length = kwargs.get("max_length", getattr(gc, "max_length", None))
            if max_length is None:  # transformers' default: 20 new tokens, capped at max_position_embeddings
                return
            new = max_length - width
        if past is None and longest + int(new) > self.config.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({int(new)}) = {longest + int(new)} exceeds this model's max_seq_len "
                             f"{self.config.max_seq_len}: shorten the prompt or lower max_new_tokens")

    def generate_wand(self, input_ids, max_new_tokens: int = 32, bounds=None, **kwargs):
        """``generate(..., poe_mode="wand")``: WAND adaptive depth (SPEC): after stage s a
        position exits when ``top1(c_s) - top2(c_s) > sum of the remaining bounds``. ``bounds``
        default to this branch's calibrated ``poe_wand_p99_bounds_per_stage_head``."""
        return self.generate(input_ids, max_new_tokens=max_new_tokens, poe_mode="wand", poe_bounds=bounds, **kwargs)

    def generate_speculative(self, input_ids, max_new_tokens: int = 32, m: int = 4, **kwargs):
        """``generate(..., poe_mode="speculative")``: stage 0 drafts ``m`` tokens, the full model
        verifies them in one pass (SPEC); greedy output is token-identical to ``generate()``."""
        return self.generate(input_ids, max_new_tokens=max_new_tokens, poe_mode="speculative", poe_m=m, **kwargs)

    def generate_route(self, input_ids, max_new_tokens: int = 32, tau=None, **kwargs):
        """``generate(..., poe_mode="route")``: stage 0 alone where its max probability >= tau
        (default: this branch's calibrated ``poe_routing.tau``), all K stages elsewhere."""
        return self.generate(input_ids, max_new_tokens=max_new_tokens, poe_mode="route", poe_tau=tau, **kwargs)


def _embedding(weight: torch.Tensor) -> nn.Embedding:
    e = nn.Embedding(weight.size(0), weight.size(1), device=weight.device, dtype=weight.dtype)
    e.weight.data.copy_(weight)
    return e


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.size(1), weight.size(0), bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    return lin


# ---------------------------------------------------------------------------- the engine as a decoding loop
def _engine_decode(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, poe=None, poe_streamer=None,
                   **model_kwargs):
    """The decoding loop ``generate`` calls for wand / route / speculative (``custom_generate``):
    ``infer/hfloop.py`` runs poelm's engine on the values transformers resolved; here its result
    becomes transformers' output type."""
    loop = _hfloop_module()
    try:
        sequences, res, scores = loop.decode(model.model, input_ids, logits_processor, stopping_criteria, generation_config, poe,
                                             poe_streamer, model_kwargs)
    except loop.PoelmError as e:
        raise ValueError(str(e)) from None
    gc = generation_config
    if not gc.return_dict_in_generate:
        return sequences
    st = res.stats
    return PoelmGenerateOutput(sequences=sequences, scores=scores if gc.output_scores else None, logits=scores if gc.output_logits else None,
                               poe_mode=poe.mode, acceptance=st.get("acceptance"), accepted=res.accepted if poe.mode == "speculative" else None,
                               exit_depths=res.depths, mean_depth=st.get("mean_depth"), poe_stats=st)
