"""The training loop: base phases, exact resume, and continual (cyclic LR) phases.

One loop serves ``poelm train`` (a phase anchored at step 0, or resumed from a checkpoint) and
``poelm continue`` (a new phase anchored at the resume step of an annealed checkpoint, the card's
"B2" cycle). Per optimizer step: ``accum`` micro-batches of ``device_batch_size`` rows on every
rank (gradients summed, then averaged across ranks by the optimizer's reduce-scatter), one
Muon+AdamW step with every group's LR = base LR x ``lrm(step)``.

Exact resume: a checkpoint holds the model, the optimizer state, the loader position and the RNG
states taken at a step boundary, and nothing in the loop depends on wall time, so N steps
straight and N/2 + save + resume + N/2 give bitwise-equal parameters on CPU in fp32 (tested).

Step convention (nanochat): ``step`` counts completed optimizer updates; the update taking the
model from ``step`` to ``step + 1`` uses ``lrm(step)``; a save after it is ``step-{step+1}``.
The ``lrm`` recorded with a save is ``lrm(save_step)``, so the card's step-84000 (rel 77) reads
0.0385 ("lrm ~ 0.04").

Distributed (``torchrun``, see docs/distributed.md): rank and world size come from the
environment; NCCL on CUDA, gloo on CPU; no DDP wrapper (the ZeRO-2 optimizer averages gradients
itself, see ``Trainer``). Every rank takes its own disjoint rows of each global batch; the global
batch (``train.tokens_per_step``) is fixed when a run starts, so a resume on another number of
ranks re-derives only the accumulation and consumes the same rows (``resolve_global_batch``).
Checkpoints hold the full (gathered) optimizer state, resharded on load. Evaluation splits rows
over ranks and all-reduces the sums. Rank 0 alone logs, prints, writes checkpoints and publishes.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from poelm.train import checkpoint as ckpt_mod
from poelm import config as config_mod
from poelm import track
from poelm.core import poe
from poelm.core.errors import CheckpointError, ConfigError, PoelmError
from poelm.fsio import append_line
from poelm.core.model import PoEGPT
from poelm.train.runtime import Runtime, _all_sum, _broadcast_text, apply_compile, compile_mode, restore_rng, rng_states, setup_runtime, teardown_runtime  # noqa: F401
from poelm.schedule import Cooldown, Phase, lrm
from poelm.train.continual import check_same_run, continual_phase_config  # noqa: F401  (their home; re-exported)
from poelm.train.continual import add_data as add_data_config, added_data_record, carry_loader_state
from poelm.data.tokenizer import Tokenizer
from poelm.data.mixture import TrainLoader
from poelm.config import resolve_global_batch  # noqa: F401  (its home is config.py; bench/gpu.py calls it here)
from poelm.train import provenance, spikes


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_bpb(model: PoEGPT, tokens: torch.Tensor, token_bytes: torch.Tensor, batch_size: int, seq_len: int, rt: Runtime | None = None) -> dict:
    """Validation BPB of the full-K PoE (alpha=0) and of every single stage on ``tokens``.

    ``tokens`` is cut into rows of ``seq_len + 1``; BPB = sum NLL / (ln 2 * sum target bytes),
    special-token targets excluded (``poe.bpb_sums``). Under torchrun each rank takes every
    world-th row and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    K = model.config.n_stages
    tb = token_bytes.to(dev)
    n_rows = (tokens.numel() - 1) // seq_len
    rank, world = (rt.rank, rt.world) if rt else (0, 1)
    sums = torch.zeros(K + 2, dtype=torch.float64, device=dev)  # K singles, full, bytes
    rows = list(range(rank, n_rows, world))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        x = torch.stack([tokens[r * seq_len : r * seq_len + seq_len] for r in chunk]).to(dev)
        y = torch.stack([tokens[r * seq_len + 1 : r * seq_len + seq_len + 1] for r in chunk]).to(dev)
        ctx = rt.autocast() if rt else nullcontext()
        with ctx:
            z = model.stage_log_probs(x)
        for k in range(K):
            s, b = poe.bpb_sums(z[k], y, tb)
            sums[k] += s.double()
        s, b = poe.bpb_sums(poe.aggregate(z), y, tb)
        sums[K] += s.double()
        sums[K + 1] += b.double()
    if rt is not None:
        _all_sum(sums, rt)
    if was_training:
        model.train()
    nbytes = sums[K + 1].item()
    return {"full": poe.bpb(sums[K].item(), nbytes), "single": [poe.bpb(sums[k].item(), nbytes) for k in range(K)]}


