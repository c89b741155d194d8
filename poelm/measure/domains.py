"""BPB on named slices (``poelm measure --slice NAME=PATH``): gain on a new domain, retention on the old.

A domain-adaptive continue (``poelm continue --add-data``) is judged on two slices at once: the
new domain (BPB should fall) and the old mix (BPB should not rise much: retention). Models with
different tokenizers (``poelm extend-vocab``) are compared too, so the paired unit here is the
*document*, not the token position: each slice is the first documents of the corpus's
validation split (``data.is_val``, the split rule training uses, with the run's
``val_fraction``) up to a byte budget, every model scores each document on its own, and the
bootstrap resamples documents (the same resampled documents for both sides of a delta). BPB per
SPEC: full-K NLL in nats over the target tokens / (ln 2 x their UTF-8 bytes); BOS costs 0 bytes.

Scoring a document: ``[BOS] + encode(text)`` cut into consecutive windows of ``seq_len`` targets
(each window starts fresh: no context from the previous one, as the validation batches of
training), so a model's BPB here does not depend on the other documents of the slice.

Figures per slice and model: ``bpb`` and ``tokens_per_byte`` (targets per UTF-8 byte: the
tokenizer's compression of that domain); against a reference (the seed): ``delta_bpb`` = BPB(model)
- BPB(ref) with its paired 95% bootstrap interval. ``gain`` on a slice = -delta_bpb; ``retention``
on the old slice = delta_bpb (positive = forgetting).
"""

from __future__ import annotations

import numpy as np
import torch

from poelm.core.errors import DataError, PoelmError
from poelm.measure.bootstrap import DEFAULT_SAMPLES, bootstrap, difference_stat, interval
from poelm.core.poe import LN2

COLS = ("nll", "bytes", "tokens")  # per-document sums


def parse_slices(items) -> dict[str, str]:
    """``["old=embedded", "new=code.jsonl"]`` -> ``{"old": "embedded", "new": "code.jsonl"}``."""
    out = {}
    for it in items or []:
        name, sep, path = str(it).partition("=")
        if not sep or not name or not path:
            raise PoelmError(f"--slice {it!r}: give NAME=PATH (a txt/jsonl/parquet corpus or 'embedded')")
        if name in out:
            raise PoelmError(f"--slice name {name!r} is given twice: every slice needs its own name")
        out[name] = path
    return out


def slice_docs(path: str, val_fraction: float, max_bytes: int) -> list[str]:
    """The first validation-split documents of ``path`` (file order) up to ``max_bytes`` bytes."""
    from poelm.data.corpus import is_val, read_documents

    docs, have = [], 0
    for text in read_documents(path):
        if not is_val(text, val_fraction):
            continue
        docs.append(text)
        have += len(text.encode("utf-8"))
        if have >= max_bytes:
            break
    if not docs:
        raise DataError(f"slice {path}: no document falls in the validation split (val_fraction {val_fraction}); give a larger corpus")
    return docs


MIX = "mix"  # --slice NAME=mix: the validation split of the training mix itself


def mix_docs(data_cfg: dict, max_bytes: int) -> list[str]:
    """The validation documents of a run's training mix (``data`` of its config.json): each
    source's first validation documents up to its weight's share of ``max_bytes``."""
    from poelm import config as config_mod
    from poelm.data.corpus import resolve_sources

    dc = config_mod.from_dict({"data": data_cfg}).data
    out = []
    for s in resolve_sources(dc):
        out += slice_docs(s.path, dc.val_fraction, max(1, round(max_bytes * s.weight)))
    return out


@torch.no_grad()
def doc_sums(model, tokenizer, docs: list[str], seq_len: int, device="cpu", batch_size: int = 16) -> np.ndarray:
    """``[n_docs, 3]``: per document the full-K NLL (nats), target bytes and target count.

    Windows are batched longest first, shorter ones padded on the right: every op of the model is
    causal (attention, sliding windows, the smear of the previous token), so a position never
    sees the padding after it and batching changes no figure (the padded targets are dropped)."""
    tb = tokenizer.token_bytes()
    windows: list[tuple[int, torch.Tensor]] = []
    rows = np.zeros((len(docs), len(COLS)), dtype=np.float64)
    for d, text in enumerate(docs):
        ids = torch.tensor(tokenizer.encode_doc(text), dtype=torch.long)
        rows[d, 1], rows[d, 2] = float(tb[ids[1:]].sum()), float(ids.numel() - 1)
        windows += [(d, ids[s:s + seq_len + 1]) for s in range(0, ids.numel() - 1, seq_len)]
    windows.sort(key=lambda dw: -dw[1].numel())
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        L = chunk[0][1].numel()
        b = torch.zeros((len(chunk), L), dtype=torch.long)
        keep = torch.zeros((len(chunk), L - 1), dtype=torch.bool)
        for j, (_, w) in enumerate(chunk):
            b[j, :w.numel()], keep[j, :w.numel() - 1] = w, True
        b = b.to(device)
        lp = model(b[:, :-1])  # full-K PoE log-probs [B, T, V]
        nll = -(lp.float().gather(-1, b[:, 1:, None])[..., 0].cpu() * keep).sum(-1).double()
        for (d, _), v in zip(chunk, nll.tolist()):
            rows[d, 0] += v
    return rows


