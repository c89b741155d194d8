"""Time ``poelm import nanochat`` and ``poelm export --format nanochat`` on a synthetic reference
checkpoint of a chosen size, and check the round trip and the forward against the reference's.

Builds (with tests/trajectory/nanochat_fixtures.py, the tests' reference-format builder) a folder
with ``model_XXXXXX.pt`` (bf16 ``wte`` / value embeddings, 64-row vocabulary padding),
``meta_XXXXXX.json`` and ``--world`` DistMuonAdamW optimizer shards, then runs the two verbs as
subprocesses and prints: source size, wall time of each verb, max |log p| difference per stage
between the imported model and the facts-page reference forward (fp32, ``--tokens`` positions,
past the short window), and whether ``export(import(ref))`` gives ``ref``'s tensors bitwise and
``import(export(x))`` gives ``x`` bitwise (weights and optimizer state).

    python bench/nanochat_import.py --n-embd 512 --n-layer 8 --vocab 32768 --world 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trajectory"))

import nanochat_fixtures as fx  # noqa: E402


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "poelm", *map(str, args)], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"poelm {args[0]} failed: {r.stderr.strip()}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768 - 8)  # not a multiple of 64: padding rows exist
    ap.add_argument("--poe-every", type=int, default=2)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=320)
    a = ap.parse_args()
    from poelm.train import checkpoint as ckpt_mod
    from poelm.trajectory import nanochat

    cfg = dict(fx.CFG, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head, n_kv_head=a.n_head // 2, vocab_size=a.vocab,
               poe_every=a.poe_every, window_pattern="SSSL")
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as work:
        w = Path(work)
        tok = fx.tokenizer_json(w / "tok", vocab=a.vocab) if a.vocab == fx.V else None
        if tok is None:  # a tokenizer of the checkpoint's size: the byte-level BPE trained on the embedded corpus stops early
            tok = _sized_tokenizer(w / "tok", a.vocab)
        built = fx.write_folder(w / "ref", world=a.world, cfg=cfg)
        src = sum(p.stat().st_size for p in (w / "ref").iterdir())
        t_imp = run("import", "nanochat", w / "ref", w / "imp", "--tokenizer", tok)
        t_exp = run("export", "--format", "nanochat", w / "imp", w / "nc")
        run("import", "nanochat", w / "nc", w / "imp2", "--tokenizer", tok)
        ref_sd = built["weights"]
        back = torch.load(w / "nc" / "model_001200.pt", weights_only=True)
        ref_bitwise = back.keys() == ref_sd.keys() and all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ref_sd.items())
        x, y = ckpt_mod.load(w / "imp" / "step-01200"), ckpt_mod.load(w / "imp2" / "step-01200")
        rt = all(a_.keys() == b_.keys() and all(torch.equal(a_[k], b_[k]) for k in a_)
                 for a_, b_ in ((x.model_state, y.model_state), (x.optim_tensors, y.optim_tensors)))
        model, _, _ = ckpt_mod.load_model(w / "imp" / "step-01200")
        layers = nanochat.stage_layout(cfg)
        idx = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (model.stage_log_probs(idx) - fx.reference_stage_log_probs(ref_sd, idx, layers, cfg)).abs().amax(dim=(1, 2, 3))
    print(f"reference checkpoint: n_layer {a.n_layer}, n_embd {a.n_embd}, vocab {a.vocab}, {a.world} optimizer shards: {src / 1e6:.0f} MB")
    print(f"poelm import nanochat: {t_imp:.1f} s wall ({src / 1e6 / t_imp:.0f} MB/s)")
    print(f"poelm export --format nanochat: {t_exp:.1f} s wall")
    print(f"max |log p| difference per stage vs the reference forward ({a.tokens} positions, fp32): "
          + ", ".join(f"{d:.2e}" for d in diff.tolist()))
    print(f"export(import(ref)) == ref tensors bitwise: {ref_bitwise}; import(export(x)) == x bitwise (weights + optimizer): {rt}")


def _sized_tokenizer(d: Path, vocab: int) -> Path:
    """A byte-level BPE with exactly ``vocab`` tokens: poelm's 4 specials and 256 bytes, then
    filler merges of byte pairs (the bench needs the size, not a useful tokenizer)."""
    import json

    from poelm.data.tokenizer import BYTE_SYMBOLS, SPECIAL_TOKENS

    syms = list(BYTE_SYMBOLS)
    vocab_map = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for s in syms:
        vocab_map[s] = len(vocab_map)
    merges = []
    for a_ in syms:
        for b_ in syms:
            if len(vocab_map) >= vocab:
                break
            merges.append([a_, b_])
            vocab_map[a_ + b_] = len(vocab_map)
    j = json.loads(fx_tokenizer_template())
    j["model"]["vocab"], j["model"]["merges"] = vocab_map, merges
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(j))
    return d / "tokenizer.json"


def fx_tokenizer_template() -> str:
    from poelm.data.tokenizer import train_tokenizer

    return train_tokenizer(["a small text to get the tokenizer.json layout"], 262).to_json()


if __name__ == "__main__":
    main()