# ----------------------------------------------------------------------------- the loop
def _build_model(cfg, rt: Runtime) -> PoEGPT:
    model = PoEGPT(cfg.model)
    model.to(rt.device)
    model.init_weights(seed=cfg.train.seed)
    apply_compile(model, compile_mode(cfg.train.compile, rt.device))  # train.compile (runtime.apply_compile)
    return model


def _phase_dict(p: Phase) -> dict:
    if isinstance(p, Cooldown):  # a cooldown probe (poelm.train.cooldown)
        return p.to_dict()
    return {"name": p.name, "start_step": p.start_step, "steps": p.steps, "warmup": p.warmup, "peak": p.peak,
            "warmdown_ratio": p.warmdown_ratio, "final": p.final}


def _phase_from(d: dict) -> Phase:
    if d.get("kind") == Cooldown.kind:  # resuming a cooldown probe continues its decay exactly
        return Cooldown.from_dict(d)
    return Phase(**d)


def _tokenizer_for(cfg, out_dir: Path, rt: Runtime):
    """Train the BPE on the training split, or reuse the run's saved one. Rank 0 alone trains,
    loads and saves it; the others receive its JSON (nodes need not share a filesystem)."""
    from poelm.data import corpus as data
    from poelm.data.tokenizer import Tokenizer, train_tokenizer

    path = out_dir / "tokenizer.json"
    text = None
    if rt.master:
        if path.is_file():
            tok = Tokenizer.load(out_dir)
        else:
            tok = train_tokenizer(data.tokenizer_texts(cfg.data, cfg.data.tokenizer_train_chars), cfg.model.vocab_size)
            tok.save(out_dir)
        text = tok.to_json()
    if rt.world > 1:
        text = _broadcast_text(text, rt)
        tok = Tokenizer.from_json(text, source=f"rank 0's {path}")
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"tokenizer in {out_dir} has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; use a new --out directory")
    return tok


