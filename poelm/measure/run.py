"""``poelm measure``: every per-checkpoint figure of the model card, from one pass per batch.

What is measured (definitions in SPEC.md; the JSON record's keys in ``docs/record.md``):
full-K / single-stage / prefix-K' BPB, per-stage and full accuracy, the alpha sweep and the
crossover gap, WAND p99 bounds (written back to the checkpoint), confidence-aware routing at a cap,
self-speculative decoding statistics, the sample-mode probe, and a 95% block-bootstrap interval for
every BPB and accuracy figure and for every delta against a reference checkpoint (``--against``).

Slices (SPEC "Slices"; the same for every checkpoint, deterministic in the data and the tokenizer):

- measurement slice: ``split_tokens + 1`` validation tokens, i.e. ``split_tokens`` targets, cut
  into rows of ``seq_len`` (a final shorter row keeps every target) exactly as
  ``data.val_batches`` cuts them (the training evaluation's layout);
- calibration slice: ``calib_tokens + 1`` more (disjoint). WAND bounds and the routing threshold
  are calibrated there; the routing fraction is then reported on the measurement slice.
- On the validation split both come from ``data.val_slices``: each source's validation stream
  gives the measurement slice its first share and the calibration slice the next one, so on a
  mixture both hold every source in proportion to its weight, and the measurement slice does not
  depend on ``calib_tokens``. On a ``--data`` corpus (one stream) the same rule cuts the front.
  A stream too short for both (one source) is fitted by ``data.slice_sizes`` (the measurement
  slice at most 8/9 of it, whatever the calibration size) and the record gives the sizes used.

Performance: each slice position is visited once. A batch runs ``model.stage_log_probs`` (the
same forward as the training evaluation) and ``metrics.position_stats`` derives every
position-level value from it, in chunks of at most ``CHUNK_ELEMENTS`` logits (per device type);
the accumulators (block sums, histograms, an exact 1% tail) have a fixed size, so peak memory does
not depend on the slice length (apart from the token ids themselves and one row of ~30 sums per
block of 1024 tokens). ``bench/measure_cost.py`` prints the cost against a plain evaluation. bf16
autocast on CUDA (``dtype="auto"``); generation (probe, speculative) always runs in fp32 because
SPEC defines speculative output as token-identical to fp32 full-K greedy.

Distributed (``torchrun --nproc_per_node=N -m poelm measure ...``; ``measure_target`` joins the
process group from torchrun's environment, gloo on CPU, NCCL on CUDA): batch b of each slice
(``data.val_batches``' cut, unchanged) runs on rank ``b % world``, so every position is computed
once, in the same batch (same shapes, same chunks) as on one process, and the accumulators are
merged before anything is derived from them (``metrics``' ``all_reduce``: block sums and histograms
summed in float64, the exact quantile tail gathered). The WAND bounds and the routing threshold
are therefore calibrated on the merged calibration slice and identical on every rank before the
measurement pass. Every position-level figure (BPB, accuracy, alpha sweep, WAND bounds and
quantiles, exits, routing, bootstrap intervals from the same merged block sums and seed) equals
the one-process figure up to float64 summation order (counts, quantile tails and tau exactly).
Rank 0 alone then runs the bootstrap and the generation-based parts (probe, speculative
statistics) and broadcasts the record, so ``measure`` returns the same record on every rank;
``measure_target`` writes the record and the calibration on rank 0 only and returns None on the
other ranks. Whole batches rather than rows go to ranks so that results do not depend on how
rows were batched (CPU and GPU kernels may round differently for other batch shapes).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from poelm import __version__, targets
from poelm.measure.bootstrap import delta_intervals, figure_intervals
from poelm.measure.calibrate import MANIFESTS, Calibrator, routing_entry, routing_summary, write_bounds
from poelm.core.errors import PoelmError
from poelm.fsio import atomic_write_bytes
from poelm.trajectory import publish
from poelm.measure.metrics import ALPHAS, BlockSums, RoutingHistogram, position_stats, routing_threshold, world_size
from poelm.measure import genset, timing
from poelm.measure import record
from poelm.measure.options import MeasureOptions, WritePolicy
from poelm.measure.record import Accuracy, Against, AlphaSweep, Bootstrap, Bpb, Figure, Generation, Record, Routing, Wand, WandExit
from poelm.measure.slices import corpus_tokens, cut_slices, validation_slices  # noqa: F401  (measure.cut_slices, tests)

DEFAULT_SPLIT_TOKENS = MeasureOptions.split_tokens  # the defaults live in MeasureOptions (options.py)
DEFAULT_CALIB_TOKENS = MeasureOptions.calib_tokens
# positions x vocab per position_stats call. On CPU a small chunk keeps the ~40 passes over each
# [chunk, V] row block in cache (measured ~15-20% faster than whole batches on the embedded model);
# on a GPU large chunks amortise kernel launches (512 MB per fp32 temporary).
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 27}
RECORD_NAME = publish.MEASURE  # the record's file name, spelled once (trajectory/publish.py)


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
    from poelm.data.corpus import val_batches

    return val_batches(tokens, batch_size, seq_len)


def _rank_world() -> tuple[int, int]:
    world = world_size()
    return (torch.distributed.get_rank() if world > 1 else 0), world


@torch.no_grad()
def run_pass(model, tokens, *, seq_len, batch_size, token_bytes, autocast, consumers, bounds=None,
             confidence="maxprob", alphas=ALPHAS, bar=None, full=True):
    """One forward per batch over ``tokens``; every consumer gets ``(stats, positions)`` for each
    chunk of positions (``positions`` = target indices within the slice). Under
    ``torch.distributed`` this rank runs batches ``b`` with ``b % world == rank`` only."""
    dev = token_bytes.device
    rank, world = _rank_world()
    offset = 0
    for b, (x, y) in enumerate(_rows(tokens, seq_len, batch_size)):
        if b % world != rank:
            offset += y.numel()
            if bar is not None:
                bar.update(y.numel())
            continue
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
        wand = cal.all_reduce().wand_summary()  # bounds and tau from every rank's positions
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
    blocks.all_reduce()
    held.all_reduce()
    if world_size() > 1:
        torch.distributed.all_reduce(exits, op=torch.distributed.ReduceOp.SUM)
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
def measure(model, tokenizer, meta, opts: MeasureOptions | None = None, *, tokens=None, against=None, target=None, data=None,
            **options) -> dict:
    """Measure one model; returns the record (``docs/record.md``). See the module docstring.

    ``opts``: a ``MeasureOptions`` (``poelm/measure/options.py``); keywords named like its fields
    replace its values. ``tokens``: the token stream the slices are cut from (default: the
    checkpoint's validation split, from ``meta["config"]``); ``data``: its label in the record.
    ``against``: a reference model (or ``(model, tokenizer, meta[, label])``) evaluated on the same
    slices for paired deltas."""
    t0 = time.time()
    meta = dict(meta or {})
    o = MeasureOptions.of(opts, **options).checked(model.config.max_seq_len)
    o = o.replace(probe_set=o.probe_for(meta))
    model.eval()
    cfg = model.config
    K = cfg.n_stages
    dev = next(model.parameters()).device
    ref = _unpack_against(against)
    if ref is not None and ref[1] is not None and ref[1].fingerprint != tokenizer.fingerprint:
        raise PoelmError("--against needs a checkpoint with the same tokenizer (paired deltas compare the same tokens)")
    if ref is not None and ref[0].config.n_stages != K:
        raise PoelmError(f"--against needs a model with the same number of stages (K={K} vs {ref[0].config.n_stages})")
    n_calib = int(o.calib_tokens) if K > 1 else 0
    if tokens is None:
        meas, calib = validation_slices(meta, tokenizer, int(o.split_tokens), n_calib)
        data = data or "val split"
    else:
        meas, calib = cut_slices(torch.as_tensor(tokens, dtype=torch.long).flatten(), int(o.split_tokens), n_calib)
    T = _seq_len(model, meta, o.seq_len)
    autocast, dtype_label = _autocast(dev, o.dtype)
    tb = tokenizer.token_bytes().to(dev)
    if tb.numel() < cfg.vocab_size:
        tb = torch.cat([tb, tb.new_zeros(cfg.vocab_size - tb.numel())])
    n_meas, n_cal = meas.numel() - 1, (calib.numel() - 1 if calib is not None else 0)
    rank, world = _rank_world()
    bar = None
    if o.progress and rank == 0:
        from tqdm import tqdm

        # disable=None: a bar on a terminal only; piped, the summary the caller prints is the line
        bar = tqdm(total=(n_meas + n_cal) * (2 if ref is not None else 1), unit="tok", desc="measure", leave=False, disable=None)
    kw = dict(seq_len=T, batch_size=o.batch_size, token_bytes=tb, autocast=autocast, block_tokens=o.block_tokens, cap=o.cap,
              metric=o.routing_metric, confidence=o.confidence, bar=bar)
    ev = evaluate(model, meas, calib, **kw)
    run = _Run(t0=t0, K=K, T=T, dev=dev, dtype_label=dtype_label, n_meas=n_meas, n_cal=n_cal, target=target, data=data,
               world=world, gen_context=min(int(o.gen_context), cfg.max_seq_len - int(o.gen_tokens) - 1), meas=meas)
    ref_ev = evaluate(ref[0], meas, calib, **kw) if ref is not None else None
    if bar is not None:
        bar.close()
    if world == 1:
        return _record(model, tokenizer, meta, ev, ref_ev, ref, o, run)
    return _on_rank0(lambda: _record(model, tokenizer, meta, ev, ref_ev, ref, o, run), rank, world, dev)


def _on_rank0(build, rank: int, world: int, dev) -> dict:
    """``build()`` on rank 0 only; its record (JSON text, NaN kept) broadcast to every rank. A
    failure on rank 0 is broadcast too, so the other ranks raise instead of waiting."""
    from poelm.train.runtime import Runtime, _broadcast_text

    rt = Runtime(rank, world, 0, torch.device(dev), torch.float32)
    if rank != 0:
        got = json.loads(_broadcast_text(None, rt))
        if "__rank0_error__" in got:
            raise PoelmError(f"rank 0 failed: {got['__rank0_error__']}")
        return got
    try:
        rec = build()
    except Exception as e:
        _broadcast_text(json.dumps({"__rank0_error__": f"{type(e).__name__}: {e}"}), rt)
        raise
    _broadcast_text(json.dumps(rec, default=record.json_default), rt)
    return rec


@dataclass(frozen=True)
class _Run:
    """What one ``measure`` call derived before the record: slice sizes, row length, device."""

    t0: float
    K: int
    T: int
    dev: torch.device
    dtype_label: str
    n_meas: int
    n_cal: int
    target: str | None
    data: str | None
    world: int
    gen_context: int
    meas: torch.Tensor


def _record(model, tokenizer, meta, ev, ref_ev, ref, o: MeasureOptions, run: _Run) -> dict:
    """The record from the merged accumulators (bootstrap, routing, WAND exits), plus the probe
    and the speculative statistics (generation: one process)."""
    K, T, n_cal, samples, seed, level = run.K, run.T, run.n_cal, o.samples, o.seed, o.level
    cfg = model.config
    figs = figure_intervals(ev["blocks"], K, ALPHAS, samples, seed, level)
    flops = model.flops_per_token(seq_len=T)  # routing c0: the slice rows' mean context
    c0 = flops["per_stage"][0] / flops["total"]
    F = Figure.from_dict
    rec = Record.from_meta(
        meta, target=run.target, branch=meta.get("branch"), K=K, stage_layers=cfg.stage_layers, split_tokens=run.n_meas, calib_tokens=n_cal,
        split_tokens_requested=int(o.split_tokens), calib_tokens_requested=int(o.calib_tokens),
        seq_len=T, data=run.data or "tokens", world_size=int(run.world),
        bpb=Bpb(full=F(figs["bpb.full"]), single=[F(figs[f"bpb.single.{k}"]) for k in range(K)],
                prefix=[F(figs[f"bpb.prefix.{j}"]) for j in range(K - 1)]),
        acc=Accuracy(single=[F(figs[f"acc.single.{k}"]) for k in range(K)], full=F(figs["acc.full"])),
        alpha_sweep=AlphaSweep(alphas=list(ALPHAS), bpb=[figs[f"alpha_sweep.bpb.{i}"]["value"] for i in range(len(ALPHAS))],
                               ci=[figs[f"alpha_sweep.bpb.{i}"]["ci"] for i in range(len(ALPHAS))]),
        crossover_gap=figs["crossover_gap"]["value"], crossover_gap_ci=figs["crossover_gap"]["ci"],
        bootstrap=Bootstrap(block_tokens=int(o.block_tokens), blocks=ev["blocks"].n_blocks, samples=int(samples),
                            seed=int(seed), level=level, interval="percentile"))
    agree = figs["routing.agreement_s0_full"]
    if ev["wand"] is not None:
        counted = float(ev["blocks"].array()[:, ev["blocks"].index["count"]].sum())
        ex = ev["exits"]
        rec.wand = Wand.from_dict({**ev["wand"], "calib_tokens": n_cal})
        rec.wand.exit = WandExit(fraction_per_stage=[float(x / counted) if counted else None for x in ex[:K]],
                                 agreement=float(ex[K] / counted) if counted else None)
    if ev["calibrator"] is not None:
        r = routing_summary(ev["calibrator"].routing, ev["held"], o.cap, o.routing_metric, o.confidence, c0, agree["value"])
        rec.routing = Routing.from_dict({**r, "agreement_ci": agree["ci"], "fraction_ci": figs["routing.fraction"]["ci"]})
    if o.probe_set is not None:
        prompts, starts = genset.cut_prompts(run.meas, tokenizer.bos_id, int(o.gen_prompts), run.gen_context, int(o.gen_seed))
        rec.generation = Generation(source="measurement slice", prompts=len(prompts), prompts_requested=int(o.gen_prompts),
                                    context_tokens=run.gen_context, new_tokens_per_prompt=int(o.gen_tokens), seed=int(o.gen_seed),
                                    starts=starts, interval=f"{level:.0%} expanded percentile bootstrap over prompts")
        got = timing.probe_and_timing(rec, model, tokenizer, o.probe_set, o.max_new_tokens, o.m, o.confidence,
                                      gen_prompts=prompts, gen_tokens=int(o.gen_tokens), samples=samples, seed=seed, level=level,
                                      repeats=o.timing_repeats, n_prompts=o.timing_prompts, n_tokens=o.timing_tokens)
        rec = record.load({**rec.to_dict(), **got})  # probe, spec, timing and the generation halves of wand / routing
    if ref_ev is not None:
        rec.against = Against(target=ref[2], deltas=delta_intervals(ev["blocks"], ref_ev["blocks"], K, ALPHAS, samples, seed, level,
                                                                    routing=ref_ev["calibrator"] is not None))
    rec.elapsed_s, rec.device, rec.dtype, rec.poelm_version = time.time() - run.t0, str(run.dev), run.dtype_label, __version__
    return rec.to_dict()


def measure_target(target: str, opts: MeasureOptions | None = None, *, data: str | None = None, out: str | None = None,
                   against: str | None = None, device: str | None = "auto", write_calibration: bool | None = None,
                   write: bool = True, write_branch: bool = False, **options) -> dict:
    """Load ``target`` (``checkpoint.load_model``), measure it (``opts`` and keywords as for
    ``measure``), store the calibration and the record.

    Where the record goes: ``WritePolicy`` (``poelm/measure/options.py``, its table) from ``out``,
    ``write`` (``--no-write``), ``data``, ``write_branch``; ``write_calibration`` (default: when the
    record goes into the target and was measured on its own validation split) stores the WAND
    bounds and routing threshold with the checkpoint (``calibrate.write_bounds``).

    Under torchrun the ranks share the work (module docstring) and rank 0 alone writes; the other
    ranks return None."""
    from poelm.data.corpus import stream_need
    from poelm.train.checkpoint import load_model
    from poelm.train.runtime import join_group, pick_device

    o = MeasureOptions.of(opts, **options)
    policy = WritePolicy.of(target, out=out, write=write, data=data, write_branch=write_branch, write_calibration=write_calibration)
    into = policy.into
    dev = join_group(pick_device(device))
    with tempfile.TemporaryDirectory(prefix="poelm-measure-") as work:
        # both TARGETs resolve (and fail) before anything is loaded or computed
        tgt = targets.resolve(target, Path(work) / "target")
        rtgt = targets.resolve(against, Path(work) / "against") if against else None
        path, repo, branch = tgt.path, tgt.repo, tgt.branch
        model, tok, meta = load_model(path, device=dev)
        if branch:
            meta["branch"] = branch
        label = tgt.label
        need = [o.split_tokens + 1, o.calib_tokens + 1 if o.calib_tokens > 0 else 0]
        tokens = corpus_tokens(data, tok, stream_need(need)) if data else None
        ref = None
        if against:
            rmodel, rtok, rmeta = load_model(rtgt.path, device=dev)
            ref = (rmodel, rtok, rmeta, rtgt.label)
        rec = measure(model, tok, meta, o, tokens=tokens, target=label, data=data, against=ref)
        rec = record.load(record.clean(rec))
        if _rank_world()[0] != 0:
            return None
        written = []
        if policy.write_calibration and rec.wand:
            written = write_bounds(path, rec.wand.bounds, routing_entry(rec.routing.to_dict() if rec.routing else None))
        if repo:  # the branch gets the data files; publish refreshes its manifest itself
            written = [name for name in written if name not in MANIFESTS]
        rec.calibration_written = written
        if policy.data_override:  # asked for (--write-branch): the report marks this record
            rec.data_override = True
        prior = path / RECORD_NAME  # the branch's / checkpoint's earlier record, if any
        if into and prior.is_file():
            try:  # `poelm eval` scores are not measured here: a re-measurement keeps them
                kept = json.loads(prior.read_text()).get("benchmarks")
            except (ValueError, OSError):
                kept = None
            if kept:
                rec.benchmarks = kept
        rec = rec.to_dict()
        body = record.to_bytes(rec)
        if out:
            atomic_write_bytes(out, body)
        if repo and (into or written):
            files = {name: (path / name).read_bytes() for name in written}
            if into:
                files[RECORD_NAME] = body
            publish.update_branch_files(repo, branch, files)
        elif into:
            atomic_write_bytes(path / RECORD_NAME, body)
        # after the record was serialised: the branch's file never holds a local path
        rec["repo"] = repo
        rec["record_written"] = bool(into)
        rec["tracking"] = meta.get("tracking") or meta.get("poelm_tracking")  # its dashboard run (poelm.track), not in the file
        paths = [str(out)] if out else []
        if into:
            paths.append(f"{tgt.label}:{RECORD_NAME}" if repo else str(path / RECORD_NAME))
        rec["record_path"] = ", ".join(paths) or None
    return rec
