"""Runs side by side: aligned saves of two or more runs measured on one slice, with paired intervals.

``poelm compare`` reads how far local learning falls behind a backprop control of the same size,
data and schedule (the paper behind the card: PoE 0.720935 vs BP 0.676788 BPB, +6.52 %), and any
other ablation (re-warm vs none, alpha, stage layouts), the way the card's own tables are read.

A run is a trajectory repository (its step branches), a run directory (its ``step-XXXXX``
checkpoints), or one save (a one-point run). ``load_run`` reads each save's step, tokens, lrm,
phase and configuration from its JSON files only; ``check_comparable`` then refuses, in one
line, runs that would not be measured on the same tokens: another tokenizer
(``Tokenizer.fingerprint``) or other validation data (the ``[data]`` settings, then
``data.data_fingerprint`` over the files). ``align`` keeps the steps (or token counts) that every
run saved. All of this happens before a model is loaded.

``measure`` then runs every aligned save over the same measurement slice: the one ``poelm
measure`` uses (``run.validation_slices`` with the default calibration size, so a point's BPB is
its branch record's ``bpb.full`` when both were measured with the same settings; ``poelm measure``
cuts no calibration slice for K = 1, so on a short split a K = 1 run's own record covers more
tokens than the shared slice), in rows of
the same ``seq_len`` (the smallest ``train.seq_len`` of the runs unless given) and the same
batches, and keeps per block of ``block_tokens`` consecutive target positions the NLL sums of the
model's output and of every stage, and the UTF-8 byte count (``metrics.BlockSums``). A run's
"model BPB" is its full-K PoE BPB (SPEC), except for an ``objective = "bp"`` run with K > 1, whose
output is its last stage (the earlier stages are not trained to predict); the report says which.

Paired intervals (``Comparison.intervals``): every statistic (each BPB, each gap, its relative
form, the change of a gap between two saves) is recomputed from the same bootstrap draw of
blocks for all runs and saves at once (``bootstrap.bootstrap``, the block bootstrap of ``poelm
measure``: blocks drawn with replacement, statistics as ratios of summed NLL over summed bytes).
What is resampled is the slice's positions, block by block; the models are fixed, so the
intervals say how much the figures depend on which text was measured, and the difficulty the runs
share cancels from their gap.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from poelm import config as config_mod
from poelm import targets
from poelm.core.errors import PoelmError
from poelm.measure import record
from poelm.measure.bootstrap import DEFAULT_LEVEL, DEFAULT_SAMPLES, bootstrap
from poelm.core.poe import bpb as bits_per_byte
from poelm.train import checkpoint
from poelm.trajectory import publish

BY = ("step", "tokens")


class CompareError(PoelmError):
    """Runs that cannot be compared (exit code 2)."""


@dataclass
class Save:
    """One save of a run: where it loads from (a TARGET text) and its place in the run."""

    target: str
    step: int
    tokens: int | None
    lrm: float | None
    phase: dict | None
    record_bpb: float | None = None  # its own poelm_measure.json's full-K BPB, when measured
    record_split: int | None = None


@dataclass
class Run:
    label: str
    source: str
    saves: list[Save]
    config: dict  # the poelm config (model, data, train ...)
    tokenizer: str  # fingerprint
    params: dict = field(default_factory=dict)

    @property
    def model(self) -> dict:
        return self.config.get("model") or {}

    @property
    def K(self) -> int:
        return len(self.model.get("stage_layers") or [1])

    @property
    def objective(self) -> str:
        return self.model.get("objective", "poe")

    @property
    def output(self) -> str:
        """What the run's model BPB is: ``full`` (PoE over all K stages) or ``last stage``."""
        return "last stage" if self.objective == "bp" and self.K > 1 else "full"

    def key(self, s: Save, by: str):
        return s.step if by == "step" else s.tokens


# ----------------------------------------------------------------------------- reading runs
def _record_of(rec: dict | None) -> tuple[float | None, int | None]:
    """Full-K BPB and the slice size of a measurement record (None, None without one)."""
    if not isinstance(rec, dict):
        return None, None
    r = record.load(rec)
    return r.figure("bpb.full")[0], r.split_tokens


def _tokenizer_fp(text: str | None, where: str) -> str:
    from poelm.data.tokenizer import Tokenizer

    if text is None:
        raise CompareError(f"{where} has no tokenizer.json")
    return Tokenizer.from_json(text, source=where).fingerprint


def _from_repo(repo: str, branches: list[str], label: str, source: str) -> Run:
    backend = publish.open_repo(repo)
    saves, cfg, tok = [], None, None
    for b in branches:
        hf = publish.read_json(backend, b, "config.json") or {}
        if not isinstance(hf.get("poelm_config"), dict):
            raise CompareError(f"{repo}@{b}: config.json has no poelm_config (the run's settings are unknown)")
        cfg = cfg or hf["poelm_config"]
        if tok is None:
            data = backend.read(b, "tokenizer.json")
            tok = _tokenizer_fp(data.decode("utf-8") if data else None, f"{repo}@{b}")
        bpb, split = _record_of(publish.read_json(backend, b, publish.MEASURE))
        saves.append(Save(f"{repo}@{b}", int(hf["step"]), hf.get("tokens"), hf.get("lrm"),
                          hf["phase"] if isinstance(hf.get("phase"), dict) else None, bpb, split))
    return Run(label, source, saves, cfg, tok)


