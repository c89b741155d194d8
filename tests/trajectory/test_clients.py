"""Real clients, unchanged, on an exported branch: ``transformers.pipeline("text-generation")``
and lm-evaluation-harness's ``hf`` model (loglikelihood and greedy generate_until requests, and a
local task over ``tests/trajectory/clients_tiny.jsonl`` through ``lm_eval.simple_evaluate``). The
loglikelihood lm_eval reports must equal poelm's full-K PoE log-probability of the continuation.

lm_eval is optional (``pip install lm_eval``, ~35 s, ~330 MB with datasets/evaluate); its tests
skip when it is absent. Everything runs offline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Offline before any Hugging Face library reads its settings (no network in CI anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="poelm-hf-datasets-"))

import pytest
import torch

from poelm.trajectory import export as export_mod
from test_export import make_ckpt

DATA = Path(__file__).parent / "clients_tiny.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
MAX_NEW = 8


@pytest.fixture(scope="module")
def branch(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    model, tok = make_ckpt(root / "ckpt")
    out = export_mod.export(root / "ckpt", root / "hf")
    return {"dir": out, "model": model, "tok": tok}


@torch.no_grad()
def poe_logprob(model, ctx_ids: list[int], cont_ids: list[int]) -> float:
    """sum_t log p_PoE(cont_t | ctx, cont_<t), full K, alpha = 0 (``PoEGPT.forward``)."""
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = model(ids)[0]  # [T, V] renormalised PoE log-probs
    n = len(ctx_ids)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(cont_ids)))


@torch.no_grad()
def poe_greedy(model, ids: list[int], n: int, stop: int) -> list[int]:
    """Greedy decoding by full recomputation (independent of any cache): argmax of the PoE."""
    ids, new = list(ids), []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == stop:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def test_pipeline_text_generation(branch):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(branch["dir"]), trust_remote_code=True, device="cpu")
    tok, model = branch["tok"], branch["model"]
    for row in ROWS[:2]:
        out = pipe(row["context"], max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)
        want = tok.decode(poe_greedy(model, tok.encode_doc(row["context"]), MAX_NEW, tok.bos_id))
        assert out[0]["generated_text"] == want


def test_pipeline_batch_of_three_prompt_lengths(branch):
    """``pipeline(..., batch_size=3)`` left-pads prompts of three lengths into one generate()
    call; every output is that prompt's own greedy PoE continuation, in every PoE mode."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(branch["dir"]), trust_remote_code=True, device="cpu")
    tok, model = branch["tok"], branch["model"]
    texts = ["Hello", "The quick brown fox jumps over the lazy", "Lorem ipsum dolor"]
    assert len({len(tok.encode_doc(t)) for t in texts}) == 3
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        outs = pipe(texts, batch_size=3, max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)
    finally:
        hook.remove()
    assert calls[0][0] == 3  # one batch of three, not three batches
    want = [tok.decode(poe_greedy(model, tok.encode_doc(t), MAX_NEW, tok.bos_id)) for t in texts]
    assert [o[0]["generated_text"] for o in outs] == want
    spec = pipe(texts, batch_size=3, max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False, poe_mode="speculative")
    assert [o[0]["generated_text"] for o in spec] == want


@pytest.fixture(scope="module")
def hflm(branch):
    pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install 'lm_eval[hf]')")
    pytest.importorskip("accelerate", reason="lm_eval's hf model needs accelerate (pip install 'lm_eval[hf]')")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(branch["dir"]), trust_remote_code=True, device="cpu", batch_size=1, dtype="float32")


def test_lm_eval_loglikelihood_equals_poe(branch, hflm):
    """Each request's loglikelihood is poelm's PoE sum over the continuation tokens lm_eval itself
    encoded (BOS first; a trailing context space moves into the continuation). The rows' full
    token sequences are distinct on purpose: lm_eval 0.4.13 reuses one forward for requests with
    the same full sequence and then scores a differently split one wrongly (a stock GPT-2 shows
    it too), which is lm_eval's behaviour, not the model's."""
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", r, (r["context"], r["continuation"]), i) for i, r in enumerate(ROWS)]
    got = hflm.loglikelihood(reqs)
    tok = branch["tok"]
    for r, (ll, greedy) in zip(ROWS, got):
        ctx, cont = hflm._encode_pair(r["context"], r["continuation"])
        assert ctx[0] == tok.bos_id and ctx[1:] == tok.encode(r["context"].rstrip(" "))  # BOS, then the text
        assert ll == pytest.approx(poe_logprob(branch["model"], ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_lm_eval_batch_of_four_equals_batch_of_one(branch, hflm):
    """lm_eval's batched requests (right-padded loglikelihood batches, left-padded generate_until
    batches) give exactly the batch-size-1 answers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf4 = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, device="cpu", batch_size=4)
    assert hf4.batch_size == 4
    rows = ROWS * 2  # 8 requests of 4 lengths: two batches of four
    ll = [Instance("loglikelihood", r, (r["context"], r["continuation"]), i) for i, r in enumerate(rows)]
    one, four = hflm.loglikelihood(ll), hf4.loglikelihood(ll)
    for (a, ga), (b, gb) in zip(one, four):
        assert b == pytest.approx(a, abs=1e-4) and ga == gb
    gen = [Instance("generate_until", r, (r["context"], {"until": ["\n"], "max_gen_toks": MAX_NEW, "do_sample": False}), i)
           for i, r in enumerate(rows)]
    assert hf4.generate_until(gen) == hflm.generate_until(gen)


def test_lm_eval_generate_until_is_poe_greedy(branch, hflm):
    from lm_eval.api.instance import Instance

    reqs = [Instance("generate_until", r, (r["context"], {"until": ["\n"], "max_gen_toks": MAX_NEW, "do_sample": False}), i)
            for i, r in enumerate(ROWS)]
    got = hflm.generate_until(reqs)
    tok = branch["tok"]
    for r, text in zip(ROWS, got):
        want = tok.decode(poe_greedy(branch["model"], tok.encode_doc(r["context"]), MAX_NEW, tok.bos_id)).split("\n")[0]
        assert text == want


TASKS = """
task: poelm_tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""
GEN_TASK = """
task: poelm_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {n}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_simple_evaluate_local_task(branch, hflm, tmp_path):
    """The command-line path (``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True
    --tasks ... --include_path ...``) through ``simple_evaluate`` on a local task: both request
    types run and the logged loglikelihoods are poelm's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    (tmp_path / "ll.yaml").write_text(TASKS.format(data=DATA))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=DATA, n=MAX_NEW))
    res = simple_evaluate(model="hf", model_args=f"pretrained={branch['dir']},trust_remote_code=True,dtype=float32",
                          tasks=["poelm_tiny_ll", "poelm_tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
                          device="cpu", batch_size=1, log_samples=True)
    assert set(res["results"]) == {"poelm_tiny_ll", "poelm_tiny_gen"}
    samples = res["samples"]["poelm_tiny_ll"]
    assert len(samples) == len(ROWS)
    for s in samples:
        ll = s["resps"][0][0][0]
        ctx, cont = hflm._encode_pair(s["doc"]["context"], s["doc"]["continuation"])
        assert float(ll) == pytest.approx(poe_logprob(branch["model"], ctx, cont), abs=1e-4)
    assert len(res["samples"]["poelm_tiny_gen"]) == len(ROWS)
