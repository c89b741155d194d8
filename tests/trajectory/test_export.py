"""Export to a Hugging Face folder: loads offline through the Auto classes with no warnings, the
logits are poelm's PoE log-probs, generate() matches poelm's greedy decoding, the tokenizer
prepends BOS itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from poelm.train import checkpoint
from poelm.trajectory import export as export_mod
from poelm.core.errors import CheckpointError, PoelmError
from poelm.infer.engine import Engine
from poelm.core.model import ModelConfig, PoEGPT

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, one two three four five six.",
         "Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 20
PHASE = {"name": "b2", "start_step": 0, "steps": 1000, "warmup": 10, "peak": 0.5, "warmdown_ratio": 0.55, "final": 0.0}


def make_ckpt(d: Path, step: int = 100, tokens: int = 1000, seed: int = 0) -> tuple[PoEGPT, object]:
    """A tiny checkpoint dir laid out as poelm.checkpoint.save writes it (no optimizer state).
    The weights are perturbed so the per-stage heads differ (a fresh init zeroes them)."""
    from poelm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=3, n_embd=32, n_head=2, n_kv_head=1, intermediate=64,
                      max_seq_len=64, stage_layers=(1, 1, 1))
    model = PoEGPT(cfg)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"seed": seed}}))
    (d / "meta.json").write_text(json.dumps({"step": step, "rel_step": step, "phase": PHASE, "lrm": 0.5, "tokens": tokens,
                                             "tokens_in_phase": tokens, "train_val_bpb": 2.5}))
    tok.save(d)
    checkpoint.write_manifest(d)
    return model.eval(), tok


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    model, tok = make_ckpt(root / "ckpt")
    out = export_mod.export(root / "ckpt", root / "hf", bounds=[0.5, 0.25])
    handler = Captured()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    transformers.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
            hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    finally:
        tlog.removeHandler(handler)
    return {"root": root, "out": out, "model": model, "tok": tok, "hf": hf, "hf_tok": hf_tok,
            "warnings": [str(w.message) for w in caught] + handler.records}


def prompt_ids(tok, text="Hello world, the quick"):
    return torch.tensor([tok.encode_doc(text)])


def test_no_warnings_on_load(exported):
    assert exported["warnings"] == []
    # the tokenizer is transformers' own class: no remote code for it
    assert type(exported["hf_tok"]).__module__.startswith("transformers.")
    assert type(exported["hf"]).__name__ == "PoelmForCausalLM"


def test_folder_contents_and_config(exported):
    out = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "configuration_poelm.py", "modeling_poelm.py", "model.py", "poe.py", "errors.py", "engine.py",
            "speculative.py", "README.md",
            "poelm_manifest.json"} <= names
    pkg = Path(export_mod.__file__).resolve().parents[1]
    for room, name in [("core", "model.py"), ("core", "poe.py"), ("core", "errors.py"), ("infer", "engine.py"),
                       ("infer", "speculative.py")]:  # verbatim: one source of truth
        assert (out / name).read_bytes() == (pkg / room / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "poelm"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_poelm.PoelmConfig",
                               "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM"}
    assert all(isinstance(v, str) for v in cfg["auto_map"].values())
    mcfg = exported["model"].config.to_dict()
    assert {k: cfg[k] for k in mcfg} == mcfg
    assert (cfg["step"], cfg["rel_step"], cfg["phase_name"], cfg["lrm"], cfg["tokens"]) == (100, 100, "b2", 0.5, 1000)
    assert cfg["phase"] == PHASE
    assert cfg["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]
    assert cfg["poelm_config"]["train"] == {"seed": 0}
    # the manifest covers every other file with its sha256
    man = json.loads((out / "poelm_manifest.json").read_text())
    assert set(man["files"]) == names - {"poelm_manifest.json"}
    assert man["files"]["model.safetensors"]["sha256"] == export_mod.sha256_file(out / "model.safetensors")
    assert (man["step"], man["tokens"], man["lrm"], man["phase"]) == (100, 1000, 0.5, "b2")
    assert export_mod.weights_metadata(out / "model.safetensors")["poelm_step"] == "100"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == exported["tok"].bos_id == gen["eos_token_id"]


def test_config_fields_follow_model_config():
    from poelm.hf.configuration_poelm import MODEL_FIELDS

    assert set(MODEL_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_logits_equal_poelm(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
        z = model.stage_log_probs(ids)
        assert torch.allclose(hf(ids, stages=0).logits, z[0], atol=1e-5, rtol=0)
        prefix2 = torch.log_softmax(z[:2].mean(0), -1)
        assert torch.allclose(hf(ids, stages=range(2)).logits, prefix2, atol=1e-5, rtol=0)
        full = torch.log_softmax(z.mean(0), -1)
        assert torch.allclose(hf(ids).logits, full, atol=1e-5, rtol=0)
        # the logits are normalised log-probs
        assert torch.allclose(hf(ids).logits.exp().sum(-1), torch.ones(ids.shape), atol=1e-5)


def test_loss_is_mean_poe_nll(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    with torch.no_grad():
        out = hf(ids, labels=ids)
        logp = model(ids)
    want = -logp[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    assert abs(out.loss.item() - want.item()) < 1e-5


def greedy_poelm(model, ids, n, eos):
    """poelm greedy decoding without a cache: argmax of the full-K PoE, stop after EOS."""
    x = ids
    for _ in range(n):
        nxt = model(x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
        if nxt.item() == eos:
            break
    return x


def test_generate_greedy_matches_poelm_and_uses_cache(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    lengths = []
    hook = hf.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = hf.generate(ids, max_new_tokens=20, do_sample=False)
    finally:
        hook.remove()
    ref = greedy_poelm(model, ids, 20, eos=tok.bos_id)
    assert out.tolist() == ref.tolist()
    assert out.shape[1] > ids.shape[1] + 5
    # the prompt once, then one token per step: the KV cache carries the past
    assert lengths[0] == ids.shape[1] and set(lengths[1:]) == {1}
    res = Engine(model).generate(ids[0].tolist(), 20, stop_tokens=(tok.bos_id,))
    assert res.tokens[0] == out[0, ids.shape[1]:].tolist()


def test_sampling_with_cache_equals_without(exported):
    hf, tok = exported["hf"], exported["tok"]
    ids = prompt_ids(tok)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(hf.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50, use_cache=use_cache).tolist())
    assert runs[0] == runs[1]


def test_generate_wand_and_speculative_delegate_to_engine(exported):
    hf, model, tok = exported["hf"], exported["model"], exported["tok"]
    ids = prompt_ids(tok)
    wand = hf.generate_wand(ids, max_new_tokens=10)
    assert wand.tokens == Engine(model).generate(ids[0].tolist(), 10, mode="wand", bounds=[0.5, 0.25]).tokens
    spec = hf.generate_speculative(ids, max_new_tokens=10, m=3)
    assert spec.tokens == Engine(model).generate(ids[0].tolist(), 10).tokens  # token-identical to full-K greedy


def test_single_stage_cache_cannot_serve_deeper_forward(exported):
    from transformers import DynamicCache

    hf, tok = exported["hf"], exported["tok"]
    ids = prompt_ids(tok)
    cache = DynamicCache()
    hf(ids, stages=0, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        hf(ids[:, -1:], cache=cache, use_cache=True)


def test_padding_is_refused(exported):
    hf, tok = exported["hf"], exported["tok"]
    ids = prompt_ids(tok)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(ids, attention_mask=mask)


def test_tokenizer_prepends_bos_both_ways(exported):
    hf_tok, tok = exported["hf_tok"], exported["tok"]
    text = "Hello world, the quick brown fox 42."
    want = tok.encode_doc(text)
    assert want[0] == tok.bos_id == hf_tok.bos_token_id
    assert hf_tok(text).input_ids == want
    assert hf_tok.encode(text) == want
    assert [hf_tok.bos_token_id] + hf_tok.encode(text, add_special_tokens=False) == want
    assert hf_tok.decode(want[1:]) == text
    assert hf_tok.decode(want, skip_special_tokens=True) == text
    # a literal "<|bos|>" in user text stays text, as in poelm's tokenizer
    forged = "a <|bos|> b"
    assert hf_tok.encode(forged, add_special_tokens=False) == tok.encode(forged)
    assert tok.bos_id not in tok.encode(forged)


def test_plain_tokenizer_class_loads_offline(exported):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast.from_pretrained(exported["out"])
    assert t.encode("Hello world") == exported["tok"].encode_doc("Hello world")


def test_checkpoint_load_model_reads_export(exported):
    model, tok, meta = checkpoint.load_model(exported["out"])
    ref = exported["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert meta["step"] == 100 and meta["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]


def test_reexport_of_an_export_is_identical_weights(exported, tmp_path):
    out = export_mod.export(exported["out"], tmp_path / "again")
    a = json.loads((exported["out"] / "poelm_manifest.json").read_text())
    b = json.loads((out / "poelm_manifest.json").read_text())
    assert a["files"]["model.safetensors"] == b["files"]["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["poe_wand_p99_bounds_per_stage_head"] == [0.5, 0.25]


def test_export_refusals(exported, tmp_path):
    ckpt = exported["root"] / "ckpt"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PoelmError, match="not an earlier poelm export"):
        export_mod.export(ckpt, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(PoelmError, match="2 finite non-negative"):
        export_mod.export(ckpt, tmp_path / "b", bounds=[1.0])
    with pytest.raises(CheckpointError, match="not found"):
        export_mod.export(tmp_path / "nope", tmp_path / "c")
    # a corrupted checkpoint is never exported
    bad = tmp_path / "bad"
    make_ckpt(bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="manifest"):
        export_mod.export(bad, tmp_path / "d")
    assert not (tmp_path / "d").exists()
