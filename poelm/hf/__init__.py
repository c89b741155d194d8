"""The Hugging Face side of poelm: the files an export ships for ``trust_remote_code``.

``configuration_poelm.py`` (``PoelmConfig``) and ``modeling_poelm.py`` (``PoelmForCausalLM``) are
copied verbatim into every exported folder next to verbatim copies of ``poelm/model.py``,
``poelm/poe.py`` (and ``poelm/infer.py``), which they import relatively; inside the package they
import ``poelm.model`` instead. The exporter itself is ``poelm/export.py``. Nothing is imported
here so ``import poelm.hf`` stays free of transformers.
"""
