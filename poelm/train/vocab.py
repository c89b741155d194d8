"""Vocabulary extension of a trained PoE checkpoint: every per-token table grows together.

``poelm extend-vocab`` turns a checkpoint with tokenizer T (V_old tokens) into one with an
extended tokenizer T' (``data.vocab_extend``: every old id and merge kept, new ids
``V_old..V_new-1``). The per-token tables are the rows of ``optim_nanochat.VOCAB_ROWS``: the token
embedding ``wte``, the value embeddings ``value_embeds.*``, the shared head ``lm_head`` and every
stage head ``stage_heads.k``. Each grows by ``V_new - V_old`` rows:

* **New rows = mean of the pieces' rows.** A new token's row in every table is the mean of the
  rows of the old tokens that spell it (``vocab_extend.pieces``: the old BPE's segmentation of
  its bytes). This is the "mean of constituent sub-word embeddings" initialisation that Mundra et
  al. 2024 (arXiv 2407.05841, "An Empirical Comparison of Vocabulary Expansion and Initialization
  Approaches for Language Models") find competitive and that keeps new embeddings in the convex
  hull of the old ones; we follow it, and not FOCUS (Dobler & de Melo, EMNLP 2023), whose weights
  over *similar* old tokens come from auxiliary fastText embeddings trained on the new corpus: a
  second model this toolkit does not have. Mundra et al. apply it to input and output embeddings
  alike; so do we, to all K stage heads too.
* **What is exactly kept.** Old rows are copied, so on text whose encoding has no new token the
  hidden states of every stage are bit-identical to the old model's, and so is every old token's
  logit. The head is linear before the soft-cap, so a new token's stage-k *pre-cap* logit
  ``(lm_head + stage_head[k])[new] . norm(h_k)`` is exactly the mean of its pieces' pre-cap
  logits (to fp32 rounding); its capped logit is ``softcap`` of that mean, not the mean of the
  pieces' capped logits (tanh is not linear). The log-probs over the *old* vocabulary
  (renormalised over ids ``< V_old``) equal the old model's; the unrenormalised log-probs are
  lower by the mass the new tokens take, ``log(1 + sum_new exp(l_new) / Z_old)`` per position
  and stage (tests/train/test_vocab.py checks each of these statements).
* **Optimizer state.** Moments of the new rows are zero (``optim_nanochat.resize_vocab_rows``,
  the same zero-padding the reference import uses), step counts are the parameter's own, so
  AdamW's bias correction sees a long-trained parameter whose new rows had zero gradients.
* **Padding.** A poelm checkpoint stores exactly ``vocab_size`` rows (a padding multiple of 1);
  the reference layout pads to a multiple of 64 when it is written (``trajectory.nanochat``,
  ``padded_vocab``), so any extended size stays a multiple of the old padding in either layout.
* **WAND bounds and routing tau** depend on the head, so they are not carried over: the output
  has no ``calibration.json`` and the first ``poelm measure`` recalibrates.
* **Loader position.** Token offsets of the old tokenizer mean nothing in the new one, so each
  source's position is moved back to the start of its current document (at most one document per
  source is seen again) and the state names the new tokenizer.
"""

from __future__ import annotations

import torch

from poelm.core.errors import CheckpointError
from poelm.train.optim_nanochat import VOCAB_ROWS, resize_vocab_rows

INIT = "mean of the old-token pieces (Mundra et al. 2024, arXiv 2407.05841)"


def grow_rows(table: torch.Tensor, pieces: dict[int, list[int]], v_new: int) -> torch.Tensor:
    """``table [V_old, d]`` -> ``[v_new, d]``: old rows copied, row i = mean of ``table[pieces[i]]``."""
    v_old = table.shape[0]
    if sorted(pieces) != list(range(v_old, v_new)):
        raise CheckpointError(f"the new tokens must be ids {v_old}..{v_new - 1} (the table has {v_old} rows)")
    out = torch.empty((v_new, *table.shape[1:]), dtype=table.dtype)
    out[:v_old] = table
    src = table.double()  # the mean in fp64, rounded once
    for i, ps in pieces.items():
        if not ps or max(ps) >= v_old:
            raise CheckpointError(f"new token {i} is not spelled by old tokens ({ps})")
        out[i] = src[ps].mean(0).to(table.dtype)
    return out


def grow_model_state(state: dict, pieces: dict[int, list[int]], v_new: int) -> dict:
    """Every per-token table of a PoEGPT ``state_dict`` grown to ``v_new`` rows (``grow_rows``)."""
    out = dict(state)
    grown = [k for k in state if VOCAB_ROWS.fullmatch(k)]
    if not grown:
        raise CheckpointError("the checkpoint has no token tables (wte, lm_head, stage heads): not a PoE model state")
    for k in grown:
        out[k] = grow_rows(state[k], pieces, v_new)
    return out


def grow_loader_state(state: dict | None, tokenizer_fingerprint: str) -> dict | None:
    """The loader position re-expressed for the new tokenizer: each source at the start of its
    current document (token offsets of the old ids are meaningless in the new ones)."""
    if not state:
        return state
    srcs = [{**s, "tok": 0} for s in state.get("sources", [])]
    return {**state, "tokenizer_fingerprint": tokenizer_fingerprint, "sources": srcs}


