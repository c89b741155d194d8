"""Decoding throughput of poelm's engine, every mode side by side, in one process.

    python bench/decode.py                  # 12 layers, width 512, stages (6,2,2,2), vocab 8192
    python bench/decode.py --hf             # also transformers generate() on the exported model
    python bench/decode.py --depth 4 --width 128 --stages 2,1,1 --vocab 1024 --new-tokens 16
    python bench/decode.py --target demo/repo@main   # also a trained checkpoint (any TARGET form)

The bench model is random (no training is needed to time decoding) but built so that its stages
agree the way a trained PoE model's do: ``init_weights(seed)`` (per-stage heads exactly zero, so
every stage reads the same shared head), then the blocks' output projections, which
``init_weights`` zeroes, are drawn N(0, 1/fan_in), scaled by ``--late`` (default 0.03) in the
blocks after stage 0, whose ``x0`` mixing scalars are also set to 0: stages 1..K-1 only refine
the stream stage 0 produced. The shared head is drawn N(0, ``--head-scale``**2/width) so logits
are well separated (no near-ties). With the fixed seed, stage 0 then drafts most tokens right
(acceptance ~0.9, like the card's 0.94-0.997) but not all.

WAND bounds are calibrated on this model as SPEC says (p99 of ``range(delta_s)`` over positions)
on random token rows (``--calib-tokens``), not on a data slice.

Printed: tokens/s of ``full``, ``speculative`` (speedup, acceptance, mean accepted), ``wand``
(speedup, top-1 agreement with ``full``: position-wise over the generated tokens, mean depth),
``stage=0``, optionally (``--hf``) transformers ``generate()`` through ``poelm.hf``'s
``PoelmForCausalLM`` with the same weights; and the analytic limit of speculation
``(m+1)/(m*c0 + (1-c0))`` with ``c0`` = stage 0's share of ``model.flops_per_token()`` (the
issue's formula: a round that drafts m tokens and verifies them with stages 1..K-1 at the cost of
one position). The engine's round feeds m+1 positions to stage 0 (the last draft's states are
needed for the bonus token), so its own bound is ``(m+1)/((m+1)*c0 + (1-c0))``, also printed.
Each (mode, prompt) is timed ``--repeats`` times (modes interleaved, after a warm-up) and the
fastest run is kept, which filters out other processes on a shared machine. CPU time does not
follow FLOPs exactly (per-call overheads, memory-bound heads), so the measured stage-0 time share
``c0_time = t(stage=0) / t(full)`` and the limit it implies are printed as well. On a machine
shared with other jobs, ``--threads 1`` gives steadier ratios (no thread-barrier stalls).

A stock peer, timed in the same interleaved loop (``--llama``, on by default): transformers
``LlamaForCausalLM.generate()`` (greedy, its own DynamicCache, SDPA) of the same trunk shape
(layers, width, heads, KV heads, MLP width, vocab; random weights, bench/llama_peer.py); every
mode's tokens/s is also printed as a ratio to it, with the architectural differences named.

``--target TARGET`` (a checkpoint dir, run dir, exported folder, ``REPO``, ``REPO@step-XXXXX``,
``REPO@main``, ``hf://org/name[@rev]``; resolved by poelm/targets.py) times the same modes on a
trained checkpoint after the synthetic model: prompts are the embedded retention-probe prompts
(poelm/measure/prompts/embedded.jsonl) in its own tokenizer, the WAND bounds are the checkpoint's
calibrated ``poe_wand_p99_bounds_per_stage_head`` (else calibrated here on random rows, said so),
and new tokens are capped so prompt + new tokens fit its ``max_seq_len``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama_peer  # noqa: E402

from poelm.core import poe  # noqa: E402
from poelm.infer.engine import Engine, wand_bounds_from  # noqa: E402
from poelm.core.model import ModelConfig, PoEGPT  # noqa: E402

PROBE_PROMPTS = Path(__file__).resolve().parent.parent / "poelm" / "measure" / "prompts" / "embedded.jsonl"


def build(args) -> PoEGPT:
    stages = tuple(int(x) for x in args.stages.split(","))
    cfg = ModelConfig(vocab_size=args.vocab, depth=sum(stages), n_embd=args.width, n_head=args.heads, n_kv_head=args.kv_heads,
                      intermediate=4 * args.width, max_seq_len=args.prompt_len + args.new_tokens + 8, stage_layers=stages)
    model = PoEGPT(cfg)
    model.init_weights(seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            scale = 1.0 if i < stages[0] else args.late
            for lin in (b.attn.c_proj, b.mlp.c_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale * lin.weight.shape[1] ** -0.5)
            if i >= stages[0]:
                model.x0_lambdas[i] = 0.0  # later stages refine stage 0's stream, not re-mix x0 into it
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * args.head_scale * args.width ** -0.5)
    return model.eval()


@torch.no_grad()
def calibrate_bounds(model, n_tokens: int, seed: int) -> list[float]:
    """p99 over positions of ``range(delta_s)`` (SPEC), on random token rows."""
    T = model.config.max_seq_len
    rows = max(1, n_tokens // T)
    idx = torch.randint(0, model.config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(seed))
    r = torch.cat([poe.wand_ranges(model.stage_log_probs(idx[i : i + 1])).flatten(1) for i in range(rows)], dim=1)
    return torch.quantile(r, 0.99, dim=1).tolist()


def timed(engine, prompt, n, **kw):
    t = time.perf_counter()
    res = engine.generate(prompt, n, **kw)
    return time.perf_counter() - t, res.tokens[0], res.stats


class HFGenerate:
    """Greedy transformers ``generate()`` of one model over the prompts, as a timed "mode"."""

    def __init__(self, model):
        self.model = model

    def __call__(self, prompt, n):
        t = time.perf_counter()
        out = self.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[0, len(prompt):].tolist(), None


def poelm_hf(model):
    """poelm's own ``PoelmForCausalLM`` (poelm/hf, the class an export ships) with the same
    weights: transformers' generate loop around poelm's model."""
    from poelm.hf.configuration_poelm import PoelmConfig
    from poelm.hf.modeling_poelm import PoelmForCausalLM

    hf = PoelmForCausalLM(PoelmConfig(**model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    return hf


def bench(model, prompts, n, args, bounds, title, notes):
    """Time every mode on ``model`` (modes interleaved, best of ``--repeats`` after a warm-up)
    and print the table."""
    cfg = model.config
    flops = model.flops_per_token(context=len(prompts[0]) + n / 2)
    c0 = flops["per_stage"][0] / flops["total"]
    m = args.m
    print(f"== {title}")
    for line in notes:
        print(f"   {line}")
    print(f"model: depth {cfg.depth}, width {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_kv_head} kv, MLP {cfg.intermediate}, "
          f"stage_layers {cfg.stage_layers}, vocab {cfg.vocab_size}, {model.param_count()['total'] / 1e6:.1f}M params; "
          f"torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}")
    print(f"run: {len(prompts)} prompts x {len(prompts[0])}..{max(map(len, prompts))} tokens, {n} new tokens each, best of {args.repeats} "
          f"after warm-up; wand p99 bounds {[round(b, 3) for b in bounds]}")
    eng = Engine(model)
    modes = {
        "full": dict(mode="full"),
        "speculative": dict(mode="speculative", m=m),
        "wand": dict(mode="wand", bounds=bounds),
        "stage=0": dict(mode="stage", stage=0),
    }

    def engine_call(kw):
        def call(prompt, n_new):
            t = time.perf_counter()
            res = eng.generate(prompt, n_new, **kw)
            return time.perf_counter() - t, res.tokens[0], res.stats
        return call

    calls = {k: engine_call(kw) for k, kw in modes.items()}
    if args.hf:
        calls["hf generate"] = HFGenerate(poelm_hf(model))
    if args.llama:
        calls["llama generate"] = HFGenerate(llama_peer.llama_like(cfg, seed=args.seed).eval())
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call(prompts[0], min(8, n))
        # best[mode][prompt]: the fastest of the repeats, modes interleaved so slow spells of a
        # shared machine hit every mode alike
        best = {k: [math.inf] * len(prompts) for k in calls}
        outs = {k: [None] * len(prompts) for k in calls}
        stats = {k: [None] * len(prompts) for k in calls}
        for _ in range(args.repeats):
            for i, p in enumerate(prompts):
                for name, call in calls.items():
                    t, o, st = call(p, n)
                    if t < best[name][i]:
                        best[name][i], outs[name][i], stats[name][i] = t, o, st
    total = n * len(prompts)
    tps = {k: total / sum(v) for k, v in best.items()}
    full = outs["full"]

    def agree(o):
        pairs = [(a, b) for x, y in zip(o, full) for a, b in zip(x, y)]
        return sum(a == b for a, b in pairs) / len(pairs)

    spec = stats["speculative"]
    acc = sum(s["accepted"] for s in spec) / max(1, sum(s["proposed"] for s in spec))
    mean_acc = sum(s["accepted"] for s in spec) / max(1, sum(s["row_rounds"] for s in spec))
    wdepth = sum(s["mean_depth"] * s["new_tokens"] for s in stats["wand"]) / sum(s["new_tokens"] for s in stats["wand"])
    sp = tps["speculative"] / tps["full"]
    limit = (m + 1) / (m * c0 + (1 - c0))
    limit_engine = (m + 1) / ((m + 1) * c0 + (1 - c0))
    predicted = (mean_acc + 1) / ((m + 1) * c0 + (1 - c0))
    peer = tps.get("llama generate")
    head = f"{'mode':<16}{'tok/s':>9}{'vs full':>9}" + (f"{'vs Llama':>10}" if peer else "") + "  notes"
    print(head)

    def row(name, notes_text):
        r = f"{name:<16}{tps[name]:>9.1f}{tps[name] / tps['full']:>8.2f}x"
        if peer:
            r += f"{tps[name] / peer:>9.2f}x"
        print(f"{r}  {notes_text}")

    row("full", f"K={cfg.n_stages}")
    row("speculative", f"m={m}, acceptance {acc:.4f}, mean accepted {mean_acc:.2f}/{m}, identical to full: {outs['speculative'] == full}")
    row("wand", f"top-1 agreement with full {agree(outs['wand']):.4f}, mean depth {wdepth:.2f}/{cfg.n_stages}")
    row("stage=0", f"c0 = {c0:.3f} (stage-0 FLOPs share), 1/c0 = {1 / c0:.2f}")
    if args.hf:
        row("hf generate", f"transformers generate() through poelm.hf's PoelmForCausalLM, greedy, identical to full: {outs['hf generate'] == full}")
    if peer:
        row("llama generate", f"stock LlamaForCausalLM.generate(), same trunk shape, random weights, "
                              f"{llama_peer.flops_per_token(cfg, len(prompts[0]) + n / 2) / flops['total']:.2f}x full-K's FLOPs per token")
        print(f"  Llama peer differences: {llama_peer.differences(cfg)}")
    print(f"speculation limit (m+1)/(m*c0+(1-c0)) = {limit:.2f}x with FLOPs c0 {c0:.3f}: achieved {sp / limit:.1%}")
    print(f"  engine round bound (m+1)/((m+1)*c0+(1-c0)) = {limit_engine:.2f}x: achieved {sp / limit_engine:.1%}; "
          f"at the measured acceptance (mean accepted+1)/((m+1)*c0+(1-c0)) = {predicted:.2f}x")
    ct = tps["full"] / tps["stage=0"]
    print(f"  with the measured time share c0_time = {ct:.3f}: limit {(m + 1) / (m * ct + (1 - ct)):.2f}x "
          f"(achieved {sp / ((m + 1) / (m * ct + (1 - ct))):.1%}), engine round bound {(m + 1) / ((m + 1) * ct + (1 - ct)):.2f}x")
    # WAND's FLOP limits from its measured exit depths: a token that exits after stage d costs the
    # FLOPs share of stages 0..d; catch-up later runs skipped stages for positions deeper ones need.
    share = [f / flops["total"] for f in flops["per_stage"]]
    wst = stats["wand"]
    hist = [sum(s["depth_hist"][d] for s in wst) for d in range(cfg.n_stages)]
    exit_cost = sum(h * sum(share[: d + 1]) for d, h in enumerate(hist)) / max(1, sum(hist))
    run_cost = sum(share[k] * sum(s["stage_positions"][k] for s in wst) for k in range(cfg.n_stages)) / sum(s["stage_positions"][0] for s in wst)
    wsp = tps["wand"] / tps["full"]
    print(f"wand FLOP limits: exit depths alone {1 / exit_cost:.2f}x (achieved {wsp * exit_cost:.1%}); stages actually run, "
          f"catch-up included, {1 / run_cost:.2f}x (achieved {wsp * run_cost:.1%})")
    return tps


def probe_prompts(tok, k: int) -> list[list[int]]:
    """The first ``k`` embedded retention-probe prompts (text from the training corpus)."""
    texts = [json.loads(line)["prompt"] for line in PROBE_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [tok.encode_doc(t) for t in texts[:k]]


def bench_target(args):
    """The same modes on a trained checkpoint named by ``args.target`` (any TARGET form)."""
    from poelm import targets
    from poelm.train import checkpoint

    with tempfile.TemporaryDirectory(prefix="poelm-bench-") as work:
        t = targets.resolve(args.target, work)
        model, tok, meta = checkpoint.load_model(t.path)
    model.eval()
    prompts = probe_prompts(tok, args.prompts)
    room = model.config.max_seq_len - max(map(len, prompts)) - 1
    n = min(args.new_tokens, room)
    if n < 1:
        raise SystemExit(f"--target {args.target}: its max_seq_len {model.config.max_seq_len} leaves no room after the prompts")
    bounds = wand_bounds_from(meta)
    if bounds is not None:
        where = "the checkpoint's calibrated poe_wand_p99_bounds_per_stage_head"
    else:
        bounds = calibrate_bounds(model, args.calib_tokens, args.seed + 3)
        where = "calibrated here on random token rows (the checkpoint has no calibrated bounds: run `poelm measure`)"
    notes = [f"a trained checkpoint: {t.label}", f"prompts: the first {len(prompts)} embedded probe prompts in its tokenizer",
             f"wand bounds: {where}"]
    if n < args.new_tokens:
        notes.append(f"new tokens capped at {n} (max_seq_len {model.config.max_seq_len})")
    return bench(model, prompts, n, args, bounds, f"target {args.target}", notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="6,2,2,2", help="stage_layers (depth = their sum)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--late", type=float, default=0.03, help="scale of the block outputs after stage 0")
    ap.add_argument("--head-scale", type=float, default=4.0)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="also time transformers generate() through poelm.hf (PoelmForCausalLM, same weights)")
    ap.add_argument("--llama", action=argparse.BooleanOptionalAction, default=True, help="also time a stock LlamaForCausalLM.generate() of the same trunk shape")
    ap.add_argument("--target", metavar="TARGET", help="also time the modes on this trained checkpoint (any TARGET form)")
    ap.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True, help="time the synthetic bench model (default: yes)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        model = build(args)
        g = torch.Generator().manual_seed(args.seed + 2)
        prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        bounds = calibrate_bounds(model, args.calib_tokens, args.seed + 3)
        notes = ["random weights BUILT SO THAT ITS STAGES AGREE (per-stage heads zero, later blocks scaled by "
                 f"--late {args.late}, x0 mixing off after stage 0): not a trained model; its acceptance and agreement are by construction",
                 "prompts: random tokens; wand bounds calibrated on random token rows"]
        bench(model, prompts, args.new_tokens, args, bounds, "synthetic bench model", notes)
    if args.target:
        if args.synthetic:
            print()
        bench_target(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
