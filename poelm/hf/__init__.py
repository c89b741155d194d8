"""The Hugging Face face of poelm: the two files an export ships for ``trust_remote_code``.

``configuration_poelm.py`` (``PoelmConfig``) and ``modeling_poelm.py`` (``PoelmForCausalLM``) are
copied verbatim into every exported folder, flat, next to verbatim copies of every module of
``poelm/core/`` and ``poelm/infer/``, which they import relatively there; inside the package they
import ``poelm.core.*`` / ``poelm.infer.*`` instead. The exporter is
``poelm/trajectory/export.py``. Nothing is imported here so ``import poelm.hf`` stays free of
transformers.
"""
