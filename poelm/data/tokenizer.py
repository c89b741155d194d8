"""Byte-level BPE tokenizer: train, save/load, BOS handling, token byte lengths.

The tokenizer is a Hugging Face ``tokenizers`` BPE with the GPT-2 byte-to-unicode alphabet
(Radford et al. 2019), so any byte string encodes and ``tokenizer.json`` loads unchanged in
``transformers.PreTrainedTokenizerFast``. Design:

* **Pre-tokenisation**: text is first split with the GPT-4 (``cl100k``) pattern, digits grouped by
  at most two as in nanochat (a small vocabulary should not spend merges on 3-digit numbers), then
  mapped to byte-level symbols (``ByteLevel(use_regex=False)``, no prefix space).
* **Vocabulary**: ids ``0..3`` are the specials ``<|bos|>`` (document start, id 0), ``<|pad|>``
  and ``<|reserved_0|>``, ``<|reserved_1|>`` (kept free for later use without changing ids), then
  the 256 byte symbols (``BpeTrainer(initial_alphabet=ByteLevel.alphabet())``), then merges. So
  the smallest vocabulary is 260, the limit ``config.validate`` enforces. The trainer stops early
  if the texts support fewer merges; ``vocab_size`` reports the real size.
* **Determinism**: ``BpeTrainer`` picks the most frequent pair and breaks ties by pair ids, all of
  which follow from the texts, so the same texts give a byte-identical ``tokenizer.json``.
* **Specials in text**: ``encode`` treats the literal string ``<|bos|>`` in user text as plain
  text (``encode_special_tokens = True``): a document can never forge a BOS. Only
  ``encode_doc`` inserts one.
* **Fingerprint**: sha256 of the canonical JSON of (tokens by id, merges, special tokens); the
  same for a tokenizer and its save/load round trip, and independent of JSON formatting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from poelm.core.errors import PoelmError
from poelm.fsio import atomic_write_text

BOS = "<|bos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, PAD, "<|reserved_0|>", "<|reserved_1|>"]
FILENAME = "tokenizer.json"

# GPT-4 cl100k split pattern with \p{N}{1,2} instead of {1,3} (as nanochat's tokenizer.py).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class TokenizerError(PoelmError):
    pass


def _byte_symbols() -> dict[str, int]:
    """GPT-2's reversible byte -> printable unicode map, inverted: symbol -> byte value.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in byte
    order (Radford et al. 2019, ``bytes_to_unicode``); ``ByteLevel`` uses exactly this table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    sym, n = {}, 0
    for b in range(256):
        if b in keep:
            sym[chr(b)] = b
        else:
            sym[chr(256 + n)] = b
            n += 1
    return sym


BYTE_SYMBOLS = _byte_symbols()


def _new_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Fit a byte-level BPE of at most ``vocab_size`` tokens (specials included) on ``texts``."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    seen = [0]

    def counted():
        for t in texts:
            seen[0] += len(t)
            yield t

    tok = _new_backend()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(counted(), trainer)
    if seen[0] == 0:
        raise TokenizerError("no text to train the tokenizer on: the training split is empty")
    return Tokenizer(tok)


class Tokenizer:
    """A trained byte-level BPE (wraps ``tokenizers.Tokenizer``); see the module docstring."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "tokenizer"):
        self._tok = backend
        self._tok.encode_special_tokens = True  # user text never produces special ids
        bos = backend.token_to_id(BOS)
        if bos is None:
            raise TokenizerError(f"{source} has no {BOS} token: not a poelm tokenizer (retrain it with poelm)")
        if not isinstance(backend.decoder, decoders.ByteLevel):
            kind = type(backend.decoder).__name__ if backend.decoder is not None else "none"
            raise TokenizerError(f"{source} is not a byte-level BPE (decoder {kind}): poelm needs its own tokenizer.json")
        self.bos_id = bos
        self._specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        self._token_bytes = None
        self._fingerprint = None

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load ``tokenizer.json`` from a file or a directory holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        if not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p} (train one with `poelm train` or point to a checkpoint dir)")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {p}: {e}") from None
        return cls.from_json(text, source=str(p))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer.json") -> "Tokenizer":
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises a bare Exception on bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"corrupt tokenizer file {source}: {first}") from None
        return cls(backend, source=source)

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    def save(self, directory) -> Path:
        """Write ``<directory>/tokenizer.json`` atomically; returns its path."""
        p = Path(directory) / FILENAME
        atomic_write_text(p, self.to_json())
        return p

    # --------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` over many texts (parallel in the Rust backend)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_doc(self, text: str) -> list[int]:
        """``[bos_id] + encode(text)``: a document as the model sees it in training."""
        return [self.bos_id] + self.encode(text)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ``ids``; specials decode to their own strings unless ``skip_special``.

        Invalid UTF-8 (a token sequence cut inside a character) becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        return sorted(self._tok.token_to_id(t) for t in self._specials)

    def token_bytes(self) -> torch.Tensor:
        """LongTensor[V]: UTF-8 bytes each token stands for; 0 for special tokens.

        Used by bits-per-byte (SPEC): sum(token_bytes[targets]) == len(text.encode()) for the
        targets of any encoded text, because byte-level tokens partition the text's bytes."""
        if self._token_bytes is None:
            out = torch.zeros(self.vocab_size, dtype=torch.long)
            for tok, i in self._tok.get_vocab(with_added_tokens=True).items():
                if tok in self._specials:
                    continue
                if not all(c in BYTE_SYMBOLS for c in tok):
                    raise TokenizerError(f"token {i} {tok!r} is not made of byte-level symbols: not a poelm tokenizer")
                out[i] = len(tok)  # one symbol per byte
            self._token_bytes = out
        return self._token_bytes.clone()

    @property
    def fingerprint(self) -> str:
        """sha256 over canonical (tokens by id, merges, specials): equal iff encodings are equal."""
        if self._fingerprint is None:
            j = json.loads(self._tok.to_str())
            vocab = j["model"]["vocab"]
            merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in j["model"]["merges"]]
            specials = sorted((t["id"], t["content"]) for t in j["added_tokens"])
            canon = {"tokens": sorted(vocab, key=vocab.get), "merges": merges, "specials": specials}
            blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    def hf_tokenizer(self):
        """A ``transformers.PreTrainedTokenizerFast`` over the same tokenizer.json
        (``bos_token="<|bos|>"``, ``pad_token="<|pad|>"``); it adds no BOS by itself, so prepend
        ``bos_token_id`` as the model card does."""
        from transformers import PreTrainedTokenizerFast

        backend = tokenizers.Tokenizer.from_str(self._tok.to_str())
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, pad_token=PAD)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"