class Trainer:
    """State of one phase of training; ``run()`` trains to the end of the phase.

    Batch accounting (W ranks, ``b = device_batch_size``, ``accum = grad_accum_steps``): one
    micro-step takes the next ``W * b`` rows of the loader's global row stream, rank r keeping
    rows ``[r b, (r+1) b)`` of them; one optimizer step takes ``accum`` micro-steps, i.e. the next
    ``R = tokens_per_step / seq_len`` rows, a contiguous block of the stream whatever W is. With
    1 rank x accum 2 and 2 ranks x accum 1, step n sees rows ``[n R, (n+1) R)`` in both, cut into
    the same micro-batches of b rows. Gradient: each rank backpropagates ``loss / accum`` (the
    loss is a per-micro-batch mean, so the rank's gradient is the mean over its micro-batches)
    and the optimizer's reduce-scatter averages over ranks: the mean over all ``W * accum``
    micro-batches, as one process would compute it. The loop never divides by W and there is no
    DDP wrapper (the optimizer does the ZeRO-2 communication itself)."""

    def __init__(self, cfg, out_dir, rt: Runtime, model, tokenizer, optimizer, loader, phase: Phase, step: int,
                 tokens: int, tokens_in_phase: int, publisher=None, progress=True, extra_meta=None):
        self.cfg, self.out_dir, self.rt = cfg, Path(out_dir), rt
        self.model, self.tokenizer, self.optimizer, self.loader = model, tokenizer, optimizer, loader
        self.phase, self.step, self.tokens, self.tokens_in_phase = phase, step, tokens, tokens_in_phase
        self.publisher, self.progress = publisher, progress
        self.extra_meta = extra_meta or {}
        self.accum = config_mod.grad_accum_steps(cfg, rt.world)
        self.tokens_per_step = self.accum * cfg.train.device_batch_size * cfg.seq_len * rt.world
        self.last_val = None
        self._val = None
        self.log_path = self.out_dir / "log.jsonl"
        from poelm.train.plan import mfu_scale

        self._mfu_scale = mfu_scale(model, cfg.seq_len, rt.device, rt.world)
        self.after_save = None  # callable(trainer, ckpt path or None), e.g. a cooldown probe (cooldown.py)
        self.tracker = None  # poelm.track.Run on rank 0 when trackers are asked for: gets every log record
        self.compiled = compile_mode(cfg.train.compile, rt.device)  # what _build_model compiled (runtime.apply_compile)
        self.provenance = provenance.Provenance(cfg.seq_len, None)  # set by _make_trainer
        self.spikes = None  # spikes.SpikeGuard when train.skip_spikes > 0 (set by _make_trainer)

    # -- helpers
    def val_tokens(self):
        if self._val is None:
            from poelm.data import corpus as data

            self._val = data.val_tokens(self.cfg.data, self.tokenizer, self.cfg.train.eval_tokens)
        return self._val

    def evaluate(self) -> dict:
        res = evaluate_bpb(self.model, self.val_tokens(), self.tokenizer.token_bytes(), self.cfg.train.device_batch_size, self.cfg.seq_len, self.rt)
        self.last_val = res
        self.log({"kind": "eval", "step": self.step, "val_bpb": res["full"], "val_bpb_stages": res["single"]})
        return res

    def log(self, rec: dict):
        if self.rt.master:
            import json

            append_line(self.log_path, json.dumps(rec, sort_keys=True))
            if self.tracker is not None:  # the same dict: the dashboards show the log's numbers
                self.tracker.log_record(rec)

    def _log_layout(self):
        """One ``dist`` record: world size, accumulation and the optimizer-state elements each
        rank holds (ZeRO-2: about 1/W of ``optim_state_numel_unsharded`` per rank). A collective,
        called on every rank after the first step (the state is allocated lazily)."""
        per_rank = torch.zeros(self.rt.world, dtype=torch.int64, device=self.rt.device)
        per_rank[self.rt.rank] = self.optimizer.owned_state_numel()
        _all_sum(per_rank, self.rt)
        full = self.optimizer.unsharded_state_numel()
        self.log({"kind": "dist", "step": self.step + 1, "world_size": self.rt.world, "accum": self.accum,
                  "device_batch_size": self.cfg.train.device_batch_size, "tokens_per_step": self.tokens_per_step,
                  "optim_state_numel": per_rank.tolist(), "optim_state_numel_unsharded": full})

    def meta(self) -> dict:
        loader_state = self.loader.state_dict()
        return {
            "step": self.step,
            "phase": _phase_dict(self.phase),
            "rel_step": self.step - self.phase.start_step,
            "lrm": lrm(self.step, self.phase),
            "tokens": self.tokens,
            "tokens_in_phase": self.tokens_in_phase,
            "tokens_per_step": self.tokens_per_step,
            "train_val_bpb": self.last_val["full"] if self.last_val else None,
            "train_val_bpb_stages": self.last_val["single"] if self.last_val else None,
            "loader_state": loader_state,
            "provenance": self.provenance.block(loader_state),  # tokens per source, batch hashes (provenance.py)
            **({"spike_guard": self.spikes.state_dict()} if self.spikes is not None else {}),
            "world_size": self.rt.world,
            # what the forward ran in: an export publishes bf16 weights for a bf16-autocast run
            "autocast_dtype": "bf16" if self.rt.dtype == torch.bfloat16 else "fp32",
            **self.extra_meta,
            **({"tracking": self.tracker.info} if self.tracker is not None else {}),  # --resume reopens the run
        }

    def save(self) -> Path | None:
        val = self.evaluate()  # every save carries its training-log val BPB
        if not math.isfinite(val["full"]):
            good = ckpt_mod.latest(self.out_dir)
            where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
            raise PoelmError(f"validation BPB became {val['full']} at step {self.step}; this checkpoint was not saved; {where} (lower the learning rates and resume from it)")
        meta = self.meta()
        self.provenance.saved()  # the next save lists the batches after this one
        # full_state_dict and rng_states are collectives: every rank calls them; rank 0 writes.
        opt_state = self.optimizer.full_state_dict()
        rng = rng_states(self.rt)
        path = None
        if self.rt.master:
            path = ckpt_mod.save(self.out_dir, self.step, self.model, self.cfg, self.tokenizer, meta, optim_state=opt_state, rng=rng)
            if self.publisher is not None:
                self.publisher.submit(path)
            else:  # with a publisher, pruning waits until every queued save is published (_finish)
                ckpt_mod.prune(self.out_dir, self.cfg.train.keep_last)
        if self.rt.world > 1:
            dist.barrier()
        if self.after_save is not None:
            self.after_save(self, path)
        return path

    # -- the loop
    def run(self) -> dict:
        cfg, rt, model = self.cfg, self.rt, self.model
        end = self.phase.end_step
        bar = None
        if self.progress and rt.master:
            from tqdm import tqdm

            # A bar only on a terminal (disable=None: tqdm turns itself off when stderr is not a
            # TTY); piped or logged, one plain line every ~10 % of the phase instead of 100+ KB of
            # carriage-return frames.
            bar = tqdm(total=end, initial=self.step, desc=f"{self.phase.name}", unit="step", dynamic_ncols=True, disable=None)
            line_every = max(1, (end - self.step) // 10) if bar.disable else 0
        if self.step == 0 and cfg.train.eval_every:  # the curve's first point: validation BPB at init
            self.evaluate()
        model.train()
        rows = cfg.train.device_batch_size * rt.world
        last_loss = float("nan")
        first = first_step = True
        t_start = time.time()
        while self.step < end:
            t0 = time.time()
            m = lrm(self.step, self.phase)
            self.optimizer.set_lrm(m, step=self.step, phase=self.phase)  # nanochat: momentum/wd schedules too
            loss_sum = torch.zeros(1, dtype=torch.float64, device=rt.device)
            ce_sum = torch.zeros(cfg.model.n_stages, dtype=torch.float64, device=rt.device)
            for _ in range(self.accum):
                x, y = self.loader.next_batch(rows, rt.rank, rt.world)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                if cfg.model.objective == "poe":  # stage by stage: each stage's graph freed early
                    loss, ces = model.backward_local(x, y, scale=1.0 / self.accum, autocast=rt.autocast)
                else:
                    with rt.autocast():
                        loss, ces = model.loss(x, y)
                    (loss / self.accum).backward()
                loss_sum += loss.detach().double()
                ce_sum += ces.double()
            stats = torch.cat([loss_sum, ce_sum]) / (self.accum * rt.world)
            _all_sum(stats, rt)
            last_loss = stats[0].item()
            guard = self.spikes  # train.skip_spikes (spikes.py): a spike's update is dropped, its data still consumed
            reason = guard.judge_loss(last_loss) if guard is not None else None
            if not math.isfinite(last_loss) and guard is None:
                good = ckpt_mod.latest(self.out_dir)
                where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
                raise PoelmError(f"training loss became {last_loss} at step {self.step}; stopped without updating the model; {where} (lower the learning rates and resume from it)")
            if reason is None:
                grad_norm = self.optimizer.step(skip=guard.judge_norm if guard is not None else None).item()  # pre-clip norm
                reason = guard.reason if guard is not None else None
            else:
                grad_norm = float("nan")
            self.optimizer.zero_grad(set_to_none=True)
            if guard is not None and (skip_rec := guard.done(self.step + 1, last_loss, grad_norm, reason)):
                self.log(skip_rec)
            if first:
                self._log_layout()
                first = False
            self.step += 1
            bh = self.loader.batch_hash()
            self.log({"kind": "batch", "step": self.step, "hash": bh})  # `poelm batch` re-derives it
            self.provenance.note(self.step, bh)
            self.tokens += self.tokens_per_step
            self.tokens_in_phase += self.tokens_per_step
            dt = time.time() - t0
            # The first step of a compiled model is mostly compilation: logged as its own record
            # and left out of tokens/s (and MFU), which then describe the compiled kernels.
            compiling = first_step and self.compiled is not None
            if compiling:
                self.log({"kind": "compile", "step": self.step, "mode": self.compiled, "first_step_s": dt})
            first_step = False
            tps = None if compiling else self.tokens_per_step / max(dt, 1e-9)
            if self.step % max(1, cfg.train.log_every) == 0 or self.step == end:
                rec = {"kind": "train", "step": self.step, "loss": last_loss, "stage_ce": stats[1:].tolist(), "lrm": m,
                       "grad_norm": grad_norm, "tokens": self.tokens, "step_s": dt,
                       "lr": {name: g.lr for name, g in self.optimizer.groups.items()}}
                if tps is not None:
                    rec["tok_per_s"] = tps
                if self.spikes is not None:  # updates the guard dropped so far (spikes.py)
                    rec["skipped"] = len(self.spikes.skipped)
                if self._mfu_scale is not None and tps is not None:  # GPUs with a known bf16 peak (poelm.train.plan.GPUS)
                    rec["mfu"] = tps * self._mfu_scale
                if len(self.loader.sources) > 1:  # realised mixture proportions since the run began
                    rec["mix"] = self.loader.proportions()
                self.log(rec)
            if bar is not None:
                bar.update(1)
                speed = "compiling" if tps is None else f"{tps:,.0f} tok/s"
                bar.set_postfix(loss=f"{last_loss:.3f}", lrm=f"{m:.3f}", speed=speed)
                if line_every and ((end - self.step) % line_every == 0 or self.step == end):
                    print(f"{self.phase.name} step {self.step}/{end}  loss {last_loss:.3f}  lrm {m:.3f}  {speed}",
                          file=sys.stderr, flush=True)
            saving = self.step == end or (cfg.train.save_every and self.step % cfg.train.save_every == 0)
            if saving:
                self.save()
            elif cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self.evaluate()
        if bar is not None:
            bar.close()
        return {"step": self.step, "loss": last_loss, "val_bpb": self.last_val, "elapsed_s": time.time() - t_start,
                "out": str(self.out_dir), "tokens": self.tokens,
                "skipped_steps": None if self.spikes is None else len(self.spikes.skipped)}


# ----------------------------------------------------------------------------- entry points
def _make_trainer(cfg, out_dir: Path, rt: Runtime, resume: Path | None, publisher_factory, progress: bool,
                  phase: Phase | None = None, init_ckpt=None, tracking: dict | None = None) -> Trainer:
    from poelm.data import corpus as data
    from poelm.train.optim import build_optimizer

    for s in data.resolve_sources(cfg.data):  # every rank: a missing source fails everywhere, first
        data.source_files(s)
    src = None
    if resume is not None:
        src = ckpt_mod.load(resume)
    elif init_ckpt is not None:
        src = init_ckpt
    config_mod.resolve_global_batch(cfg, rt.world, src.meta if src is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rt.master:
        ckpt_mod.clean_run_dir(out_dir)
    torch.manual_seed(cfg.train.seed)
    if src is not None:
        from poelm.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(src.path)
        if rt.master and not (out_dir / "tokenizer.json").exists():
            tokenizer.save(out_dir)
    else:
        tokenizer = _tokenizer_for(cfg, out_dir, rt)
    model = _build_model(cfg, rt)
    optimizer = build_optimizer(model, cfg.optim, world_size=rt.world, rank=rt.rank)
    # The data order is the data's own seed (data.mixture_seed), apart from train.seed (the
    # init), so init and data order can be varied separately; a resumed stream keeps the seed it
    # was saved with.
    saved = (src.meta.get("loader_state") or {}) if src is not None else {}
    loader = TrainLoader(cfg.data, tokenizer, cfg.seq_len, seed=saved.get("seed", cfg.data.mixture_seed))
    step = tokens = tokens_in_phase = 0
    extra = {}
    if src is not None:
        ckpt_mod.load_state_into(model, src.model_state, f"checkpoint {src.path}")
        if src.optim_tensors is not None:
            optimizer.load_full_state_dict(src.optim_tensors, src.optim_meta)
        elif resume is not None:
            raise CheckpointError(f"checkpoint {src.path} has no optimizer state; it cannot be resumed exactly")
        if src.meta.get("loader_state") is not None:
            loader.load_state_dict(src.meta["loader_state"])
        restore_rng(src.rng, rt)  # CPU and this rank's CUDA generator
        step, tokens = int(src.meta["step"]), int(src.meta.get("tokens", 0))
        if resume is not None:
            phase = _phase_from(src.meta["phase"])
            tokens_in_phase = int(src.meta.get("tokens_in_phase", 0))
            extra = {k: src.meta[k] for k in ("continued_from", "cooldown") if k in src.meta}  # a resumed probe keeps its provenance
    if phase is None:
        phase = cfg.schedule.phase(start_step=0)
    # The trajectory room sits above training: the caller hands in a factory (e.g.
    # ``functools.partial(trajectory.publish.Publisher, repo)``) and rank 0 alone calls it.
    publisher = publisher_factory() if publisher_factory is not None and rt.master else None
    trainer = Trainer(cfg, out_dir, rt, model, tokenizer, optimizer, loader, phase, step, tokens, tokens_in_phase,
                      publisher=publisher, progress=progress, extra_meta=extra)
    # A resume keeps the phase's start and the spike window it saved; a new phase starts both here.
    prior = (src.meta if src is not None and resume is not None else {})
    start_rows = (prior.get("provenance") or {}).get("phase_start_rows") if resume is not None else provenance.source_rows(loader.state_dict())
    trainer.provenance = provenance.Provenance(cfg.seq_len, start_rows)
    trainer.spikes = spikes.make(cfg.train, prior.get("spike_guard"))
    if rt.master and cfg.train.trackers:  # rank 0 alone logs (poelm.track: resume, group, cooldown tag)
        trainer.tracker = track.start(cfg.train.trackers, out_dir, cfg.to_dict(), opts=tracking,
                                      prior=src.meta.get("tracking") if src is not None else None, resume=resume is not None,
                                      cooldown=(phase.start_step, phase.steps) if isinstance(phase, Cooldown) else None)
    return trainer


def _finish(trainer: Trainer) -> None:
    if trainer.tracker is not None:
        trainer.tracker.finish()
    if trainer.publisher is not None:
        trainer.publisher.close()
        if trainer.rt.master:
            ckpt_mod.prune(trainer.out_dir, trainer.cfg.train.keep_last)


def train(cfg, out_dir, resume=None, publisher=None, progress=True, tracking=None) -> dict:
    """Train (or resume) one phase; returns a summary. ``resume`` is a checkpoint dir;
    ``publisher`` a zero-argument factory of an object with ``submit(ckpt_dir)`` / ``close()``
    (``functools.partial(poelm.trajectory.publish.Publisher, repo)``), called on rank 0 only.
    ``tracking``: ``{"project", "run_name"}`` for the trackers of ``train.trackers`` (poelm.track)."""
    track.check(cfg.train.trackers)  # a tracker not installed: one error line before any compute
    rt = setup_runtime(cfg)
    try:
        trainer = _make_trainer(cfg, Path(out_dir), rt, Path(resume) if resume else None, publisher, progress, tracking=tracking)
        try:
            return trainer.run()
        finally:
            _finish(trainer)
    finally:
        teardown_runtime(rt)


def continue_phase(source, out_dir, phase_cfg=None, steps=None, tokens_budget=None, publisher=None, progress=True,
                   allow_mismatch=False, overrides=None, source_label=None, after_save=None, fresh_optimizer=False,
                   tracking=None, add_data=None, replay=0.0) -> dict:
    """Start a continual phase from an annealed checkpoint (SPEC "continual phase").

    Restores model, optimizer state and data position; the new phase is anchored at the resume
    step; its first save is the resume checkpoint itself (the "seed" row, rel_step 0).
    ``after_save``: called as ``after_save(trainer, ckpt_path)`` after every later save, e.g.
    ``poelm.train.cooldown.Prober`` (cooldown probes between saves). ``fresh_optimizer``: start
    AdamW/Muon from zero state (the only way on from a weights-only source, e.g. an imported
    checkpoint without optimizer shards); recorded in every save's meta. ``add_data``: a corpus
    trained on with the old mix replayed at the share ``replay`` (``continual.add_data``)."""
    src_path = Path(source)  # a local checkpoint or export folder (``poelm.targets`` resolves TARGETs)
    src = ckpt_mod.load(src_path)
    if src.optim_tensors is None and not fresh_optimizer:
        raise CheckpointError(f"{src_path} carries no optimizer state (a weights-only import or an exported branch?); continue from the run's "
                              "checkpoint directory, or pass --fresh-optimizer to start AdamW/Muon from zero state")
    if fresh_optimizer:
        src.optim_tensors = src.optim_meta = None
    cfg = continual_phase_config(src.config, phase_cfg, steps, tokens_budget, src.meta.get("tokens_per_step"))
    if overrides:
        d = config_mod.apply_overrides(cfg.to_dict(), overrides)
        cfg = config_mod.validate(config_mod.from_dict(d))
    added = None
    if add_data is not None:  # domain-adaptive: a new mixture, the old sources' positions carried over
        cfg, base = add_data_config(cfg, add_data, replay), add_data_config(src.config, add_data, replay)
        src.meta["loader_state"] = carry_loader_state(src.meta.get("loader_state"), cfg.data, Tokenizer.load(src_path).fingerprint)
        added = added_data_record(cfg, add_data, replay)
    check_same_run(src.config if added is None else base, cfg, allow_mismatch, None)
    track.check(cfg.train.trackers)
    rt = setup_runtime(cfg)
    try:
        phase = cfg.schedule.phase(start_step=src.step)
        trainer = _make_trainer(cfg, Path(out_dir), rt, None, publisher, progress, phase=phase, init_ckpt=src, tracking=tracking)
        trainer.extra_meta = {"continued_from": str(source_label or src_path)}
        if fresh_optimizer:
            trainer.extra_meta["fresh_optimizer"] = True
        if added is not None:
            trainer.extra_meta["added_data"] = added
        trainer.tokens_in_phase = 0
        try:
            trainer.save()  # the seed: identical weights, the new phase's rel_step 0
            trainer.after_save = after_save
            return trainer.run()
        finally:
            _finish(trainer)
    finally:
        teardown_runtime(rt)
