"""``poelm eval``: lm-evaluation-harness benchmarks on one branch or on every branch of a trajectory.

``run_eval(target, tasks)`` scores the exported model (what a transformers user loads: the
branch checked out, or a checkpoint exported, into a temporary folder) with lm-evaluation-harness
(``lm_eval``, the optional extra ``poelm[eval]``) and writes the scores into each branch's
measurement record ``poelm_measure.json`` under ``benchmarks`` (``docs/record.md``):

    {"task", "metric", "value", "stderr", "n", "limit", "stages", "num_fewshot", "chance",
     "batch_size", "lm_eval"}

one entry per task and metric. A rerun of a task with the same ``stages`` replaces its entries;
other tasks' entries and everything ``poelm measure`` wrote stay. A branch that was never measured
gets a minimal record (its step, phase, K, ...; no BPB). ``REPO`` alone means every step branch,
``REPO@step-XXXXX`` / ``REPO@main`` one branch, a checkpoint / run / exported folder one model
whose record is ``poelm_measure.json`` in that folder (where ``poelm measure`` puts it).

Stages (``--stages``): lm-eval's ``hf`` model calls ``model(input_ids)``; a subclass of it
(``_lm_class``) passes ``stages=`` to ``PoelmForCausalLM.forward`` (and to ``generate``), so the
single-stage and prefix-K' PoE models are scored by the same harness code: ``full`` (default),
``k`` / ``stage=k`` (stage k alone), ``prefix=K'`` (stages 0..K'-1, alpha 0).

Tasks: any name lm-eval knows (its data is downloaded as lm-eval does, so it works wherever
the Hub is reachable), task YAMLs of your own (``include_path``), and the offline task poelm
ships, ``poelm_devils_cloze`` (``poelm/measure/tasks/devils_cloze.py``). Every name is checked,
and every task's data loaded, before any model is loaded or any file is written: an unknown name
or unreachable data is one ``PoelmError`` line (exit 2). Listing every lm-eval task costs ~20 s
(lm-eval indexes ~15k YAML files), so that index is built only when a name is not poelm's own.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from poelm import __version__, targets
from poelm.config import DataConfig
from poelm.core.errors import PoelmError
from poelm.fsio import atomic_write_bytes
from poelm.infer.options import stage_selection
from poelm.measure.record import META_KEYS, Record, to_bytes
from poelm.measure.tasks import devils_cloze
from poelm.train import checkpoint
from poelm.trajectory import export as export_mod
from poelm.trajectory import publish

INSTALL_HINT = "lm-evaluation-harness is not installed: install poelm[eval] (pip install 'poelm[eval]')"
KEY = "benchmarks"
LOCAL_TASKS = {devils_cloze.NAME: devils_cloze}
DEFAULT_BATCH_SIZE = 8
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of non-mean metrics (acc/acc_norm stderr are analytic)


def require_lm_eval():
    """lm-eval's pieces poelm uses (``version``, ``TaskManager``, ``HFLM``, ``evaluator``,
    ``defaults``), or the one-line ``PoelmError`` saying how to install it. Every lm_eval import
    is here, so the package imports and runs without the extra."""
    from types import SimpleNamespace

    try:
        import lm_eval
        from lm_eval import defaults, evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PoelmError(INSTALL_HINT) from None
    return SimpleNamespace(version=lm_eval.__version__, TaskManager=TaskManager, HFLM=HFLM, evaluator=evaluator, defaults=defaults)


def available() -> bool:
    try:
        require_lm_eval()
    except PoelmError:
        return False
    return True


# ----------------------------------------------------------------------------- stages
def parse_stages(text) -> tuple[str, int | list[int] | None]:
    """``--stages`` (``full`` | ``k`` | ``stage=k`` | ``prefix=K'``) -> ``(label, forward's stages=)``
    (``options.stage_selection``)."""
    try:
        return stage_selection(text)
    except PoelmError as e:
        raise PoelmError(f"--stages: {e}") from None


def _check_stages(label: str, stages, K: int, where: str) -> None:
    top = stages[-1] if isinstance(stages, list) else stages
    if top is not None and top >= K:
        raise PoelmError(f"--stages {label}: {where} has K={K} stages (0..{K - 1}; prefix=1..{K})")


# ----------------------------------------------------------------------------- what to evaluate
@dataclass
class Unit:
    """One model to score: a step branch of ``repo`` or a local folder (``path``)."""

    label: str
    info: dict  # config.json of the branch / export, or {"model", "data", "meta"} of a checkpoint
    repo: str | None = None
    branch: str | None = None
    path: Path | None = None
    kind: str = "branch"
    record: dict | None = field(default=None, repr=False)

    @property
    def stage_layers(self) -> list[int]:
        cfg = self.info.get("model") if self.kind == "checkpoint" else self.info
        return [int(x) for x in (cfg or {}).get("stage_layers") or []]

    @property
    def val_fraction(self) -> float:
        data = (self.info.get("data") if self.kind == "checkpoint" else (self.info.get("poelm_config") or {}).get("data")) or {}
        return float(data.get("val_fraction", DataConfig.val_fraction))

    @property
    def meta(self) -> dict:
        return self.info.get("meta", {}) if self.kind == "checkpoint" else self.info


def plan(target: str, api=None) -> list[Unit]:
    """The models ``target`` names (no weights read, nothing materialised)."""
    where, rev = targets.split(target)
    local = None if where.startswith(targets.HUB) else Path(where)
    if rev is None and local is not None and local.is_dir() and not targets._is_repo(local):
        t = targets.resolve(target, want="model")
        if t.kind == "export":
            info = checkpoint.read_json(t.path / "config.json", "export config")
        else:
            cfg = checkpoint.read_json(t.path / "config.json", "checkpoint config")
            info = {"model": cfg.get("model") or {}, "data": cfg.get("data") or {},
                    "meta": checkpoint.read_json(t.path / "meta.json", "checkpoint meta")}
        u = Unit(str(t.path), info, path=t.path, kind=t.kind)
        if (t.path / publish.MEASURE).is_file():
            u.record = checkpoint.read_json(t.path / publish.MEASURE, "measurement record")
        return [u]
    repo, branch = targets.repository(target, api=api)
    backend = publish.open_repo(repo, api=api)
    names = [branch] if branch else [r["branch"] for r in publish.list_branches(repo, api=api)]
    if not names:
        raise PoelmError(f"{repo} holds no step-XXXXX branches to evaluate")
    units = []
    for b in names:
        cfg = publish.read_json(backend, b, "config.json")
        if not cfg:
            raise PoelmError(f"{repo}@{b} has no readable config.json; run `poelm verify {repo}`")
        u = Unit(f"{repo}@{b}", cfg, repo=repo, branch=b)
        u.record = publish.read_json(backend, b, publish.MEASURE)
        units.append(u)
    return units


# ----------------------------------------------------------------------------- tasks
@dataclass
class TaskSet:
    """The loaded lm-eval tasks: per requested name, the leaf task names it stands for."""

    names: list[str]
    leaves: dict[str, list[str]]
    shared: dict  # leaf name -> Task (lm-eval's own / include_path tasks)
    local: dict  # val_fraction -> {leaf name -> Task} (poelm's tasks, data per split)
    manager: object  # a TaskManager simple_evaluate may use (tasks arrive as objects)

    def tasks_for(self, val_fraction: float) -> list:
        return list(self.local.get(val_fraction, {}).values()) + list(self.shared.values())


def _load(manager, name: str) -> dict:
    """``TaskManager.load`` of one name; any failure (no network, missing file, bad YAML) is one line."""
    try:
        return manager.load([name])
    except Exception as e:  # lm-eval / datasets raise many types (ConnectionError, FileNotFoundError, ...)
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PoelmError(f"task {name!r}: its data cannot be loaded ({type(e).__name__}: {line}); "
                         "check the network / HF_DATASETS_OFFLINE and the datasets cache") from None


def load_tasks(names: list[str], val_fractions, work: Path, include_path=None) -> TaskSet:
    """Check every name, then load every task's data (module docstring); nothing else is touched."""
    TaskManager = require_lm_eval().TaskManager
    if not names or any(not n for n in names):
        raise PoelmError("--tasks: give one or more comma-separated task names, e.g. poelm_devils_cloze")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise PoelmError(f"--tasks: {dup!r} is named twice")
    extra = [Path(p) for p in (include_path or [])]
    for p in extra:
        if not p.is_dir():
            raise PoelmError(f"--include-path {p}: no such folder (it should hold lm-eval task YAML files)")
    others = [n for n in names if n not in LOCAL_TASKS]
    shared, leaves, manager = {}, {}, None
    if others:
        manager = TaskManager(include_path=extra or None, include_defaults=False) if extra else None
        if manager is None or any(n not in manager.all_tasks for n in others):
            manager = TaskManager(include_path=extra or None)
        unknown = [n for n in others if n not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], manager.all_tasks + list(LOCAL_TASKS), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise PoelmError(f"unknown lm-eval task {unknown[0]!r}: {hint}`lm-eval ls tasks` lists them; "
                             f"poelm's own: {', '.join(LOCAL_TASKS)}")
    local, mine = {}, [n for n in names if n in LOCAL_TASKS]
    for vf in sorted(set(val_fractions)) if mine else []:
        folder = Path(tempfile.mkdtemp(prefix="tasks-", dir=work))
        for n in mine:
            LOCAL_TASKS[n].write_task(folder, vf)
        tm = TaskManager(include_path=str(folder), include_defaults=False)
        local[vf] = {}
        for n in mine:
            local[vf].update(_load(tm, n)["tasks"])
            leaves[n] = [n]
        manager = manager or tm
    for n in others:
        got = _load(manager, n)["tasks"]
        shared.update(got)
        leaves[n] = sorted(got)
    if manager is None:
        manager = TaskManager(include_defaults=False)
    return TaskSet(list(names), leaves, shared, local, manager)