def figures(sums: np.ndarray) -> dict:
    """``{"bpb", "tokens_per_byte", "docs", "bytes"}`` of one model on one slice."""
    t = sums.sum(0)
    return {"bpb": float(t[0] / (LN2 * t[1])), "tokens_per_byte": float(t[2] / t[1]), "docs": int(sums.shape[0]), "bytes": int(t[1])}


def paired_delta(a: np.ndarray, b: np.ndarray, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> dict:
    """BPB(a) - BPB(b) over the same documents, with a paired document-bootstrap 95% interval."""
    if a.shape[0] != b.shape[0] or not np.array_equal(a[:, 1], b[:, 1]):
        raise PoelmError("paired BPB needs the same documents on both sides (same slice, same byte counts)")
    blocks = np.hstack([a, b])
    k = len(COLS)
    stat = difference_stat([(0, 1, 1 / LN2)], [(k, k + 1, 1 / LN2)])
    p, lo, hi = bootstrap(stat, blocks, samples, seed)
    return interval(p[0], lo[0], hi[0])


def measure_slices(model, tokenizer, slices: dict[str, list[str]], seq_len: int, device="cpu") -> dict[str, np.ndarray]:
    return {name: doc_sums(model, tokenizer, docs, seq_len, device) for name, docs in slices.items()}


def domain_record(label: str, sums: dict[str, np.ndarray], ref_sums: dict[str, np.ndarray] | None = None,
                  samples: int = DEFAULT_SAMPLES, seed: int = 0) -> dict:
    """The record of one model on every slice, with paired deltas against ``ref_sums``."""
    out = {"target": label, "slices": {}}
    for name, s in sums.items():
        f = figures(s)
        if ref_sums is not None:
            f["delta_bpb"] = paired_delta(s, ref_sums[name], samples, seed)
        out["slices"][name] = f
    return out


def measure_targets(target_texts: list[str], slices: dict[str, str], against: str | None = None, max_bytes: int = 262_144,
                    seq_len: int | None = None, device: str = "auto", samples: int = DEFAULT_SAMPLES, seed: int = 0) -> dict:
    """``poelm measure TARGET... --slice NAME=PATH [--against REF]``: every TARGET (and REF) on every
    slice; with REF, paired deltas. The slices' documents are cut once (from the validation split at
    the first model's ``val_fraction``) and scored by every model with its own tokenizer."""
    import tempfile

    from poelm import targets
    from poelm.train.checkpoint import load_model
    from poelm.train.runtime import pick_device

    if not slices:
        raise PoelmError("give at least one --slice NAME=PATH")
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="poelm-slices-") as work:
        resolved = [targets.resolve(t, f"{work}/{i}") for i, t in enumerate(target_texts)]  # every TARGET before any compute
        ref_t = targets.resolve(against, f"{work}/ref") if against else None
        docs = None
        recs, ref_sums, ref_rec = [], None, None
        for t in ([ref_t] if ref_t else []) + resolved:
            model, tok, meta = load_model(t.path, device=dev)
            cfg = meta.get("config") or {}
            if docs is None:  # the reference's (else the first TARGET's) split rule and mix
                vf = float((cfg.get("data") or {}).get("val_fraction", 0.05))
                docs = {name: mix_docs(cfg.get("data") or {}, max_bytes) if path == MIX else slice_docs(path, vf, max_bytes)
                        for name, path in slices.items()}
            T = seq_len or int((cfg.get("train") or {}).get("seq_len") or model.config.max_seq_len)
            sums = measure_slices(model, tok, docs, min(T, model.config.max_seq_len), dev)
            if t is ref_t:
                ref_sums, ref_rec = sums, domain_record(t.label, sums)
                ref_rec["step"], ref_rec["vocab_size"] = meta.get("step"), tok.vocab_size
                continue
            r = domain_record(t.label, sums, ref_sums, samples, seed)
            r["step"], r["vocab_size"] = meta.get("step"), tok.vocab_size
            recs.append(r)
    return {"format": "poelm-slices/1", "slices": slices, "max_bytes": max_bytes, "reference": ref_rec, "records": recs}
