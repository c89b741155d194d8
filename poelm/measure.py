"""``poelm measure``: every per-checkpoint figure of the model card, from one pass per batch.

What is measured (definitions in SPEC.md; the JSON record's keys in ``notes/record.md``):
full-K / single-stage / prefix-K' BPB, per-stage and full accuracy, the alpha sweep and the
crossover gap, WAND p99 bounds (written back to the checkpoint), confidence-aware routing at a cap,
self-speculative decoding statistics, the sample-mode probe, and a 95% block-bootstrap interval for
every BPB and accuracy figure and for every delta against a reference checkpoint (``--against``).

Slices (the same for every checkpoint; deterministic in the data and the tokenizer):

- measurement slice: the first ``split_tokens + 1`` validation tokens, i.e. ``split_tokens``
  targets, cut into rows of ``seq_len`` (a final shorter row keeps every target) exactly as
  ``data.val_batches`` cuts them (the training evaluation's layout);
- calibration slice: the next ``calib_tokens + 1`` tokens (disjoint). WAND bounds and the routing
  threshold are calibrated there; the routing fraction is then reported on the measurement slice.
- If the validation split (or ``--data`` corpus) holds fewer tokens than both slices need, both
  shrink in proportion and the record gives the sizes actually used.

Performance: each slice position is visited once. A batch runs ``model.stage_log_probs`` (the
same forward as the training evaluation) and ``metrics.position_stats`` derives every
position-level value from it, in chunks of at most ``CHUNK_ELEMENTS`` logits (per device type);
the accumulators (block sums, histograms, an exact 1% tail) have a fixed size, so peak memory does
not depend on the slice length (apart from the token ids themselves and one row of ~30 sums per
block of 1024 tokens). ``bench/measure_cost.py`` prints the cost against a plain evaluation. bf16
autocast on CUDA (``dtype="auto"``); generation (probe, speculative) always runs in fp32 because
SPEC defines speculative output as token-identical to fp32 full-K greedy.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .bootstrap import DEFAULT_LEVEL, DEFAULT_SAMPLES, delta_intervals, figure_intervals
from .calibrate import MANIFESTS, Calibrator, routing_entry, routing_summary, write_bounds
from .errors import DataError, PoelmError
from .fsio import atomic_write_bytes
from .metrics import ALPHAS, BlockSums, RoutingHistogram, position_stats, routing_threshold
from .probe import get_engine, load_prompt_set, run_probe, run_spec

DEFAULT_SPLIT_TOKENS = 1_048_576  # the card's --split-tokens
DEFAULT_CALIB_TOKENS = 131_072  # the card's WAND calibration slice
DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BATCH_SIZE = 8
# positions x vocab per position_stats call. On CPU a small chunk keeps the ~40 passes over each
# [chunk, V] row block in cache (measured ~15-20% faster than whole batches on the embedded model);
# on a GPU large chunks amortise kernel launches (512 MB per fp32 temporary).
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 27}
RECORD_NAME = "poelm_measure.json"
ROUTING_METRICS = RoutingHistogram.METRICS


# ----------------------------------------------------------------------------- slices
def cut_slices(tokens: torch.Tensor, split_tokens: int, calib_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(measurement slice of split+1 tokens, calibration slice of calib+1 tokens or None); both
    shrink in proportion when ``tokens`` is shorter than ``split + calib + 2``."""
    n = int(tokens.numel())
    need = split_tokens + calib_tokens + 2 if calib_tokens > 0 else split_tokens + 1
    if n < need:
        if calib_tokens > 0:
            split_tokens = max(1, int((n - 2) * split_tokens / (split_tokens + calib_tokens)))
            calib_tokens = max(0, n - split_tokens - 2)
        else:
            split_tokens = n - 1
    if split_tokens < 1:
        raise DataError(f"only {n} tokens to measure on: need at least 2")
    meas = tokens[: split_tokens + 1]
    calib = tokens[split_tokens + 1 : split_tokens + calib_tokens + 2] if calib_tokens > 0 else None
    return meas, (calib if calib is not None and calib.numel() >= 2 else None)


