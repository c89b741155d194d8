"""The GPU check: one command, one JSON file, a table; every section on its own time budget.

    PYTHONPATH=. python3 bench/gpu.py --out bench-gpu.json          # one H200/H100, < 8 min
    PYTHONPATH=. python3 bench/gpu.py --device cpu --tiny --out x.json   # the CPU smoke run (seconds)

Runs from the repo root with the machine's own python3 (torch, safetensors, tokenizers, numpy,
scipy; no pip install). It imports only what training, inference and measurement need: no tqdm
(progress bars off), no huggingface_hub, no transformers. Sections, each written to the JSON as
it completes (a failed section records its error and the script goes on):

- ``train``: a d20-class PoE model (depth 20, width 1280, K=4 asymmetric stages (10,4,3,3), GQA
  2:1, vocab 32,768, seq 2048, bf16 autocast) trained on the card's code path: a child launched
  as ``python -m torch.distributed.run --standalone --nproc_per_node=1`` (NCCL group, world 1:
  ZeRO-2 with one rank issues no collectives, so the child also checks NCCL's all_reduce /
  reduce_scatter / all_gather / broadcast once), running poelm's own ``Trainer.run`` (the loop's
  ``backward_local``, the Muon+AdamW ZeRO-2 optimizer, logging) on random tokens; the end-of-phase
  save is skipped (a bench times steps, not checkpoint I/O). Per variant (K=4, K=1 on the same
  trunk, each with and without ``train.compile = "model"``, and K=4 with the reference's sliding
  windows ``window_pattern = "SSSL"`` under ``attn_impl`` sdpa and flex, eager and compiled): tokens/s (median of the logged steps after
  the warm-up ones), MFU = ``flops_per_token()["train_total"] x tokens/s / 989e12`` (H100/H200
  dense bf16), peak allocated GPU memory next to ``poelm plan``'s prediction (poelm/train/plan.py).
- ``decode``: a ~1.2B-parameter PoE model built as bench/decode.py builds its agreeing-stages
  model, in bf16: full / speculative / wand / route / stage=0 tokens/s at batch 1 and batch 8
  (best of ``repeats`` after a warm-up, modes interleaved), acceptance, agreement with full,
  and the analytic limits (bench/decode.py's formulas, FLOP and measured-time shares of stage 0).
- ``measure``: tokens/s of ``poelm measure``'s position-level pass (``measure.measure`` without
  the probe) vs one evaluation forward (``evaluate_bpb``) over the same slices, both bf16.
- ``exactness``: greedy speculative == greedy full tokens (from ``decode``, bf16, and once more
  in fp32), and the losses of 10 training steps in fp32 on the GPU vs the same steps on the CPU
  (same init, same rows; relative difference per step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from poelm import config as config_mod  # noqa: E402
from poelm.core.model import ModelConfig, PoEGPT  # noqa: E402
from poelm.fsio import atomic_write_json  # noqa: E402

PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM
TRUNK = dict(vocab_size=32768, depth=20, n_embd=1280, n_head=10, n_kv_head=5, intermediate=5120, max_seq_len=2048)
TINY_TRUNK = dict(vocab_size=512, depth=5, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=32)
STAGES, TINY_STAGES = [10, 4, 3, 3], [2, 1, 1, 1]
# bench/decode.py's arguments for the ~1.2B decode model (12 layers of width 2048, vocab 32768)
DECODE = dict(stages="6,2,2,2", width=2048, heads=16, kv_heads=8, vocab=32768, prompt_len=64, new_tokens=128)
TINY_DECODE = dict(stages="2,1,1,1", width=32, heads=2, kv_heads=1, vocab=256, prompt_len=8, new_tokens=12)
BUDGET = {"train": 230, "decode": 110, "measure": 40, "exactness": 50}  # seconds; the whole run < 8 min


def _bench_module(name: str):
    """bench/decode.py and bench/measure_cost.py, imported by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- training (child)