def _ckpt_save(d: Path) -> tuple[Save, dict, Path]:
    if checkpoint.is_hf_export(d):
        hf = checkpoint.read_json(d / "config.json", "export config")
        cfg, meta = hf.get("poelm_config"), hf
    else:
        cfg, meta = checkpoint.read_json(d / "config.json", "checkpoint config"), checkpoint.read_json(d / "meta.json", "checkpoint meta")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CompareError(f"{d} carries no poelm config: its run's settings are unknown")
    rec = None
    if (d / publish.MEASURE).is_file():
        try:
            rec = json.loads((d / publish.MEASURE).read_text())
        except ValueError:
            rec = None
    bpb, split = _record_of(rec)
    phase = meta.get("phase") if isinstance(meta.get("phase"), dict) else None
    return Save(str(d), int(meta["step"]), meta.get("tokens"), meta.get("lrm"), phase, bpb, split), cfg, d / "tokenizer.json"


def _from_folder(path: Path, label: str, source: str) -> Run:
    if (path / "model.safetensors").is_file():
        dirs = [path]
    else:
        dirs = sorted((d for d in path.iterdir() if checkpoint.STEP_RE.match(d.name) and (d / "manifest.json").is_file()),
                      key=lambda d: int(checkpoint.STEP_RE.match(d.name).group(1)))
        if not dirs:
            raise CompareError(f"{source}: holds no saves (no model.safetensors, no step-XXXXX checkpoints)")
    saves, cfg, tok_path = [], None, None
    for d in dirs:
        s, c, t = _ckpt_save(d)
        saves.append(s)
        cfg, tok_path = cfg or c, tok_path or t
    text = tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None
    return Run(label, source, saves, cfg, _tokenizer_fp(text, str(tok_path)))


def load_run(text: str, label: str | None = None) -> Run:
    """A run from a TARGET: a trajectory repository (every step branch), ``REPO@step-XXXXX`` (that
    save alone), a run dir (every checkpoint) or one checkpoint / exported folder. Reads JSON
    files only; a TARGET that names nothing is one ``TargetError`` line."""
    label = label or text
    where, rev = targets.split(text)
    local = None if where.startswith(targets.HUB) else Path(where)
    if rev is None and local is not None and local.is_dir() and not targets._is_repo(local):
        run = _from_folder(local, label, text)
    elif rev is None and local is not None and not local.exists():
        raise targets.TargetError(f"{text}: not found (give a trajectory repo, REPO@step-XXXXX, a run dir or a checkpoint)")
    elif rev is None:
        repo = targets.repository(text)[0]
        branches = publish.step_branches(publish.open_repo(repo).refs())
        if not branches:
            raise CompareError(f"{text}: the repository has no step branches")
        run = _from_repo(repo, branches, label, text)
    else:
        repo, branch = targets.repository(text)
        run = _from_repo(repo, [branch], label, text)
    with torch.device("meta"):
        from poelm.core.model import ModelConfig, PoEGPT

        run.params = PoEGPT(ModelConfig.from_dict(run.model)).param_count()
    return run


def check_comparable(runs: list[Run]) -> None:
    """Every run measured on the same tokens: one ``CompareError`` line naming what differs."""
    from poelm.data.corpus import data_fingerprint

    if len(runs) < 2:
        raise CompareError("compare needs two or more runs (TARGET_A TARGET_B ...)")
    a = runs[0]
    for b in runs[1:]:
        if b.tokenizer != a.tokenizer:
            raise CompareError(f"{a.label} and {b.label} use different tokenizers (fingerprint {a.tokenizer[:12]} vs {b.tokenizer[:12]}): "
                               "their BPB would not be measured on the same tokens; compare runs trained with one tokenizer")
        da, db = a.config.get("data") or {}, b.config.get("data") or {}
        diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k) and k not in ("mixture_seed", "tokenizer_train_chars"))
        if diff:
            k = diff[0]
            raise CompareError(f"{a.label} and {b.label} have different validation data (data.{k}: {da.get(k)!r} vs {db.get(k)!r}); "
                               "compare runs measured on the same data")
    try:
        fps = [data_fingerprint(config_mod.from_dict(r.config).data) for r in runs]
    except PoelmError as e:
        raise CompareError(f"cannot read the runs' validation data: {e}") from None
    for r, fp in zip(runs[1:], fps[1:]):
        if fp != fps[0]:
            raise CompareError(f"{a.label} and {r.label} have different validation data (the files under data.path differ)")