def corpus_tokens(path: str, tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of ``[BOS] + encode(doc)`` over the documents of a txt / jsonl /
    parquet corpus (``data.read_documents``, file order): ``--data`` measures on it."""
    from .data import read_documents

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


def validation_tokens(meta: dict, tokenizer, n: int) -> torch.Tensor:
    """The checkpoint's own validation split (``data.val_tokens``), all of it when shorter than n."""
    from . import config as config_mod
    from .data import val_tokens

    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise PoelmError("this checkpoint carries no poelm config (its data settings are unknown): measure it with --data PATH")
    data_cfg = config_mod.from_dict(cfg).data
    return val_tokens(data_cfg, tokenizer, n, allow_fewer=True)


# ----------------------------------------------------------------------------- one pass
def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return (lambda: nullcontext()), "fp32"
    if dtype != "bf16":
        raise PoelmError(f"unknown dtype {dtype!r}: use auto, fp32 or bf16")
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), "bf16"


def _rows(tokens: torch.Tensor, seq_len: int, batch_size: int):
    from .data import val_batches

    return val_batches(tokens, batch_size, seq_len)


@torch.no_grad()
def run_pass(model, tokens, *, seq_len, batch_size, token_bytes, autocast, consumers, bounds=None,
             confidence="maxprob", alphas=ALPHAS, bar=None, full=True):
    """One forward per batch over ``tokens``; every consumer gets ``(stats, positions)`` for each
    chunk of positions (``positions`` = target indices within the slice)."""
    dev = token_bytes.device
    offset = 0
    for x, y in _rows(tokens, seq_len, batch_size):
        x, y = x.to(dev), y.to(dev)
        with autocast():
            z = model.stage_log_probs(x)
        K, V = z.shape[0], z.shape[-1]
        z = z.float().reshape(K, -1, V)
        yf = y.reshape(-1)
        N = yf.numel()
        step = max(1, CHUNK_ELEMENTS.get(dev.type, 1 << 25) // V)
        for a in range(0, N, step):
            st = position_stats(z[:, a : a + step], yf[a : a + step], token_bytes, alphas, bounds, confidence, full)
            pos = torch.arange(offset + a, offset + min(N, a + step), device=dev)
            for c in consumers:
                c(st, pos)
        offset += N
        if bar is not None:
            bar.update(N)
    return offset


def evaluate(model, meas, calib, *, seq_len, batch_size, token_bytes, autocast, block_tokens, cap, metric,
             confidence, alphas=ALPHAS, bar=None) -> dict:
    """Calibration pass (WAND ranges, confidence histogram) then measurement pass (block sums,
    held-out routing at the calibrated tau, WAND exits at the calibrated bounds)."""
    K = model.config.n_stages
    dev = token_bytes.device
    kw = dict(seq_len=seq_len, batch_size=batch_size, token_bytes=token_bytes, autocast=autocast,
              confidence=confidence, alphas=alphas, bar=bar)
    cal = wand = None
    if calib is not None:
        cal = Calibrator(K, n_max=calib.numel(), softcap=model.config.softcap, device=dev)
        run_pass(model, calib, consumers=[lambda st, pos: cal.add(st)], full=False, **kw)
        wand = cal.wand_summary()
    bounds = wand["bounds"] if wand else None
    index = None
    if cal is not None:
        index = routing_threshold(*cal.routing.arrays(metric), cap, metric)["index"]
    blocks = BlockSums(K, meas.numel() - 1, block_tokens, len(alphas), device=dev)
    held = RoutingHistogram(cal.routing.bins if cal else 10000, device=dev)
    exits = torch.zeros(K + 1, dtype=torch.float64, device=dev)  # per exit stage, then agreements

    def consume(st, pos):
        if index is not None:
            st["routed"] = held.routed(st["conf"], index)
        blocks.add(st, pos)
        held.add(st)
        if "exit_stage" in st:
            c = st["counted"]
            exits[:K] += torch.bincount(st["exit_stage"][c], minlength=K).double()
            exits[K] += (st["exit_agree"] & c).sum().double()

    run_pass(model, meas, consumers=[consume], bounds=bounds, **kw)
    return {"calibrator": cal, "wand": wand, "blocks": blocks, "held": held, "exits": exits.cpu().numpy()}


# ----------------------------------------------------------------------------- the record
def _seq_len(model, meta: dict, seq_len: int | None) -> int:
    if seq_len:
        return min(int(seq_len), model.config.max_seq_len)
    train = (meta.get("config") or {}).get("train") or {}
    return int(train.get("seq_len") or 0) or model.config.max_seq_len


def _unpack_against(against):
    """A reference given as a model, or ``(model, tokenizer, meta)`` / ``(model, tokenizer, meta,
    label)``; returns (model, tokenizer or None, label)."""
    if against is None:
        return None
    if isinstance(against, torch.nn.Module):
        return against, None, "reference"
    model, tok, meta = against[0], against[1], against[2] if len(against) > 2 else {}
    label = against[3] if len(against) > 3 else str((meta or {}).get("target") or (meta or {}).get("path") or "reference")
    return model, tok, label


@torch.no_grad()
def measure(model, tokenizer, meta, *, tokens=None, split_tokens=DEFAULT_SPLIT_TOKENS, calib_tokens=DEFAULT_CALIB_TOKENS,
            batch_size=DEFAULT_BATCH_SIZE, seq_len=None, cap=0.02, routing_metric="target_regression", confidence="maxprob",
            m=4, probe_set="card", max_new_tokens=60, against=None, block_tokens=DEFAULT_BLOCK_TOKENS,
            samples=DEFAULT_SAMPLES, level=DEFAULT_LEVEL, seed=0, dtype="auto", progress=True, target=None, data=None) -> dict:
    """Measure one model; returns the record (``notes/record.md``). See the module docstring.

    ``tokens``: the token stream the slices are cut from (default: the checkpoint's validation
    split, from ``meta["config"]``); ``data``: its label in the record. ``against``: a reference
    model (or ``(model, tokenizer, meta[, label])``) evaluated on the same slices for paired
    deltas. ``probe_set``: ``card``, ``embedded``, a JSONL path, or None to skip the probe and the
    speculative statistics."""
    t0 = time.time()
    meta = dict(meta or {})
    if routing_metric not in ROUTING_METRICS:
        raise PoelmError(f"unknown routing metric {routing_metric!r}: use one of {', '.join(ROUTING_METRICS)}")
    if confidence not in ("maxprob", "margin"):
        raise PoelmError(f"unknown confidence {confidence!r}: use maxprob or margin")
    for name, v in (("split_tokens", split_tokens), ("block_tokens", block_tokens), ("batch_size", batch_size)):
        if int(v) <= 0:
            raise PoelmError(f"{name} must be positive, got {v}")
    if int(calib_tokens) < 0:
        raise PoelmError(f"calib_tokens must be >= 0, got {calib_tokens}")
    model.eval()
    cfg = model.config
    K = cfg.n_stages
    dev = next(model.parameters()).device
    ref = _unpack_against(against)
    if ref is not None and ref[1] is not None and ref[1].fingerprint != tokenizer.fingerprint:
        raise PoelmError("--against needs a checkpoint with the same tokenizer (paired deltas compare the same tokens)")
    if ref is not None and ref[0].config.n_stages != K:
        raise PoelmError(f"--against needs a model with the same number of stages (K={K} vs {ref[0].config.n_stages})")
    if tokens is None:
        tokens = validation_tokens(meta, tokenizer, split_tokens + calib_tokens + 2)
        data = data or "val split"
    meas, calib = cut_slices(torch.as_tensor(tokens, dtype=torch.long).flatten(), int(split_tokens), int(calib_tokens) if K > 1 else 0)
    T = _seq_len(model, meta, seq_len)
    autocast, dtype_label = _autocast(dev, dtype)
    tb = tokenizer.token_bytes().to(dev)
    if tb.numel() < cfg.vocab_size:
        tb = torch.cat([tb, tb.new_zeros(cfg.vocab_size - tb.numel())])
    n_meas, n_cal = meas.numel() - 1, (calib.numel() - 1 if calib is not None else 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(n_meas + n_cal) * (2 if ref is not None else 1), unit="tok", desc="measure", leave=False)
    kw = dict(seq_len=T, batch_size=batch_size, token_bytes=tb, autocast=autocast, block_tokens=block_tokens, cap=cap,
              metric=routing_metric, confidence=confidence, bar=bar)
    ev = evaluate(model, meas, calib, **kw)
    ref_ev = evaluate(ref[0], meas, calib, **kw) if ref is not None else None
    if bar is not None:
        bar.close()

    figs = figure_intervals(ev["blocks"], K, ALPHAS, samples, seed, level)
    flops = model.flops_per_token(T)
    c0 = flops["per_stage"][0] / flops["total"]
    rec = {
        "schema": 1,
        "target": target,
        "branch": meta.get("branch"),
        "step": int(meta["step"]) if meta.get("step") is not None else None,
        **{k: meta.get(k) for k in ("rel_step", "phase", "lrm", "tokens", "tokens_in_phase", "train_val_bpb")},
        "K": K, "stage_layers": list(cfg.stage_layers),
        "split_tokens": n_meas, "calib_tokens": n_cal,
        "split_tokens_requested": int(split_tokens), "calib_tokens_requested": int(calib_tokens),
        "seq_len": T, "data": data or "tokens",
        "bpb": {"full": figs["bpb.full"], "single": [figs[f"bpb.single.{k}"] for k in range(K)],
                "prefix": [figs[f"bpb.prefix.{j}"] for j in range(K - 1)]},
        "acc": {"single": [figs[f"acc.single.{k}"] for k in range(K)], "full": figs["acc.full"]},
        "alpha_sweep": {"alphas": list(ALPHAS), "bpb": [figs[f"alpha_sweep.bpb.{i}"]["value"] for i in range(len(ALPHAS))],
                        "ci": [figs[f"alpha_sweep.bpb.{i}"]["ci"] for i in range(len(ALPHAS))]},
        "crossover_gap": figs["crossover_gap"]["value"], "crossover_gap_ci": figs["crossover_gap"]["ci"],
        "wand": None, "routing": None, "spec": None, "probe": None, "against": None,
        "bootstrap": {"block_tokens": int(block_tokens), "blocks": ev["blocks"].n_blocks, "samples": int(samples),
                      "seed": int(seed), "level": level, "interval": "percentile"},
    }
    agree = figs["routing.agreement_s0_full"]
    if ev["wand"] is not None:
        w = ev["wand"]
        counted = float(ev["blocks"].array()[:, ev["blocks"].index["count"]].sum())
        ex = ev["exits"]
        rec["wand"] = {**w, "calib_tokens": n_cal,
                       "exit": {"fraction_per_stage": [float(x / counted) if counted else None for x in ex[:K]],
                                "agreement": float(ex[K] / counted) if counted else None}}
    if ev["calibrator"] is not None:
        r = routing_summary(ev["calibrator"].routing, ev["held"], cap, routing_metric, confidence, c0, agree["value"])
        r["agreement_ci"] = agree["ci"]
        r["fraction_ci"] = figs["routing.fraction"]["ci"]
        rec["routing"] = r
    if probe_set is not None:
        label, prompts = load_prompt_set(probe_set)
        engine = get_engine(model)
        pr = run_probe(model, tokenizer, prompts, label, max_new_tokens, engine, m)
        if K > 1:
            rec["spec"] = run_spec(model, pr, m, engine)
        for row in pr["results"]:
            row.pop("_gen")
        rec["probe"] = pr
    if ref_ev is not None:
        rec["against"] = {"target": ref[2], "deltas": delta_intervals(ev["blocks"], ref_ev["blocks"], K, ALPHAS, samples, seed, level,
                                                                      routing=ref_ev["calibrator"] is not None)}
    rec.update(elapsed_s=time.time() - t0, device=str(dev), dtype=dtype_label, poelm_version=__version__)
    return rec


# ----------------------------------------------------------------------------- summary
def _f(x, d=6):
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(node, d=6):
    v, ci = node.get("value"), node.get("ci") or [None, None]
    if ci[0] is None:
        return _f(v, d)
    return f"{_f(v, d)} [{_f(ci[0], d)}, {_f(ci[1], d)}]"


def format_summary(rec: dict) -> str:
    """A few lines for the terminal (the record has everything)."""
    K = rec["K"]
    L = [f"{rec.get('target') or 'model'}  step {rec.get('step')}  K={K} {rec['stage_layers']}  "
         f"{rec['split_tokens']:,} tokens ({rec['data']}), calib {rec['calib_tokens']:,}, {rec['device']} {rec['dtype']}, "
         f"{rec['elapsed_s']:.1f}s"]
    b = rec["bpb"]
    L.append(f"  BPB full K    {_ci(b['full'])}   (95% block-bootstrap interval)")
    L.append("  BPB single    " + "  ".join(f"s{k} {_f(x['value'])}" for k, x in enumerate(b["single"])))
    if b["prefix"]:
        L.append("  BPB prefix    " + "  ".join(f"K'={j + 1} {_f(x['value'])}" for j, x in enumerate(b["prefix"])))
    a = rec["acc"]
    L.append("  accuracy      " + "  ".join(f"s{k} {_f(x['value'], 4)}" for k, x in enumerate(a["single"])) + f"  full {_f(a['full']['value'], 4)}")
    sw = rec["alpha_sweep"]
    L.append("  alpha sweep   " + "  ".join(f"{al:g}: {_f(v)}" for al, v in zip(sw["alphas"], sw["bpb"])) + f"   crossover gap {_f(rec['crossover_gap'])}")
    if rec.get("wand"):
        L.append("  WAND p99      " + "  ".join(f"{s}->{s + 1} {v:.4f}" for s, v in enumerate(rec["wand"]["bounds"])))
    r = rec.get("routing")
    if r:
        L.append(f"  routing       {r['metric']} <= {r['cap']}: tau {r['tau']:.4f}, routed {100 * r['fraction']:.2f}%, "
                 f"projected {r['projected_speedup']:.3f}x, s0=full agreement {_f(r['agreement_s0_full'], 4)}")
    s = rec.get("spec")
    if s:
        sp = "n/a" if s.get("speedup") is None else f"{s['speedup']:.2f}x"
        L.append(f"  speculative   m={s['m']} ({s['mode']}): acceptance {_f(s['acceptance'], 4)}, "
                 f"mean accepted {_f(s['mean_accepted'], 2)}/{s['m']}, speedup {sp}")
    p = rec.get("probe")
    if p:
        marks = " ".join(f"{x['name']} {'PASS' if x['pass'] else 'fail'}" for x in p["results"])
        L.append(f"  probe ({p['set']}) {p['passed']}/{p['total']}: {marks}")
    ag = rec.get("against")
    if ag:
        d = ag["deltas"]
        noisy = [k for k, v in d.items() if v.get("inside_noise")]
        L.append(f"  vs {ag['target']}: dBPB full {_ci(d['bpb.full'])}, dacc full {_ci(d['acc.full'], 4)}; "
                 f"{len(d) - len(noisy)} of {len(d)} deltas outside noise")
    return "\n".join(L)


# ----------------------------------------------------------------------------- targets
def resolve_target(target: str, workdir) -> tuple[Path, str | None, str | None]:
    """(local dir, repo, branch): a checkpoint dir, a run dir (its newest checkpoint), an exported
    folder, or ``REPO@step-XXXXX`` checked out under ``workdir`` with ``publish.checkout``."""
    p = Path(target)
    if "@" in str(target) and not p.exists():
        try:
            from . import publish
        except ImportError:
            raise PoelmError(f"{target}: REPO@branch targets need poelm.publish; give a checkpoint dir instead") from None
        repo, branch = publish.parse_target(target)
        d = publish.checkout(repo, branch, Path(workdir) / branch)
        return Path(d), repo, branch
    from .checkpoint import resolve_source

    return Path(resolve_source(str(target))), None, None


def pick_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PoelmError("--device cuda but no CUDA device is available; use --device cpu")
    return str(device)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n").encode("utf-8")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(obj):
    """NaN/inf -> None so the record is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def measure_target(target: str, *, data: str | None = None, out: str | None = None, against: str | None = None,
                   device: str | None = "auto", write_calibration: bool | None = None, probe_set: str | None = "auto",
                   split_tokens: int = DEFAULT_SPLIT_TOKENS, calib_tokens: int = DEFAULT_CALIB_TOKENS, **kw) -> dict:
    """Load ``target`` (``checkpoint.load_model``), measure it, store the calibration and the record.

    ``data``: measure on this txt/jsonl/parquet corpus instead of the validation split.
    ``write_calibration`` (default: only when measuring the checkpoint's own validation split, so
    a measurement on another corpus never overwrites the published calibration) stores the WAND
    bounds and routing threshold with the checkpoint (``calibrate.write_bounds``). The record goes
    to ``out``, else ``<checkpoint dir>/poelm_measure.json``; for ``REPO@branch`` both the
    calibrated config.json and the record are committed to the branch
    (``publish.update_branch_files``). ``probe_set="auto"``: ``embedded`` for a model trained on
    the embedded corpus, else ``card``. Other keywords go to ``measure``."""
    from .checkpoint import load_model

    dev = pick_device(device)
    if write_calibration is None:
        write_calibration = data is None
    with tempfile.TemporaryDirectory(prefix="poelm-measure-") as work:
        path, repo, branch = resolve_target(target, Path(work) / "target")
        model, tok, meta = load_model(path, device=dev)
        if branch:
            meta["branch"] = branch
        label = str(target) if repo else str(path)
        if probe_set == "auto":
            dcfg = (meta.get("config") or {}).get("data") or {}
            probe_set = "embedded" if dcfg.get("path") == "embedded" and not dcfg.get("sources") else "card"
        tokens = corpus_tokens(data, tok, split_tokens + calib_tokens + 2) if data else None
        ref = None
        if against:
            rpath, rrepo, _ = resolve_target(against, Path(work) / "against")
            rmodel, rtok, rmeta = load_model(rpath, device=dev)
            ref = (rmodel, rtok, rmeta, str(against) if rrepo else str(rpath))
        rec = measure(model, tok, meta, tokens=tokens, target=label, data=data, against=ref, probe_set=probe_set,
                      split_tokens=split_tokens, calib_tokens=calib_tokens, **kw)
        rec = _clean(rec)
        written = []
        if write_calibration and rec.get("wand"):
            written = write_bounds(path, rec["wand"]["bounds"], routing_entry(rec.get("routing")))
        if repo:  # the branch gets the data files; publish refreshes its manifest itself
            written = [name for name in written if name not in MANIFESTS]
        rec["calibration_written"] = written
        body = _json_bytes(rec)
        if out:
            atomic_write_bytes(out, body)
        if repo:
            from . import publish

            files = {name: (path / name).read_bytes() for name in written}
            files[RECORD_NAME] = body
            publish.update_branch_files(repo, branch, files)
        elif not out:
            atomic_write_bytes(path / RECORD_NAME, body)
        rec["record_path"] = str(out) if out else (f"{target}:{RECORD_NAME}" if repo else str(path / RECORD_NAME))
    return rec