class RandomRows:
    """The loader interface ``Trainer.run`` uses, over uniform random tokens (throughput does not
    depend on the data; the mixture loader is tested elsewhere)."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.sources = vocab, seq_len, [None]
        self.g = torch.Generator().manual_seed(seed)

    def next_batch(self, global_rows: int, rank: int = 0, world_size: int = 1):
        rows = torch.randint(0, self.vocab, (global_rows, self.seq_len + 1), generator=self.g)
        per = global_rows // world_size
        mine = rows[rank * per:(rank + 1) * per]
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()

    def batch_hash(self):
        """None: random rows are no data ``poelm batch`` could re-derive a hash from."""
        return None

    def state_dict(self):
        return {}


def train_config(trunk: dict, stages, device: str, dtype: str, batch: int, seq: int, steps: int, compile_, ops: dict | None = None):
    """``compile_``: ``train.compile`` (False, "model" or "blocks"); ``ops``: model options (windows, ``attn_impl``)."""
    cfg = config_mod.from_dict({})
    cfg.model = ModelConfig(**{**trunk, "max_seq_len": seq, **(ops or {})}, stage_layers=stages)
    t = cfg.train
    t.device, t.dtype, t.seq_len, t.device_batch_size = device, dtype, seq, batch
    t.tokens_per_step, t.eval_every, t.log_every, t.save_every, t.compile = batch * seq, 0, 1, 0, compile_
    cfg.schedule = config_mod.ScheduleConfig(name="bench", steps=steps, warmup=1, peak=1.0, warmdown_ratio=0.0, final=1.0)
    return config_mod.validate(cfg)


def run_trainer(cfg, out_dir: Path, seed: int = 0, model=None) -> list[dict]:
    """``cfg.schedule.steps`` steps of poelm's ``Trainer.run``; the logged train records."""
    from poelm.train import loop
    from poelm.train.optim import build_optimizer
    from poelm.train.runtime import apply_compile, compile_mode, setup_runtime

    rt = setup_runtime(cfg)
    loop.resolve_global_batch(cfg, rt.world)
    if model is None:  # as loop._build_model builds it, allocated on the device directly (a d20 init on the CPU takes seconds)
        with rt.device:
            model = PoEGPT(cfg.model)
        model.init_weights(seed=cfg.train.seed)
        apply_compile(model, compile_mode(cfg.train.compile, rt.device))  # as the loop does
    model = model.to(rt.device)
    opt = build_optimizer(model, cfg.optim, world_size=rt.world, rank=rt.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = loop.Trainer(cfg, out_dir, rt, model, None, opt, RandomRows(cfg.model.vocab_size, cfg.seq_len, seed),
                      cfg.schedule.phase(0), 0, 0, 0, publisher=None, progress=False)
    tr.save = lambda: None  # the bench times steps; checkpoint I/O is not one
    tr.run()
    recs = [json.loads(ln) for ln in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def nccl_check(device) -> str:
    """World-1 collectives through the group the child holds (what the card's 12 ranks use)."""
    import torch.distributed as dist

    x = torch.arange(4.0, device=device)
    dist.all_reduce(x)
    out = torch.empty(4, device=device)
    dist.reduce_scatter_tensor(out, x)
    dist.all_gather_into_tensor(x, out)
    dist.broadcast(x, src=0)
    _sync(device)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0], x.tolist()
    return f"{dist.get_backend()}: all_reduce, reduce_scatter, all_gather, broadcast ok"


def train_child(spec_path: str) -> int:
    """Under torchrun: every variant of the spec in turn; results rewritten after each one."""
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    dev = torch.device("cuda:0" if spec["device"] == "cuda" else "cpu")
    res = {"variants": [], "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        res["nccl"] = nccl_check(dev)
    except Exception as e:  # recorded; the training runs go on without the group
        res["nccl"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    deadline = time.time() + spec["budget_s"]
    for v in spec["variants"]:
        row = {"name": v["name"], "stages": v["stages"], "compile": v["compile"]}
        if time.time() > deadline - v.get("min_s", 0):
            row["skipped"] = "time budget"
        else:
            try:
                row.update(train_variant(spec, v, dev))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        res["variants"].append(row)
        atomic_write_json(spec["out"], res)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def train_variant(spec: dict, v: dict, dev) -> dict:
    cfg = train_config(spec["trunk"], v["stages"], spec["device"], spec["dtype"], spec["batch"], spec["seq"],
                       spec["warmup"] + spec["steps"], v["compile"], v.get("ops"))
    with torch.device("meta"):
        meta_model = PoEGPT(cfg.model)
    flops = meta_model.flops_per_token(seq_len=cfg.seq_len)["train_total"]  # S layers: their window's mean context
    row = {"params": meta_model.param_count()["total"], "flops_per_token": flops, "tokens_per_step": spec["batch"] * spec["seq"]}
    try:  # poelm plan's prediction of the peak (poelm/train/plan.py)
        from poelm.train import plan as plan_mod

        p = plan_mod.plan(cfg, 1, "h200")
        row["plan_bytes"] = int(p["total"])
        row["plan_parts"] = {k: int(b) for k, b in p["memory"].items()}
    except Exception as e:
        row["plan_bytes"] = None
        row["plan_error"] = f"{type(e).__name__}: {e}"[:300]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.time()
    with tempfile.TemporaryDirectory(prefix="poelm-gpu-train-") as tmp:
        recs = run_trainer(cfg, Path(tmp))
    row["wall_s"] = time.time() - t
    # a compiled run's first step has no tok_per_s (its compile time is the loop's "compile" record)
    timed = [r["tok_per_s"] for r in recs[spec["warmup"]:] if "tok_per_s" in r] or [recs[-1]["tokens"] / sum(r["step_s"] for r in recs)]
    tps = statistics.median(timed)
    row.update(tokens_per_s=tps, tokens_per_s_range=[min(timed), max(timed)], steps_timed=len(timed),
               first_step_s=recs[0]["step_s"], loss_first_last=[recs[0]["loss"], recs[-1]["loss"]])
    if dev.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        row["mfu"] = flops * tps / PEAK
    return row


def section_train(a, deadline: float) -> dict:
    trunk, stages = (TINY_TRUNK, TINY_STAGES) if a.tiny else (TRUNK, STAGES)
    one = [sum(stages)]
    # The reference's sliding windows (SSSL: S = 512 keys at seq 2048; a quarter of the tiny row)
    # run SDPA with a window mask instead of the unmasked causal kernel: their cost is measured.
    # ``attn_impl`` "flex" runs them through flex_attention's block masks instead (core/attention.py;
    # on CPU training falls back to SDPA: torch has no flex backward there).
    windows = {"window_pattern": "SSSL", "short_window": trunk["max_seq_len"] // 4 if a.tiny else 0}
    flex = {**windows, "attn_impl": "flex"}
    variants = [dict(name="PoE K=4", stages=stages, compile=False), dict(name="K=1", stages=one, compile=False),
                dict(name="PoE K=4 SSSL sdpa", stages=stages, compile=False, ops=windows),
                dict(name="PoE K=4 SSSL flex", stages=stages, compile=False, ops=flex)]
    if a.compile and a.device == "cuda":  # inductor on a CPU needs a C++ toolchain and minutes
        variants += [dict(name="PoE K=4 compiled", stages=stages, compile="model", min_s=90),
                     dict(name="K=1 compiled", stages=one, compile="model", min_s=90),
                     dict(name="PoE K=4 SSSL sdpa compiled", stages=stages, compile="model", ops=windows, min_s=90),
                     dict(name="PoE K=4 SSSL flex compiled", stages=stages, compile="model", ops=flex, min_s=90)]
    with tempfile.TemporaryDirectory(prefix="poelm-gpu-") as tmp:
        out = Path(tmp) / "train.json"
        spec = dict(device=a.device, dtype="bf16" if a.device == "cuda" else "fp32", trunk=trunk, batch=2 if a.tiny else a.batch,
                    seq=trunk["max_seq_len"], warmup=1 if a.tiny else 3, steps=2 if a.tiny else 8, variants=variants,
                    budget_s=max(1.0, deadline - time.time() - 15), out=str(out))
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(Path(__file__).resolve()),
               "--train-child", str(Path(tmp) / "spec.json")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if a.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        try:
            log, _ = p.communicate(timeout=max(5.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _kill_tree(p.pid)
            log, _ = p.communicate()
            log += "\n(train child killed at the section's time budget)"
        res = json.loads(out.read_text()) if out.is_file() else {"variants": []}
    res["launch"] = "python -m torch.distributed.run --standalone --nproc_per_node=1 (bench/gpu.py --train-child)"
    res["returncode"] = p.returncode
    if p.returncode != 0 or not res["variants"]:
        res["log_tail"] = log[-3000:]
    res["trunk"], res["batch"], res["dtype"] = trunk, spec["batch"], spec["dtype"]
    return res


def _kill_tree(pid: int) -> None:
    """torchrun starts its workers in sessions of their own: kill them (found via /proc) and it."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    kids.append(int(d))
            except OSError:
                pass
    for k in [*kids, pid]:
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- decoding
def route_tau(model, rows: torch.Tensor, cap: float = 0.02) -> float:
    """SPEC's calibration on ``rows``: the lowest stage-0 max-probability threshold whose routed
    positions disagree with full K's top-1 at most ``cap`` of the time (``routing_threshold``)."""
    from poelm.core import poe
    from poelm.measure.metrics import routing_threshold

    with torch.no_grad():
        z = model.stage_log_probs(rows).float()
    conf = z[0].exp().amax(-1).flatten()
    dis = (z[0].argmax(-1) != poe.aggregate(z).argmax(-1)).flatten().float()
    R = 100
    b = (conf * R).long().clamp(max=R - 1)
    counts = torch.zeros(R).index_add_(0, b.cpu(), torch.ones_like(dis).cpu())
    regress = torch.zeros(R).index_add_(0, b.cpu(), dis.cpu())
    return float(routing_threshold(counts.numpy(), regress.numpy(), cap)["tau"])


def section_decode(a, deadline: float, state: dict) -> dict:
    dec = _bench_module("decode")
    p = {**(TINY_DECODE if a.tiny else DECODE)}
    args = SimpleNamespace(stages=p["stages"], width=p["width"], heads=p["heads"], kv_heads=p["kv_heads"], vocab=p["vocab"],
                           prompt_len=p["prompt_len"], new_tokens=p["new_tokens"], late=0.03, head_scale=4.0, seed=0)
    t0 = time.time()
    model = dec.build(args)  # CPU, fp32: the agreeing-stages construction
    cfg = model.config
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = model.to(a.device, dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (p["prompt_len"],), generator=g).tolist() for _ in range(8)]
    calib = torch.randint(0, cfg.vocab_size, (4, cfg.max_seq_len), generator=torch.Generator().manual_seed(3)).to(a.device)
    from poelm.core import poe
    from poelm.infer.engine import Engine

    with torch.no_grad():
        r = torch.cat([poe.wand_ranges(model.stage_log_probs(calib[i:i + 1]).float()).flatten(1) for i in range(calib.shape[0])], 1)
    bounds = torch.quantile(r.float().cpu(), 0.99, dim=1).tolist()
    tau = route_tau(model, calib)
    flops = model.flops_per_token(context=p["prompt_len"] + p["new_tokens"] / 2)
    c0, m = flops["per_stage"][0] / flops["total"], 4
    res = {"params": model.param_count()["total"], "dtype": str(dtype).removeprefix("torch."), "stage_layers": list(cfg.stage_layers),
           "width": cfg.n_embd, "vocab": cfg.vocab_size, "prompt_len": p["prompt_len"], "new_tokens": p["new_tokens"], "m": m,
           "wand_p99_bounds": bounds, "route_tau": tau, "c0_flops": c0, "build_s": time.time() - t0, "batches": {}}
    eng = Engine(model)
    modes = {"full": dict(mode="full"), "speculative": dict(mode="speculative", m=m), "wand": dict(mode="wand", bounds=bounds),
             "route": dict(mode="route", tau=tau), "stage=0": dict(mode="stage=0")}
    n = p["new_tokens"]
    for B in (1, 8):
        tb = time.time()
        if B > 1 and tb + t_b1 > deadline:  # batch 8 costs about what batch 1 did (lockstep rows)
            res["batches"][str(B)] = {"skipped": f"time budget (batch 1 took {t_b1:.0f} s)"}
            break
        batch = prompts[:B] if B > 1 else prompts[0]
        for kw in modes.values():  # warm-up (kernels, allocator)
            eng.generate(batch, 4, **kw)
        best, outs, stats = {k: math.inf for k in modes}, {}, {}
        for rep in range(a.repeats):
            if rep and time.time() > deadline - 5:
                break
            for name, kw in modes.items():
                _sync(a.device)
                t = time.perf_counter()
                out = eng.generate(batch, n, **kw)
                _sync(a.device)
                dt = time.perf_counter() - t
                if dt < best[name]:
                    best[name], outs[name], stats[name] = dt, out.tokens, out.stats
        full = outs["full"]
        rows = {}
        for name in modes:
            pairs = [(x, y) for o, f in zip(outs[name], full) for x, y in zip(o, f)]
            st = stats[name]
            rows[name] = {"tokens_per_s": B * n / best[name], "speedup": best["full"] / best[name],
                          "agreement_with_full": sum(x == y for x, y in pairs) / len(pairs), "identical_to_full": outs[name] == full,
                          "mean_depth": st.get("mean_depth"), "acceptance": st.get("acceptance"), "mean_accepted": st.get("mean_accepted")}
        ct = best["stage=0"] / best["full"]
        mean_acc = rows["speculative"]["mean_accepted"] or 0.0
        rows["limits"] = {
            "speculative_flops": (m + 1) / (m * c0 + (1 - c0)), "speculative_engine_round": (m + 1) / ((m + 1) * c0 + (1 - c0)),
            "speculative_at_acceptance": (mean_acc + 1) / ((m + 1) * c0 + (1 - c0)), "c0_time": ct,
            "speculative_time_share": (m + 1) / (m * ct + (1 - ct)), "stage0_flops": 1 / c0}
        res["batches"][str(B)] = rows
        t_b1 = time.time() - tb
        state[f"spec_identical_{res['dtype']}_b{B}"] = rows["speculative"]["identical_to_full"]
    state["decode_model"], state["decode_prompts"], state["decode_n"] = model, prompts, n
    return res


# ----------------------------------------------------------------------------- measurement
def section_measure(a, deadline: float) -> dict:
    from poelm.measure import run as measure
    from poelm.train.loop import evaluate_bpb
    from poelm.train.runtime import Runtime

    mc = _bench_module("measure_cost")
    trunk, stages = (TINY_TRUNK, TINY_STAGES) if a.tiny else (TRUNK, STAGES)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = PoEGPT(ModelConfig(**trunk, stage_layers=stages))
    model.init_weights(0)
    with torch.no_grad():
        for h in model.stage_heads:  # give the stage heads something to disagree about
            h.weight.normal_(0, 0.02)
    model.to(a.device).eval()
    V, T = trunk["vocab_size"], trunk["max_seq_len"]
    # 4 rows of 2048: the [K, rows, T, V] fp32 stage log-probs of one batch are then 4.3 GB
    split, cal, B = (2048, 512, 4) if a.tiny else (262_144, 131_072, 4)
    # the generation prompt set (genset) must fit max_seq_len: 32 tiny rows leave room for 8 new
    # tokens after a 16-token context; at 2048 measure's defaults fit
    gen = dict(gen_prompts=4, gen_tokens=8, gen_context=16) if a.tiny else {}
    tokens = torch.randint(1, V, (split + cal + 2,), generator=torch.Generator().manual_seed(0))
    tokens[::200] = 0
    tok = mc.ByteCounts(V)
    tb = tok.token_bytes().to(a.device)
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    rt = Runtime(0, 1, 0, torch.device(a.device), dt)

    def run_eval():
        evaluate_bpb(model, tokens, tb, B, T, rt)

    def run_measure():
        measure.measure(model, tok, {}, tokens=tokens, split_tokens=split, calib_tokens=cal, batch_size=B, seq_len=T,
                        probe_set=None, progress=False, dtype="bf16" if a.device == "cuda" else "fp32", **gen)

    def timed(f):
        _sync(a.device)
        t = time.perf_counter()
        f()
        _sync(a.device)
        return time.perf_counter() - t

    run_eval()  # warm-up
    te, tm = [], []
    for _ in range(a.repeats):
        te.append(timed(run_eval))
        tm.append(timed(run_measure))
        if time.time() > deadline - 2 * (te[-1] + tm[-1]):
            break
    e, mm = min(te), min(tm)
    return {"params": model.param_count()["total"], "tokens": split + cal, "split_tokens": split, "calib_tokens": cal, "batch": B,
            "eval_s": e, "measure_s": mm, "measure_tokens_per_s": (split + cal) / mm, "eval_tokens_per_s": (split + cal) / e,
            "cost_vs_eval": mm / e, "runs": len(te), "dtype": str(dt).removeprefix("torch.")}


# ----------------------------------------------------------------------------- exactness
def section_exactness(a, deadline: float, state: dict) -> dict:
    res = {k: v for k, v in state.items() if k.startswith("spec_identical")}
    from poelm.infer.engine import Engine

    model = state.get("decode_model")
    if model is not None and time.time() < deadline - 10:
        m32 = model.float()
        eng = Engine(m32)
        p, n = state["decode_prompts"][0], min(64, state["decode_n"])
        full, spec = eng.generate(p, n, mode="full").tokens, eng.generate(p, n, mode="speculative", m=4).tokens
        res["spec_identical_fp32_recheck_b1"] = full == spec  # the decode model again, in fp32 (SPEC's exactness dtype)
        state.pop("decode_model")
        del model, m32, eng
    if a.device == "cuda":
        torch.cuda.empty_cache()
    # 10 fp32 training steps on this device vs the CPU: same init (made on the CPU), same rows
    small = dict(vocab_size=512 if a.tiny else 4096, depth=5 if a.tiny else 8, n_embd=32 if a.tiny else 256, n_head=2 if a.tiny else 4,
                 n_kv_head=1 if a.tiny else 2, intermediate=64 if a.tiny else 1024, max_seq_len=32 if a.tiny else 256)
    stages = [2, 1, 1, 1] if a.tiny else [4, 2, 1, 1]
    losses = {}
    for dev in ("cpu", a.device):
        cfg = train_config(small, stages, dev, "fp32", 4, small["max_seq_len"], 10, False)
        model = PoEGPT(cfg.model)
        model.init_weights(seed=0)
        with tempfile.TemporaryDirectory(prefix="poelm-gpu-exact-") as tmp:
            losses[dev] = [r["loss"] for r in run_trainer(cfg, Path(tmp), seed=1, model=model)]
    ref, got = losses["cpu"], losses[a.device]
    rel = [abs(x - y) / abs(x) for x, y in zip(ref, got)]
    res.update(train_losses_cpu=ref, train_losses_device=got, train_loss_rel_diff_max=max(rel), train_loss_rel_diff=rel,
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32, device=a.device)
    return res


# ----------------------------------------------------------------------------- the table
def _fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def table(res: dict) -> str:
    L = [f"poelm GPU check: {res['env'].get('device_name')}; torch {res['env'].get('torch')}; {res['env'].get('date')}"]
    tr = res.get("train", {})
    if "error" in tr:
        L.append(f"train: FAILED {tr['error']}")
    elif tr:
        L.append(f"train ({tr.get('dtype')}, {tr.get('batch')} x {tr.get('trunk', {}).get('max_seq_len')} tokens/step, world "
                 f"{tr.get('world_size')}; {tr.get('nccl')}):")
        L.append(f"  {'variant':<18}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}{'params M':>10}")
        for v in tr.get("variants", []):
            if "tokens_per_s" not in v:
                L.append(f"  {v['name']:<18}  {v.get('skipped') or v.get('error')}")
                continue
            pk, pl = v.get("peak_allocated_bytes"), v.get("plan_bytes")
            L.append(f"  {v['name']:<18}{v['tokens_per_s']:>12,.0f}{_fmt(v.get('mfu'), '>8.1%') if v.get('mfu') is not None else '-':>8}"
                     f"{_fmt(pk / 2**30 if pk else None, '.2f'):>10}{_fmt(pl / 2**30 if pl else None, '.2f'):>10}{v['params'] / 1e6:>10.0f}")
    dec = res.get("decode", {})
    if "error" in dec:
        L.append(f"decode: FAILED {dec['error']}")
    elif dec:
        L.append(f"decode ({dec['params'] / 1e9:.2f}B params, {dec['dtype']}, {dec['new_tokens']} new tokens, m={dec['m']}):")
        for B, rows in dec["batches"].items():
            if "limits" not in rows:
                L.append(f"  batch {B}: {rows.get('skipped')}")
                continue
            lim = rows["limits"]
            L.append(f"  batch {B}: " + ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s ({v['speedup']:.2f}x)" for k, v in rows.items() if k != "limits"))
            s = rows["speculative"]
            L.append(f"    speculative acceptance {_fmt(s['acceptance'], '.3f')}, identical to full {s['identical_to_full']}; limits: FLOPs "
                     f"{lim['speculative_flops']:.2f}x, engine round {lim['speculative_engine_round']:.2f}x, at acceptance "
                     f"{lim['speculative_at_acceptance']:.2f}x, time share {lim['speculative_time_share']:.2f}x; wand agreement "
                     f"{rows['wand']['agreement_with_full']:.3f}, route agreement {rows['route']['agreement_with_full']:.3f}")
    me = res.get("measure", {})
    if "error" in me:
        L.append(f"measure: FAILED {me['error']}")
    elif me:
        L.append(f"measure: {me['measure_tokens_per_s']:,.0f} tok/s, {me['cost_vs_eval']:.2f}x one eval forward ({me['tokens']:,} tokens)")
    ex = res.get("exactness", {})
    if "error" in ex:
        L.append(f"exactness: FAILED {ex['error']}")
    elif ex:
        flags = ", ".join(f"{k.removeprefix('spec_identical_')} {v}" for k, v in ex.items() if k.startswith("spec_identical"))
        L.append(f"exactness: speculative == full ({flags}); 10 fp32 steps {ex['device']} vs cpu: max rel loss diff "
                 f"{ex['train_loss_rel_diff_max']:.2e}")
    return "\n".join(L)


def env_info(a) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": a.device, "tiny": a.tiny,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cuda": torch.version.cuda}
    if a.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device_name"] = f"CPU ({os.cpu_count()} cores)"
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-gpu.json", help="the JSON file (rewritten after every section)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models, a few steps: the CPU smoke run")
    ap.add_argument("--sections", default="train,decode,measure,exactness")
    ap.add_argument("--batch", type=int, default=8, help="training rows per step (seq 2048 each)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is kept)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time train.compile (CUDA only)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="scale every section's time budget")
    ap.add_argument("--train-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.train_child:
        return train_child(a.train_child)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in sections if s not in BUDGET]
    if bad:
        print(f"error: unknown section {bad[0]!r}: use {','.join(BUDGET)}", file=sys.stderr)
        return 2
    res = {"env": env_info(a), "budget_s": {k: v * a.budget_scale for k, v in BUDGET.items()}}
    atomic_write_json(a.out, res)
    state: dict = {}
    fns = {"train": lambda d: section_train(a, d), "decode": lambda d: section_decode(a, d, state),
           "measure": lambda d: section_measure(a, d), "exactness": lambda d: section_exactness(a, d, state)}
    for name in sections:
        t = time.time()
        try:
            res[name] = fns[name](t + BUDGET[name] * a.budget_scale)
        except Exception as e:  # recorded; the next section runs
            res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                         "traceback": traceback.format_exc()[-2000:]}
        res[name]["section_s"] = time.time() - t
        atomic_write_json(a.out, res)
        print(f"[{name}: {res[name]['section_s']:.1f}s{', FAILED' if 'error' in res[name] else ''}]", flush=True)
    print(table(res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
