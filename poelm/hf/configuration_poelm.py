"""``PoelmConfig``: the Hugging Face configuration of an exported poelm checkpoint.

Shipped verbatim into every exported folder (``poelm export``) and loaded there by
``AutoConfig.from_pretrained(..., trust_remote_code=True)`` through ``auto_map``. It takes the
architecture fields from ``model.py`` (the verbatim copy next to it in an export, ``poelm.model``
inside the package), so the field list has one home.

The fields are the poelm ``ModelConfig`` fields under their own names (``depth``, ``n_embd``,
``stage_layers``...: the card's words), plus the phase metadata of the checkpoint (``step``,
``rel_step``, ``phase``/``phase_name``, ``lrm``, ``tokens``) and, once calibrated,
``poe_wand_p99_bounds_per_stage_head`` (K-1 floats, SPEC "WAND p99 bounds"). The usual Hugging
Face names (``hidden_size``, ``num_hidden_layers``...) are aliases through ``attribute_map`` so
generic tooling (cache sizing, pipelines) reads them without a second copy of each value.
"""

from __future__ import annotations

import importlib

from transformers import PretrainedConfig

if __package__ == "poelm.hf":  # inside the poelm package: model.py sits in poelm/core/
    ModelConfig = importlib.import_module("poelm.core.model").ModelConfig
else:  # the exported folder: model.py is the verbatim copy shipped next to this file
    from .model import ModelConfig  # model.py in turn imports .poe, which the loader also copies

# The architecture fields and their defaults come from poelm's own ModelConfig (one source): a
# key an exported config.json lacks means what ``ModelConfig.from_dict`` says (its value then).
MODEL_FIELDS = ModelConfig.from_dict({}).to_dict()

# Checkpoint metadata copied from poelm's meta.json (None when unknown).
META_FIELDS = ("step", "rel_step", "phase", "phase_name", "lrm", "tokens", "tokens_in_phase", "train_val_bpb")


class PoelmConfig(PretrainedConfig):
    model_type = "poelm"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "depth",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "intermediate_size": "intermediate",
        "max_position_embeddings": "max_seq_len",
    }

    # A classic ``__init__`` (rather than dataclass fields) works with transformers 4.x and 5.x
    # alike: 5.x keeps custom ``__init__`` methods of remote-code configs as they are.
    def __init__(self, poe_wand_p99_bounds_per_stage_head=None, use_cache=True, **kwargs):
        for name, default in MODEL_FIELDS.items():
            value = kwargs.pop(name, default)
            setattr(self, name, [int(x) for x in value] if name == "stage_layers" else value)
        for name in META_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        self.poe_wand_p99_bounds_per_stage_head = (
            None if poe_wand_p99_bounds_per_stage_head is None else [float(b) for b in poe_wand_p99_bounds_per_stage_head]
        )
        self.use_cache = use_cache
        # The shared unembedding is untied from the token embedding (SPEC "Model").
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    def to_poelm_dict(self) -> dict:
        """The ``ModelConfig`` fields, for ``ModelConfig.from_dict``."""
        return {name: getattr(self, name) for name in MODEL_FIELDS}
