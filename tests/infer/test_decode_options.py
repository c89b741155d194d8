"""The decoding options (infer/options.py): one object, one check before any compute, one reader of
mode strings."""

from __future__ import annotations

import pytest

from poelm.core.errors import PoelmError
from poelm.core.model import ModelConfig, PoEGPT
from poelm.infer.engine import Engine
from poelm.infer.options import DecodeOptionError, DecodeOptions, stage_selection


def tiny():
    cfg = ModelConfig(vocab_size=64, depth=3, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=48, stage_layers=(1, 1, 1))
    model = PoEGPT(cfg)
    model.init_weights(5)
    return model


def test_options_object_and_field_names_decode_alike():
    model = tiny()
    opts = DecodeOptions(max_new_tokens=6, mode="wand", bounds=[0.5, 0.25], temperature=0.8, top_k=5, seed=3)
    a = Engine(model).generate([1, 2, 3], options=opts)
    b = Engine(model).generate([1, 2, 3], 6, mode="wand", bounds=[0.5, 0.25], temperature=0.8, top_k=5, seed=3)
    c = Engine(model).generate([1, 2, 3], 6, options=DecodeOptions(mode="wand", bounds=[9.0, 9.0]), bounds=[0.5, 0.25], temperature=0.8,
                               top_k=5, seed=3)  # a field name replaces the object's
    assert a.tokens == b.tokens == c.tokens and a.depths == b.depths == c.depths and len(a.tokens[0]) == 6


def test_bad_option_is_one_value_error_naming_it_before_compute():
    model = tiny()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    for b in model.blocks:
        b.register_forward_pre_hook(lambda *a: calls.append(1))
    cases = [(dict(topk=3), "unknown decoding option 'topk'"), (dict(seed=1.5), "seed must be"), (dict(top_k=0), "top_k"),
             (dict(mode="route", tau=1.5), "tau must be a probability"), (dict(mode="route", tau=0.5, confidence="x"), "confidence"),
             (dict(mode="stage=1", stage=2), "contradicts"), (dict(max_new_tokens=True), "max_new_tokens")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            Engine(model).generate([1, 2], **({"max_new_tokens": 4} | kw))
        assert isinstance(e.value, PoelmError) and "\n" not in str(e.value)  # the CLI's `error:` line too
    assert calls == []


def test_validate_resolves_the_mode():
    v = DecodeOptions(max_new_tokens=3, mode="prefix=2", stop_tokens=[0, 0, 5]).validate(3, 48, 4)
    assert (v.mode, v.prefix, v.stage, v.stop_tokens) == ("prefix", 2, None, frozenset({0, 5}))
    w = DecodeOptions(max_new_tokens=3, mode="wand", bounds=[1, 2]).validate(3)
    assert w.bounds == (1.0, 2.0) and w.remaining_bounds == [3.0, 2.0]
    s = DecodeOptions(max_new_tokens=3, mode="speculative", m="auto").validate(3)
    assert s.m_auto and s.draft_len == 8


def test_calibrated_fills_what_measure_calibrated():
    meta = {"poe_routing": {"tau": 0.4, "confidence": "margin"}}
    assert DecodeOptions(mode="route").calibrated(meta) == DecodeOptions(mode="route", tau=0.4, confidence="margin")
    assert DecodeOptions(mode="route", tau=0.9).calibrated(meta).tau == 0.9  # a given threshold wins, of the calibrated kind
    with pytest.raises(DecodeOptionError, match="route needs tau"):
        DecodeOptions(mode="route").calibrated({})
    assert DecodeOptions(mode="full").calibrated(None) == DecodeOptions()


def test_stage_selection():
    assert stage_selection(None) == ("full", None) == stage_selection("full")
    assert stage_selection("1") == ("stage=1", 1) == stage_selection("stage=1")
    assert stage_selection("prefix=2") == ("prefix=2", [0, 1])
    for bad, msg in [("wand", "not a fixed depth"), ("prefix=0", "at least one stage"), ("stage=-1", "from 0"), ("prefix", "not a fixed")]:
        with pytest.raises(DecodeOptionError, match=msg):
            stage_selection(bad)
