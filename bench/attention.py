"""Sliding-window attention: ``attn_impl = "sdpa"`` vs ``"flex"`` vs a stock transformers layer.

    python bench/attention.py                       # CPU: the 3B's S-layer shape at small width
    python bench/attention.py --device cuda --width 2048 --heads 16 --kv-heads 8 --backward   # the card's shape

One S layer of the cognica-3b preset (T = 2048, window W = 512 keys, GQA 2:1, the reference's
ops), as poelm's ``Attention`` module (projections, rotary, QK-norm, q/k x 1.2, the attention
kernel, output projection) run under each ``AttnPlan`` implementation, next to transformers'
``MistralAttention`` with the same sliding window (``sliding_window = W + 1``: Mistral lets query
i see key j when ``i - j < sliding_window``, poelm when ``i - j <= W``) and the same sizes, under
its ``sdpa`` and ``flex_attention`` implementations. What is timed is the module's forward (and
with ``--backward`` its backward: CUDA only, torch has no flex backward on CPU) on random hidden
states; transformers' mask building is timed with its layer, poelm's plan building with its own.

Protocol: every variant warmed up (compiles included) first; then ``--rounds`` rounds, each
running every variant once in a rotated order (interleaved, so load drift hits all alike);
tokens/s = B x T / wall time, reported as median [min, max] over rounds and as the ratio of
medians to poelm's ``sdpa``. Peak memory: each variant once more in a fresh subprocess, after its
warm-up: on CUDA ``max_memory_allocated`` during one call minus before it; on CPU the resident set
sampled every 0.5 ms during the call minus before it (allocator slack included: a coarse figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from poelm.core import attention  # noqa: E402
from poelm.core.attention import AttnPlan  # noqa: E402
from poelm.core.layers import Attention  # noqa: E402
from poelm.core.model import ModelConfig, PoEGPT  # noqa: E402

VARIANTS = ("poelm sdpa", "poelm flex", "transformers sdpa", "transformers flex")


def build(a):
    """Every variant as ``name -> (zero-arg callable, params)`` on the same hidden states."""
    dev = torch.device(a.device)
    cfg = ModelConfig.reference(vocab_size=64, depth=2, n_embd=a.width, n_head=a.heads, n_kv_head=a.kv_heads,
                                intermediate=4 * a.width, max_seq_len=a.seq, stage_layers=(1, 1), short_window=a.window)
    model = PoEGPT(cfg)  # for its rotary tables and windows (layer 0 is S)
    model.init_weights(0)
    W = model.windows[0]
    assert W == a.window, (W, a.window)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.seq, a.width, generator=g).to(dev)
    cos, sin = model.cos[:, : a.seq].to(dev), model.sin[:, : a.seq].to(dev)
    attn = Attention(cfg, 0).to(dev)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    runs = {}
    for impl in ("sdpa", "flex"):
        def poelm_run(impl=impl):
            plan = AttnPlan(impl, W, a.seq, a.seq, None, dev)
            return attn(x, None, cos, sin, None, 0, plan)
        runs[f"poelm {impl}"] = (poelm_run, list(attn.parameters()))
    try:
        from transformers import MistralConfig
        from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding
        from transformers.masking_utils import create_sliding_window_causal_mask
    except ImportError as e:  # an old transformers: poelm's variants alone
        print(f"transformers peer skipped: {e}", file=sys.stderr)
        return runs, x
    pos = torch.arange(a.seq, device=dev)[None].expand(a.batch, -1)
    for impl, name in (("sdpa", "transformers sdpa"), ("flex_attention", "transformers flex")):
        hcfg = MistralConfig(hidden_size=a.width, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                             head_dim=a.width // a.heads, sliding_window=W + 1, max_position_embeddings=a.seq,
                             intermediate_size=4 * a.width, vocab_size=64, num_hidden_layers=1, attn_implementation=impl)
        layer = MistralAttention(hcfg, 0).to(dev)
        rope = MistralRotaryEmbedding(hcfg).to(dev)

        def hf_run(layer=layer, rope=rope, hcfg=hcfg):
            mask = create_sliding_window_causal_mask(config=hcfg, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                                     position_ids=pos)
            return layer(x, position_embeddings=rope(x, pos), attention_mask=mask)[0]
        runs[name] = (hf_run, list(layer.parameters()))
    return runs, x


def call(fn, params, backward: bool):
    if backward:
        out = fn()
        out.float().square().mean().backward()
        for p in params:
            p.grad = None
    else:
        with torch.no_grad():
            fn()


def sync(dev: str):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(a) -> dict:
    """``--one NAME``: that variant alone in this process; its peak memory during one call."""
    runs, _ = build(a)
    fn, params = runs[a.one]
    call(fn, params, a.backward)  # warm-up and compile
    sync(a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(fn, params, a.backward)
        sync(a.device)
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base}
    # CPU: the resident set sampled every 0.5 ms on a thread during the call, minus before it
    # (large tensors are mmapped by glibc and unmapped on free, so RSS follows live tensors)
    import threading

    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample)
    th.start()
    try:
        call(fn, params, a.backward)
    finally:
        done.set()
        th.join()
    return {"peak_bytes": max(0, max(peak[0], rss_bytes()) - before)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256, help="n_embd (the card: 2048)")
    ap.add_argument("--heads", type=int, default=4, help="n_head (the card: 16; head_dim = width / heads)")
    ap.add_argument("--kv-heads", type=int, default=2, help="n_kv_head (the card: 8, GQA 2:1)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512, help="the S layers' window W in keys (the card: 512)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="time forward + backward (CUDA only)")
    ap.add_argument("--out", help="also write the results as JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.backward and not a.device.startswith("cuda"):
        ap.error("--backward needs a CUDA device: torch has no flex_attention backward on CPU")
    warnings.filterwarnings("ignore")
    if a.one:
        print(json.dumps(one(a)))
        return 0
    runs, _ = build(a)
    order = list(runs)
    warm = {}
    for name in order:  # warm-up: compiles (flex), caches, first-touch allocations
        t0 = time.perf_counter()
        call(*runs[name], a.backward)
        sync(a.device)
        warm[name] = time.perf_counter() - t0
    flex_ran = attention._flex_fn is not None
    times = {n: [] for n in order}
    for r in range(a.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:  # rotated, interleaved
            t0 = time.perf_counter()
            call(*runs[name], a.backward)
            sync(a.device)
            times[name].append(time.perf_counter() - t0)
    tokens = a.batch * a.seq
    mem = {}
    for name in order:
        cmd = [sys.executable, __file__, "--one", name, "--device", a.device, "--width", str(a.width), "--heads", str(a.heads),
               "--kv-heads", str(a.kv_heads), "--seq", str(a.seq), "--window", str(a.window), "--batch", str(a.batch)]
        if a.backward:
            cmd.append("--backward")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        mem[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] if done.returncode == 0 else None
    base = statistics.median(times["poelm sdpa"])
    pass_ = "forward + backward" if a.backward else "forward"
    print(f"one S layer ({pass_}), {a.device}, torch {torch.__version__}: T={a.seq}, window {a.window} keys, width {a.width}, "
          f"{a.heads} heads / {a.kv_heads} KV heads (head_dim {a.width // a.heads}), batch {a.batch}; "
          f"{a.rounds} interleaved rounds after warm-up; flex kernel compiled: {flex_ran}")
    print(f"{'variant':<20}{'tokens/s median [min, max]':>34}{'vs poelm sdpa':>15}{'peak MiB':>10}{'warm-up s':>11}")
    res = {"args": vars(a), "torch": torch.__version__, "variants": {}}
    for name in order:
        ts = times[name]
        med = statistics.median(ts)
        pk = mem[name]
        print(f"{name:<20}{tokens / med:>14,.0f} [{tokens / max(ts):,.0f}, {tokens / min(ts):,.0f}]".ljust(54)
              + f"{base / med:>14.2f}x{(pk / 2**20 if pk is not None else float('nan')):>10.1f}{warm[name]:>11.2f}")
        res["variants"][name] = {"seconds": ts, "tokens_per_s_median": tokens / med, "speed_vs_poelm_sdpa": base / med,
                                 "peak_bytes": pk, "warmup_s": warm[name]}
    if a.out:
        from poelm.fsio import atomic_write_json

        atomic_write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
