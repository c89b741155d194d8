"""poelm.data.tokenizer: byte-level BPE training, specials, byte lengths, determinism, HF interop."""

import json

import pytest
import torch

from poelm.data import corpus as data
from poelm.core.errors import PoelmError
from poelm.data.tokenizer import BOS, SPECIAL_TOKENS, Tokenizer, TokenizerError, train_tokenizer

TEXT = "Naïve café — “quoted” 日本語 🙂 tab\tnew\nline 12345 <|bos|>"


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in zip(range(400), data.read_documents("embedded"))]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, 512)


@pytest.fixture(scope="module")
def bytes_only():
    return train_tokenizer(["x"], 260)  # 4 specials + 256 bytes, no merges


def test_bytes_only_ids_by_hand(bytes_only):
    # ids 0-3 are the specials; then the 256 byte symbols in code-point order of GPT-2's
    # byte->unicode map: '!'..'~' (94), '¡'..'¬' (12), '®'..'ÿ' (82) map to themselves, bytes
    # 0-32,127-160,173 map to U+0100.. in byte order. So '!'=4, 'A'=4+32=36, 'a'=4+64=68,
    # ' '(byte 32, U+0120)=4+188+32=224, 'é'=C3 A9 -> 4+94+12+(0xC3-0xAE)=131, 4+94+(0xA9-0xA1)=106.
    assert bytes_only.vocab_size == 260
    assert [bytes_only.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert bytes_only.bos_id == 0
    assert bytes_only.encode("A! a") == [36, 4, 224, 68]
    assert bytes_only.encode("é") == [131, 106]
    tb = bytes_only.token_bytes()
    assert tb.tolist() == [0, 0, 0, 0] + [1] * 256


def test_roundtrip_and_token_bytes(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (tok.vocab_size,)
    assert int(tb[torch.tensor(ids)].sum()) == len(TEXT.encode("utf-8"))
    assert tb[tok.special_ids].tolist() == [0, 0, 0, 0]
    # a merged token: its byte count is the length of the text it decodes to
    merged = max(range(tok.vocab_size), key=lambda i: int(tb[i]))
    assert int(tb[merged]) == len(tok.decode([merged]).encode("utf-8")) > 1


def test_every_byte_sequence_encodes(tok):
    s = "".join(chr(c) for c in range(1, 600)) + "\U0001F600\x00"
    assert tok.decode(tok.encode(s)) == s


def test_specials_bos_and_decode(tok):
    assert tok.vocab_size == 512
    assert tok.bos_id == 0 and tok.id_to_token(0) == BOS
    doc = tok.encode_doc("hello world")
    assert doc[0] == 0 and doc[1:] == tok.encode("hello world")
    # the literal string "<|bos|>" in user text is plain text, never the BOS id
    assert not set(tok.encode("<|bos|>")) & set(tok.special_ids)
    assert tok.decode(doc) == "<|bos|>hello world"
    assert tok.decode(doc, skip_special=True) == "hello world"
    assert tok.decode(torch.tensor(doc)) == "<|bos|>hello world"
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]


def test_deterministic_training(texts, tok):
    again = train_tokenizer(list(texts), 512)
    assert again.to_json() == tok.to_json()
    assert again.fingerprint == tok.fingerprint
    other = train_tokenizer(texts[:200], 512)
    assert other.fingerprint != tok.fingerprint


def test_save_load_roundtrip(tok, tmp_path):
    path = tok.save(tmp_path / "ck")
    assert path == tmp_path / "ck" / "tokenizer.json"
    for src in (tmp_path / "ck", path):
        back = Tokenizer.load(src)
        assert back.fingerprint == tok.fingerprint
        assert back.encode(TEXT) == tok.encode(TEXT)
        assert torch.equal(back.token_bytes(), tok.token_bytes())
    # the fingerprint ignores JSON formatting
    compact = json.dumps(json.loads(path.read_text()))
    assert Tokenizer.from_json(compact).fingerprint == tok.fingerprint


def test_transformers_loads_saved_file(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS)
    plain = "Naïve café — “quoted” 日本語 🙂 tab\tnew\nline 12345"
    assert hf.encode(plain, add_special_tokens=False) == tok.encode(plain)
    assert hf.bos_token_id == 0
    assert hf.decode(tok.encode(plain)) == plain
    mine = tok.hf_tokenizer()
    assert mine.bos_token_id == 0 and mine.pad_token_id == 1
    assert mine.encode(plain, add_special_tokens=False) == tok.encode(plain)


def test_load_errors(tmp_path, bytes_only):
    with pytest.raises(TokenizerError, match="tokenizer file not found: .*nope"):
        Tokenizer.load(tmp_path / "nope")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(PoelmError, match="corrupt tokenizer file .*bad"):
        Tokenizer.load(bad.parent)
    # a valid tokenizer.json without <|bos|> is not ours
    j = json.loads(bytes_only.to_json())
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] != BOS]
    del j["model"]["vocab"][BOS]
    nobos = tmp_path / "nobos.json"
    nobos.write_text(json.dumps(j))
    with pytest.raises(TokenizerError, match="no <\\|bos\\|> token"):
        Tokenizer.load(nobos)
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["abc"], 259)
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([], 300)