# ----------------------------------------------------------------------------- the model
def _lm_class():
    """lm-eval's ``HFLM`` with the PoE stage selection passed to ``forward`` / ``generate``."""
    import torch

    HFLM = require_lm_eval().HFLM

    class PoelmLM(HFLM):
        def __init__(self, *args, stages=None, **kw):
            super().__init__(*args, **kw)
            self.poe_stages = stages

        def _model_call(self, inps, attn_mask=None, labels=None):
            # HFLM._model_call, causal branch: right-padded rows, no mask needed (causal attention)
            with torch.no_grad():
                return self.model(input_ids=inps, stages=self.poe_stages, use_cache=False).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.poe_stages is not None:
                generation_kwargs["stages"] = self.poe_stages
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return PoelmLM


@contextlib.contextmanager
def _silenced(quiet: bool):
    """Hide lm-eval's progress bars, logging and the ``git describe`` it runs in the working
    directory (file descriptor 2 included) when ``quiet``; exceptions still propagate."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    old = sys.stderr
    try:
        os.dup2(null, 2)
        sys.stderr = open(os.devnull, "w")
        yield
    finally:
        sys.stderr.close()
        sys.stderr = old
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _evaluate(lm, tasks: list, manager, limit):
    """``lm_eval.simple_evaluate`` without its environment report: the same seeds and task
    settings (lm-eval 0.4.13 ``evaluator.simple_evaluate``: python 0, numpy / torch / few-shot
    1234, ``num_fewshot`` 0 unless the task sets it), then ``evaluator.evaluate``. The report
    (``add_env_info``: ``pip list`` and other subprocesses) cost ~4 s per call on the demo machine,
    more than scoring the demo's task on a branch."""
    import random

    import numpy as np
    import torch
    le = require_lm_eval()
    evaluator, DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED = le.evaluator, le.defaults.DEFAULT_OTHER_SEED, le.defaults.DEFAULT_RANDOM_SEED
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load(tasks)
    for t in loaded["tasks"].values():
        if t.get_config("num_fewshot") is None:
            t.set_config(key="num_fewshot", value=0)
        t.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                              fewshot_as_multiturn=True)


