"""The measurement and calibration slices of ``poelm measure`` (the rules: ``run.py``'s docstring, SPEC "Slices")."""

from __future__ import annotations

import torch

from poelm.core.errors import DataError, PoelmError


# ----------------------------------------------------------------------------- slices
def cut_slices(tokens: torch.Tensor, split_tokens: int, calib_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(measurement slice of split+1 tokens, calibration slice of calib+1 tokens or None) from the
    front of one stream; a stream too short for both is fitted by ``data.slice_sizes`` (the
    measurement slice never depends on ``calib_tokens``)."""
    from poelm.data.corpus import slice_sizes

    a, b = slice_sizes(int(tokens.numel()), [split_tokens + 1, calib_tokens + 1 if calib_tokens > 0 else 0])
    if a < 2:
        raise DataError(f"only {tokens.numel()} tokens to measure on: need at least 2")
    return tokens[:a], (tokens[a:a + b] if b >= 2 else None)


def corpus_tokens(path: str, tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of ``[BOS] + encode(doc)`` over the documents of a txt / jsonl /
    parquet corpus (``data.read_documents``, file order): ``--data`` measures on it (read
    ``data.stream_need`` tokens, so that the cut does not depend on the calibration size)."""
    from poelm.data.corpus import read_documents

    out, have = [], 0
    for text in read_documents(path):
        ids = tokenizer.encode_doc(text)
        out.append(torch.tensor(ids, dtype=torch.long))
        have += len(ids)
        if have >= n:
            break
    if not out:
        raise DataError(f"no documents in {path}")
    return torch.cat(out)[:n]


def validation_slices(meta: dict, tokenizer, split_tokens: int, calib_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The measurement and calibration slices of the checkpoint's own validation split
    (``data.val_slices``; fitted into a single source's split when it is shorter)."""
    from poelm import config as config_mod
    from poelm.data.corpus import val_slices

    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise PoelmError("this checkpoint carries no poelm config (its data settings are unknown): measure it with --data PATH")
    data_cfg = config_mod.from_dict(cfg).data
    sizes = [split_tokens + 1] + ([calib_tokens + 1] if calib_tokens > 0 else [])
    got = val_slices(data_cfg, tokenizer, sizes, allow_fewer=True)
    if got[0].numel() < 2:
        raise DataError(f"only {got[0].numel()} validation tokens to measure on: need at least 2")
    return got[0], (got[1] if len(got) > 1 and got[1].numel() >= 2 else None)
