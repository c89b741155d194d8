"""``poelm extend-vocab``: continued BPE keeps the old ids; every per-token table grows; what the
extended model computes before any step (poelm/train/vocab.py states each equality tested here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from poelm.core.model import norm
from poelm.core.poe import softcap
from poelm.data import vocab_extend as vx
from poelm.data.tokenizer import Tokenizer
from poelm.train import checkpoint as ckpt_mod
from poelm.train import loop
from poelm.train.vocab import extend_vocab

CODE = [  # a tiny "new domain": Python source, repeated so that merges have counts >= 2
    "def add(self, other):\n    return self.value + other.value\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
] * 8
PLAIN = "The Devil is an old man. He laughed and said nothing at all."


@pytest.fixture(scope="module")
def ext(tmp_path_factory, tiny_seed):
    root = tmp_path_factory.mktemp("vocab")
    code = root / "code.jsonl"
    code.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    out = root / "ext"
    s = extend_vocab(tiny_seed.parent, out, corpus_path=str(code), new_tokens=24, max_chars=10**6)
    return tiny_seed, Path(s["checkpoint"]), code, root


def test_continued_bpe_keeps_every_old_id_and_merge(ext):
    src, dst, _, _ = ext
    old, new = Tokenizer.load(src), Tokenizer.load(dst)
    assert new.vocab_size == old.vocab_size + 24
    vx.check_prefix(old, new)  # raises on any renumbering
    for i in range(old.vocab_size):
        assert new.id_to_token(i) == old.id_to_token(i)
    assert new.encode(PLAIN) == old.encode(PLAIN)  # no new merge fires in plain prose
    ids = new.encode(CODE[0])
    assert max(ids) >= old.vocab_size and len(ids) < len(old.encode(CODE[0]))
    assert new.decode(ids) == CODE[0]
    pc = vx.pieces(old, new)
    for i, ps in pc.items():  # the pieces spell the token
        assert old.decode(ps) == new.decode([i]) and max(ps) < old.vocab_size


def test_tables_and_optimizer_rows_grow_together(ext):
    src, dst, _, _ = ext
    a, b = ckpt_mod.load(src), ckpt_mod.load(dst)
    V0, V1 = a.config.model.vocab_size, b.config.model.vocab_size
    assert V1 == V0 + 24
    grown = [k for k in a.model_state if a.model_state[k].shape[:1] == (V0,)]
    assert {"wte.weight", "lm_head.weight", "stage_heads.0.weight", "stage_heads.1.weight"} <= set(grown)
    assert any(k.startswith("value_embeds.") for k in grown)
    pc = vx.pieces(Tokenizer.load(src), Tokenizer.load(dst))
    for k, t in a.model_state.items():
        u = b.model_state[k]
        if k in grown:
            assert u.shape[0] == V1 and torch.equal(u[:V0], t)
            for i, ps in pc.items():
                torch.testing.assert_close(u[i], t[ps].double().mean(0).float(), rtol=0, atol=1e-7)
        else:
            assert torch.equal(u, t)
    for key, t in a.optim_tensors.items():
        u = b.optim_tensors[key]
        if key.split("/")[0] in grown:
            assert u.shape[0] == V1 and torch.equal(u[:V0], t) and not u[V0:].any()
        else:
            assert torch.equal(u, t)
    assert b.optim_meta["params"]["wte.weight"]["shape"][0] == V1
    assert b.meta["vocab_extension"]["new_tokens"] == 24 and "Mundra" in b.meta["vocab_extension"]["init"]
    assert b.meta["loader_state"]["tokenizer_fingerprint"] == Tokenizer.load(dst).fingerprint
    assert not (dst / "calibration.json").exists()  # WAND bounds are recomputed by the first measure


def test_log_probs_before_any_step(ext):
    src, dst, _, _ = ext
    m0, tok0, _ = ckpt_mod.load_model(src)
    m1, tok1, _ = ckpt_mod.load_model(dst)
    V0 = tok0.vocab_size
    idx = torch.tensor([tok1.encode_doc(PLAIN)])
    assert idx.max() < V0
    with torch.no_grad():
        h0, h1 = m0.hiddens(idx), m1.hiddens(idx)
        for k in range(len(h0)):
            assert torch.equal(h0[k], h1[k])  # old ids: same embeddings, same trunk
            l0, l1 = m0.stage_logits(k, h0[k]), m1.stage_logits(k, h1[k])
            torch.testing.assert_close(l1[..., :V0], l0, rtol=0, atol=1e-5)
            # log-probs over the old vocabulary: the old model's
            z0 = F.log_softmax(l0, -1)
            torch.testing.assert_close(F.log_softmax(l1[..., :V0], -1), z0, rtol=0, atol=1e-5)
            # unrenormalised: lower by exactly the new tokens' mass
            z1 = F.log_softmax(l1, -1)[..., :V0]
            mass = torch.logsumexp(l1[..., V0:], -1) - torch.logsumexp(l0, -1)
            torch.testing.assert_close(z0 - z1, F.softplus(mass)[..., None].expand_as(z0), rtol=0, atol=1e-5)
        # full K (PoE) over the old vocabulary: the old model's
        torch.testing.assert_close(m1(idx)[..., :V0].log_softmax(-1), m0(idx), rtol=0, atol=1e-5)


def test_new_token_logit_is_mean_of_pieces_before_softcap(ext):
    src, dst, _, _ = ext
    m1, tok1, _ = ckpt_mod.load_model(dst)
    pc = vx.pieces(Tokenizer.load(src), tok1)
    new, ps = next((i, p) for i, p in pc.items() if len(p) >= 2)
    idx = torch.tensor([tok1.encode_doc(CODE[1])])
    with torch.no_grad():
        for k, h in enumerate(m1.hiddens(idx)):
            W = m1.lm_head.weight + m1.stage_heads[k].weight
            pre = F.linear(norm(h), W)  # stage k's logits before the soft-cap
            torch.testing.assert_close(pre[..., new], pre[..., ps].mean(-1), rtol=0, atol=1e-5)
            capped = m1.stage_logits(k, h)
            torch.testing.assert_close(capped[..., new], softcap(pre[..., ps].mean(-1), m1.config.softcap), rtol=0, atol=1e-5)
            assert (pre[..., ps].abs() > 0).all()


def test_extended_checkpoint_continues(ext, tmp_path):
    _, dst, _, _ = ext
    s = loop.continue_phase(dst, tmp_path / "cont", steps=1, progress=False, overrides=["train.save_every=1"])
    ck = ckpt_mod.load(ckpt_mod.latest(tmp_path / "cont"))
    assert ck.config.model.vocab_size == ckpt_mod.load(dst).config.model.vocab_size and s["step"] == ck.step


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "poelm", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_bad_inputs_one_line_exit_2_nothing_written(ext, tmp_path):
    src, dst, code, root = ext
    old = Tokenizer.load(src)
    # a tokenizer that renumbers old ids: swap two byte tokens
    j = json.loads(Tokenizer.load(dst).to_json())
    v = j["model"]["vocab"]
    a, b = old.id_to_token(10), old.id_to_token(11)
    v[a], v[b] = v[b], v[a]
    bad = tmp_path / "renumbered.json"
    bad.write_text(json.dumps(j))
    plain = tmp_path / "plain.txt"
    plain.write_text("zq xj\n")
    for args, words in [((src, tmp_path / "o1", "--tokenizer", bad), "renumbers"),
                        ((src, tmp_path / "o2", "--tokenizer", src / "tokenizer.json"), "adds no token"),
                        ((src, tmp_path / "o3", "--from", plain, "--new-tokens", "8"), "no new token"),
                        ((src, tmp_path / "o4", "--from", code), "--new-tokens"),
                        ((src, dst.parent, "--from", code, "--new-tokens", "8"), "not empty")]:
        r = _cli("extend-vocab", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        if args[1] != dst.parent:
            assert not Path(args[1]).exists()


def test_tokenizer_path_gives_the_same_checkpoint(ext, tmp_path):
    src, dst, _, _ = ext
    s = extend_vocab(src, tmp_path / "via-json", tokenizer_path=dst / "tokenizer.json")
    a, b = ckpt_mod.load(dst), ckpt_mod.load(Path(s["checkpoint"]))
    assert Tokenizer.load(b.path).fingerprint == Tokenizer.load(dst).fingerprint
    for k, t in a.model_state.items():
        assert torch.equal(t, b.model_state[k])
    assert b.meta["vocab_extension"]["tokenizer"] == str(dst / "tokenizer.json")


def test_continued_bpe_is_deterministic(ext):
    from poelm.config import DataConfig
    from poelm.data.corpus import tokenizer_texts

    src, dst, code, _ = ext
    texts = tokenizer_texts(DataConfig(path=str(code), val_fraction=ckpt_mod.load(src).config.data.val_fraction), 10**6)
    assert vx.continue_bpe(Tokenizer.load(src), texts, 24).fingerprint == Tokenizer.load(dst).fingerprint