def align(runs: list[Run], by: str = "step") -> list:
    """The steps (``by="step"``) or token counts every run saved, ascending; one line when none."""
    if by not in BY:
        raise CompareError(f"--by must be step or tokens, got {by!r}")
    sets = []
    for r in runs:
        keys = {r.key(s, by) for s in r.saves}
        if None in keys:
            raise CompareError(f"{r.label}: some saves do not record their token count; align --by step")
        sets.append(keys)
    common = sorted(set.intersection(*sets))
    if not common:
        have = "; ".join(f"{r.label}: {sorted(k)[:8]}" for r, k in zip(runs, sets))
        raise CompareError(f"no {by} is saved by every run ({have}); align --by {'tokens' if by == 'step' else 'step'} or "
                           "save the runs at the same points")
    return common


# ----------------------------------------------------------------------------- measuring
@dataclass
class Comparison:
    """The aligned saves measured on one slice: ``blocks`` ``[n_blocks, C]`` holds, per (run,
    point), its output NLL, its bytes and each stage's NLL (``columns``)."""

    runs: list[Run]
    by: str
    keys: list
    blocks: np.ndarray
    columns: dict  # (run index, point index, "out" | stage k) -> column; (r, p, "bytes") -> column
    slice: dict  # split_tokens, seq_len, block_tokens, n_blocks, batch_size
    saves: list  # [run][point] -> Save

    def bpb(self, sums: np.ndarray, r: int, p: int, what="out") -> np.ndarray:
        """BPB of run r at point p (``what``: its output or stage k) from column sums ``[R, C]``."""
        return bits_per_byte(sums[:, self.columns[(r, p, what)]], sums[:, self.columns[(r, p, "bytes")]])

    def intervals(self, stats: list, samples: int = DEFAULT_SAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
        """``{name: (value, lo, hi)}`` of ``stats`` = ``[(name, fn(comparison, sums) -> [R])]``, all
        from ONE paired block bootstrap (the same drawn blocks for every run and point)."""
        def stat(sums):
            return np.stack([fn(self, sums) for _, fn in stats], axis=1)

        point, lo, hi = bootstrap(stat, self.blocks, samples, seed, level)
        return {name: (float(point[i]), float(lo[i]), float(hi[i])) for i, (name, _) in enumerate(stats)}


def measure(runs: list[Run], keys: list, by: str = "step", split_tokens: int | None = None, seq_len: int | None = None,
            block_tokens: int = 1024, batch_size: int = 8, device: str = "auto", log=None) -> Comparison:
    """Measure every aligned save of every run on the same slice (module docstring)."""
    from poelm.measure.run import DEFAULT_CALIB_TOKENS, DEFAULT_SPLIT_TOKENS, _autocast, evaluate, validation_slices
    from poelm.train.runtime import pick_device

    dev = torch.device(pick_device(device))
    split = int(split_tokens or DEFAULT_SPLIT_TOKENS)
    T = int(seq_len or min(int((r.config.get("train") or {}).get("seq_len") or r.model.get("max_seq_len") or 0) for r in runs))
    T = min([T] + [int(r.model.get("max_seq_len") or T) for r in runs])
    picked = [[next(s for s in r.saves if r.key(s, by) == k) for k in keys] for r in runs]
    cols, parts, meas, n_blocks = {}, [], None, None
    autocast, _ = _autocast(dev, "auto")
    with tempfile.TemporaryDirectory(prefix="poelm-compare-") as work:
        for ri, r in enumerate(runs):
            for pi, s in enumerate(picked[ri]):
                t = targets.resolve(s.target, Path(work) / f"{ri}-{pi}")
                model, tok, meta = checkpoint.load_model(t.path, device=dev)
                if meas is None:  # one slice for every run (check_comparable: same tokenizer and data)
                    meta.setdefault("config", runs[0].config)
                    meas, _ = validation_slices(meta, tok, split, DEFAULT_CALIB_TOKENS)
                tb = tok.token_bytes().to(dev)
                V = model.config.vocab_size
                if tb.numel() < V:
                    tb = torch.cat([tb, tb.new_zeros(V - tb.numel())])
                ev = evaluate(model, meas, None, seq_len=T, batch_size=batch_size, token_bytes=tb, autocast=autocast,
                              block_tokens=block_tokens, cap=0.02, metric="agreement", confidence="maxprob")
                b = ev["blocks"]
                arr, K = b.array(), model.config.n_stages
                out_col = f"nll.single.{K - 1}" if r.output == "last stage" else "nll.alpha.0"
                names = [("out", out_col), ("bytes", "bytes")] + [(k, f"nll.single.{k}") for k in range(K)]
                base = sum(p.shape[1] for p in parts)
                parts.append(np.stack([arr[:, b.index[c]] for _, c in names], axis=1))
                for j, (what, _) in enumerate(names):
                    cols[(ri, pi, what)] = base + j
                n_blocks = b.n_blocks
                if log:
                    bpb = bits_per_byte(parts[-1][:, 0].sum(), parts[-1][:, 1].sum())
                    log(f"  {r.label} {by} {keys[pi]:,}: model BPB {bpb:.6f}")
                del model
    sl = {"split_tokens": int(meas.numel() - 1), "seq_len": T, "block_tokens": int(block_tokens), "n_blocks": int(n_blocks),
          "batch_size": int(batch_size), "split_tokens_requested": split}
    return Comparison(runs, by, list(keys), np.concatenate(parts, axis=1), cols, sl, picked)
