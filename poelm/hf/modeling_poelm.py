"""``PoelmForCausalLM``: a thin ``PreTrainedModel`` around poelm's own ``PoEGPT``.

Shipped verbatim into every exported folder. The model itself is not re-implemented here: the
export ships poelm's ``model.py`` and ``poe.py`` unchanged next to this file and this wrapper
imports them relatively (transformers' dynamic-module loader copies every file named in a
``from .x import`` line), so the Hub model and poelm run the same code.

- ``forward`` returns ``CausalLMOutputWithPast`` whose ``logits`` are the PoE log-probs of the
  chosen stages (``poe.aggregate``: renormalised, so they are valid logits and ``softmax`` of them
  is the PoE distribution). ``stages=None`` is full K; an int is one stage; a range is a prefix K'.
  ``alpha`` is the PoE aggregation exponent (SPEC "PoE aggregation").
- The KV cache is the transformers ``Cache`` that ``generate()`` creates (``DynamicCache``); a
  small adapter presents it to ``PoEGPT`` as the ``write(layer, pos, k, v)`` interface of
  poelm's own ``KVCache``, refusing a write that would leave a gap (a stage that was skipped).
- ``generate_wand`` / ``generate_speculative`` delegate to poelm's inference engine
  (``infer.py``, shipped with the export) with the branch's own calibrated bounds.

Padding is not supported (poelm's attention has no padding mask): an ``attention_mask`` with
zeros is refused rather than silently ignored.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

if __package__ == "poelm.hf":  # inside the poelm package: the same modules, one level up
    from .configuration_poelm import PoelmConfig

    _model = importlib.import_module("poelm.core.model")
    _poe = importlib.import_module("poelm.core.poe")
    ModelConfig, PoEGPT, aggregate = _model.ModelConfig, _model.PoEGPT, _poe.aggregate
else:  # the exported folder: verbatim copies of poelm/core/model.py and poelm/core/poe.py
    from .configuration_poelm import PoelmConfig
    from .model import ModelConfig, PoEGPT
    from .poe import aggregate

# transformers >= 5 names the cache argument/output ``cache``; 4.x named it ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheAdapter:
    """A transformers ``Cache`` seen through poelm's ``KVCache.write`` interface."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        have = self.cache.get_seq_length(layer)
        if have != pos:
            raise ValueError(
                f"KV cache holds {have} positions at layer {layer} but the input starts at {pos}: "
                "a cache filled with fewer stages (forward(stages=...)) cannot serve a deeper forward"
            )
        return self.cache.update(k, v, layer)


def _select(stages, n_stages: int) -> list[int]:
    if stages is None:
        return list(range(n_stages))
    sel = [int(stages)] if isinstance(stages, int) else sorted(int(s) for s in stages)
    if not sel or sel[0] < 0 or sel[-1] >= n_stages:
        raise ValueError(f"stages {stages!r} out of range for K={n_stages}")
    return sel


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
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Log-probs of the PoE over ``stages`` for every position (see module docstring).

        ``labels`` follow the transformers convention (shifted inside, -100 ignored); the loss is
        the mean NLL of the chosen PoE, not poelm's training loss."""
        if input_ids is None:
            raise ValueError("PoelmForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: pass unpadded prompts of equal length (or one at a time)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        pos = cache.get_seq_length(0) if cache is not None else 0
        sel = _select(stages, self.model.config.n_stages)
        adapter = _CacheAdapter(cache) if cache is not None else None
        z = self.model.stage_log_probs(input_ids, upto=sel[-1] + 1, cache=adapter, pos=pos)
        logits = aggregate(z[sel], alpha)
        loss = None
        if labels is not None:
            loss = F.nll_loss(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        out = {"loss": loss, "logits": logits, _CACHE_FIELD: cache if use_cache else None}
        return CausalLMOutputWithPast(**out)

    # ------------------------------------------------------------------------ PoE inference
    def _engine(self):
        if __package__ == "poelm.hf":
            Engine = importlib.import_module("poelm.infer.engine").Engine
        else:  # the export ships engine.py; these lines are what make transformers copy the files
            from .engine import Engine  # engine.py imports .speculative, which the loader copies too
        return Engine(self.model)

    @torch.no_grad()
    def generate_wand(self, input_ids, max_new_tokens: int = 32, bounds=None, **kwargs):
        """Greedy decoding with WAND adaptive depth (SPEC): after stage s a position exits when
        ``top1(c_s) - top2(c_s) > sum of the remaining bounds``. ``bounds`` default to this
        branch's calibrated ``poe_wand_p99_bounds_per_stage_head``."""
        bounds = self.config.poe_wand_p99_bounds_per_stage_head if bounds is None else bounds
        if bounds is None:
            raise ValueError("no WAND bounds: this checkpoint is not calibrated (run `poelm measure`) and none were passed")
        return self._engine().generate(_prompt(input_ids), max_new_tokens, mode="wand", bounds=list(bounds), **kwargs)

    @torch.no_grad()
    def generate_speculative(self, input_ids, max_new_tokens: int = 32, m: int = 4, **kwargs):
        """Self-speculative greedy decoding: stage 0 drafts ``m`` tokens, the full model verifies
        them in one pass (SPEC); token-identical to full-K greedy decoding in fp32."""
        return self._engine().generate(_prompt(input_ids), max_new_tokens, mode="speculative", m=m, **kwargs)


def _prompt(input_ids):
    """The engine takes one prompt as a list of ids; accept a ``[1, T]`` tensor as well."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.size(0) != 1:
                raise ValueError("generate_wand/generate_speculative take one prompt at a time")
            input_ids = input_ids[0]
        return input_ids.tolist()
    return list(input_ids)