def _materialise(unit: Unit, work: Path) -> Path:
    if unit.kind == "export":
        return unit.path
    if unit.kind == "checkpoint":
        return export_mod.export(unit.path, work / "export")
    return targets.resolve(unit.label, work).path


# ----------------------------------------------------------------------------- scores -> entries
def _chance(task, n: int):
    """Expected accuracy of a uniform random guess over the first ``n`` evaluated docs
    (``mean 1 / len(choices)``); None for tasks that are not multiple choice."""
    try:
        if task.get_config("output_type") != "multiple_choice":
            return None
        docs = list(task.eval_docs)[:n]
        return sum(1.0 / len(task.doc_to_choice(d)) for d in docs) / len(docs) if docs else None
    except Exception:  # a task whose choices depend on state we cannot rebuild: no chance line
        return None


def entries(results: dict, tasks: TaskSet, objs: dict, *, stages: str, limit, batch_size: int, version: str) -> list[dict]:
    """The record's ``benchmarks`` entries from ``simple_evaluate``'s output."""
    res, nsamp = results.get("results", {}), results.get("n-samples", {})
    out = []
    for name in tasks.names:
        rows = [name] if name in res else [leaf for leaf in tasks.leaves[name] if leaf in res]
        for row in rows:
            leaves = [row] if row in nsamp else [leaf for leaf in tasks.leaves[name] if leaf in nsamp]
            n = sum(int(nsamp[leaf].get("effective", 0)) for leaf in leaves)
            chance = _chance(objs[row], n) if row in objs else None
            for key, v in res[row].items():
                if "," not in key or "_stderr," in key or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                metric, filt = key.split(",", 1)
                se = res[row].get(f"{metric}_stderr,{filt}")
                out.append({"task": row, "metric": metric if filt == "none" else key, "value": float(v),
                            "stderr": float(se) if isinstance(se, (int, float)) else None, "n": n,
                            "limit": limit, "stages": stages,
                            "num_fewshot": objs[row].get_config("num_fewshot") if row in objs else None,
                            "chance": chance if metric.startswith("acc") else None,
                            "batch_size": int(batch_size), "lm_eval": version})
    return out