def extend_checkpoint(ck, old_tok, new_tok, pieces: dict[int, list[int]], out_dir, record: dict):
    """Write ``out_dir/step-XXXXX`` (same step as ``ck``): the checkpoint ``ck`` with the tokenizer
    ``new_tok`` and every per-token table and its optimizer state grown. ``record`` (json-able) is
    stored in the meta as ``vocab_extension``. Returns the checkpoint path."""
    from poelm import config as config_mod
    from poelm.core.model import PoEGPT
    from poelm.train import checkpoint as ckpt_mod

    v_old, v_new = old_tok.vocab_size, new_tok.vocab_size
    if ck.config.model.vocab_size != v_old:
        raise CheckpointError(f"{ck.path}: model vocab_size {ck.config.model.vocab_size} differs from its tokenizer's {v_old}")
    cfg = config_mod.from_dict(ck.config.to_dict())
    cfg.model.vocab_size = v_new
    config_mod.validate(cfg)
    model = PoEGPT(cfg.model)
    ckpt_mod.load_state_into(model, grow_model_state(ck.model_state, pieces, v_new), f"extended weights of {ck.path}")
    optim = None
    if ck.optim_tensors is not None:
        optim = resize_vocab_rows(ck.optim_tensors, ck.optim_meta, v_new)
    meta = {k: v for k, v in ck.meta.items() if k != "step"}
    meta["loader_state"] = grow_loader_state(meta.get("loader_state"), new_tok.fingerprint)
    meta["vocab_extension"] = {"from_vocab": v_old, "to_vocab": v_new, "new_tokens": v_new - v_old, "init": INIT,
                               "old_tokenizer": old_tok.fingerprint, "new_tokenizer": new_tok.fingerprint, **record}
    return ckpt_mod.save(out_dir, ck.step, model, cfg, new_tok, meta, optim_state=optim, rng=ck.rng)


def check_out(out_dir) -> None:
    """OUT must be new (or an empty folder): extend-vocab never overwrites a run."""
    from pathlib import Path

    p = Path(out_dir)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise CheckpointError(f"{p} already exists and is not empty: give a new OUT directory for the extended checkpoint")


def extend_vocab(ckpt_dir, out_dir, corpus_path=None, new_tokens=None, tokenizer_path=None, max_chars=None, log=None) -> dict:
    """``poelm extend-vocab``: the checkpoint at ``ckpt_dir`` with its vocabulary extended, written
    to ``out_dir/step-XXXXX``. Either ``corpus_path`` + ``new_tokens`` (continued BPE on the
    training split of that corpus, ``data.vocab_extend.continue_bpe``) or ``tokenizer_path`` (a
    tokenizer.json whose vocabulary has the old one as a prefix). Every input is checked before
    the BPE runs or anything is written. Returns a summary dict."""
    import time

    from poelm.config import DataConfig
    from poelm.core.errors import ConfigError
    from poelm.data import corpus
    from poelm.data import vocab_extend as vx
    from poelm.data.tokenizer import Tokenizer
    from poelm.train import checkpoint as ckpt_mod

    if (corpus_path is None) == (tokenizer_path is None):
        raise ConfigError("give exactly one of --from CORPUS (with --new-tokens N) or --tokenizer NEW.json")
    if corpus_path is not None and (not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1):
        raise ConfigError(f"--new-tokens must be a positive integer with --from CORPUS, got {new_tokens!r}")
    check_out(out_dir)
    ck = ckpt_mod.load(ckpt_mod.save_dir(ckpt_dir))
    old = Tokenizer.load(ck.path)
    t0 = time.perf_counter()
    if tokenizer_path is not None:
        new = Tokenizer.load(tokenizer_path)
        vx.check_prefix(old, new, where=f"tokenizer {tokenizer_path}")
        record = {"tokenizer": str(tokenizer_path)}
    else:
        dcfg = DataConfig(path=str(corpus_path), val_fraction=ck.config.data.val_fraction)
        corpus.corpus_files(str(corpus_path))  # a missing corpus fails before the BPE runs
        chars = int(max_chars or ck.config.data.tokenizer_train_chars)
        new = vx.continue_bpe(old, corpus.tokenizer_texts(dcfg, chars), new_tokens)
        vx.check_prefix(old, new)  # by construction; checked all the same
        record = {"corpus": str(corpus_path), "corpus_chars": chars, "asked_tokens": new_tokens}
    pc = vx.pieces(old, new)
    path = extend_checkpoint(ck, old, new, pc, out_dir, record)
    if log:
        log(f"{new.vocab_size - old.vocab_size} new tokens ({old.vocab_size} -> {new.vocab_size}) in {time.perf_counter() - t0:.1f}s")
    return {"checkpoint": str(path), "from_vocab": old.vocab_size, "to_vocab": new.vocab_size,
            "examples": [(new.decode([i]), [old.decode([j]) for j in ps]) for i, ps in list(pc.items())[:5]]}