def merge(record: dict, new: list[dict]) -> dict:
    """``record`` with ``new`` entries replacing those of the same (task, stages)."""
    done = {(e["task"], e["stages"]) for e in new}
    kept = [e for e in record.get(KEY) or [] if (e.get("task"), e.get("stages")) not in done]
    out = dict(record)
    out[KEY] = sorted(kept + new, key=lambda e: (str(e.get("task")), str(e.get("stages")), str(e.get("metric"))))
    return out


def minimal_record(unit: Unit) -> dict:
    """The record of a model ``poelm measure`` never saw: what its config says, no figures."""
    rec = Record.from_meta(unit.meta, target=unit.label, branch=unit.branch, K=len(unit.stage_layers),
                           stage_layers=unit.stage_layers, poelm_version=__version__).to_dict()
    # the head only: a figure block that was never measured is absent, not null (the report and
    # `poelm verify` read "no bpb" as "not measured by poelm measure")
    head = {"schema", "target", "branch", "step", "K", "stage_layers", "poelm_version", *META_KEYS}
    return {k: v for k, v in rec.items() if k in head}


# ----------------------------------------------------------------------------- the verb
def run_eval(target: str, tasks: list[str], *, stages: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             limit: int | None = None, out: str | None = None, device: str | None = "auto", include_path=None,
             quiet: bool = True, log=print, api=None) -> list[dict]:
    """Score ``target`` (module docstring) on ``tasks``; return ``{"target", "repo", "branch",
    "record"}`` per model scored (the updated record), in step order.

    ``out``: write the records to this JSON file (one record, or ``{"records": [...]}``) instead
    of the branches / folders. ``limit``: the first N documents of each task."""
    version = require_lm_eval().version
    from poelm.train.runtime import pick_device

    label, sel = parse_stages(stages)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PoelmError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise PoelmError(f"--limit must be a positive integer, got {limit!r}")
    if out and Path(out).is_dir():
        raise PoelmError(f"--out {out} is a folder; give a file name for the records (JSON)")
    if out and not Path(out).resolve().parent.is_dir():
        raise PoelmError(f"--out {out}: its folder {Path(out).resolve().parent} does not exist")
    dev = pick_device(device)
    units = plan(target, api=api)
    for u in units:
        if not u.stage_layers:
            raise PoelmError(f"{u.label}: its config names no stage_layers; not a poelm model")
        _check_stages(label, sel, len(u.stage_layers), u.label)
    records = []
    with tempfile.TemporaryDirectory(prefix="poelm-eval-") as tmp:
        work = Path(tmp)
        with _silenced(quiet):
            ts = load_tasks(list(tasks), [u.val_fraction for u in units], work, include_path)
        LM = _lm_class()
        for u in units:
            t0 = time.time()
            folder = _materialise(u, work / "model")
            with _silenced(quiet):
                lm = LM(pretrained=str(folder), trust_remote_code=True, batch_size=batch_size, device=dev, stages=sel)
                objs = {t.task_name: t for t in ts.tasks_for(u.val_fraction)}
                res = _evaluate(lm, list(objs.values()), ts.manager, limit)
            new = entries(res, ts, objs, stages=label, limit=limit, batch_size=batch_size, version=version)
            del lm
            shutil.rmtree(work / "model", ignore_errors=True)
            rec = merge(u.record if isinstance(u.record, dict) else minimal_record(u), new)
            rec.setdefault("branch", u.branch)
            if not out:
                _write(u, rec)
            records.append({"target": u.label, "repo": u.repo, "branch": u.branch, "record": rec})
            log(f"{u.label} ({time.time() - t0:.1f}s): " + "; ".join(
                f"{e['task']} {e['metric']} {e['value']:.4f}" + (f" ± {e['stderr']:.4f}" if e["stderr"] is not None else "")
                for e in new) + f"  [n={new[0]['n'] if new else 0}, stages {label}]")
    if out:
        recs = [r["record"] for r in records]
        atomic_write_bytes(out, to_bytes(recs[0] if len(recs) == 1 else {"records": recs}))
    return records


def _write(unit: Unit, rec: dict) -> None:
    body = to_bytes(rec)
    if unit.repo:
        publish.update_branch_files(unit.repo, unit.branch, {publish.MEASURE: body})
    else:
        atomic_write_bytes(unit.path / publish.MEASURE, body)


def demo_evals(repo, log=print, limit: int = 24, batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict] | None:
    """The demo's step: the local task on every branch when lm-eval is installed, else one line."""
    if not available():
        log(f"      benchmarks: skipped ({INSTALL_HINT} to score {devils_cloze.NAME} on every branch)")
        return None
    return run_eval(str(repo), [devils_cloze.NAME], limit=limit, batch_size=batch_size, device="cpu",
                    log=lambda line: log(f"      {line}"))
