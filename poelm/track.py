"""Live dashboards: Weights & Biases, TensorBoard and trackio, fed the records poelm already writes.

One record, two sinks: the training loop builds one dict per event (``kind`` train / eval / dist /
cooldown ..., ``step``, numbers) and ``Trainer.log`` appends it to ``log.jsonl`` and hands the same
dict to ``Run.log``; ``scalars`` flattens it to ``{"train/loss": ..., "train/stage_ce/0": ...,
"train/lr/matrix": ...}`` (lists by index, dicts by key, strings and None dropped), so what a
dashboard shows is exactly the log's numbers (the tests read each backend's files back and compare).

Every backend is imported only when a run asks for it (``pip install "poelm[track]"``, or the
extra named after one tracker); ``check`` says which extra is missing before any compute. A
backend that raises (network down, disk full, a killed service) prints one ``warning:`` line and
is dropped; training goes on and checkpoints are never touched (``Run`` catches everything).

Run identity (``Run.info``, stored in every checkpoint's ``meta.json`` under ``tracking`` and in
exported branches as ``poelm_tracking``): one id shared by the backends (W&B's run id; trackio
and TensorBoard key on the name and the log directory). ``--resume`` reopens the same run; a
continual phase is a new run whose ``group`` is its base phase's; a cooldown probe is a new run
tagged ``cooldown-from-step-XXXXX``; ``poelm measure`` logs a branch's card metrics into the run
that saved it, at the branch's step.

Steps: W&B drops a ``log(step=s)`` whose ``s`` is below the run's last step (a resumed run after a
kill, or a measurement logged after training). Here every W&B metric is plotted against a logged
``step`` metric (``define_metric(step_metric=...)``, W&B's documented way to log out of order),
so both land where they belong. TensorBoard and trackio take any step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import secrets
import sys
from pathlib import Path

from poelm.core.errors import ConfigError

DEFAULT_PROJECT = "poelm"
STEP_KEY = "step"


# ----------------------------------------------------------------------------- backends
class _Wandb:
    def __init__(self, info: dict, config: dict | None, resume: bool):
        try:
            import wandb
        except ImportError:
            raise ConfigError(_missing("wandb")) from None
        self.run = wandb.init(project=info["project"], name=info["name"], id=info["id"], group=info.get("group"),
                              tags=list(info.get("tags") or []), config=config, dir=info["dir"], resume="allow",
                              reinit="create_new")
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def log(self, metrics: dict, step: int):
        self.run.log({**metrics, STEP_KEY: step})

    def config(self, config: dict):
        self.run.config.update(config, allow_val_change=True)

    def finish(self):
        self.run.finish()


class _TensorBoard:
    def __init__(self, info: dict, config: dict | None, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        # one event file per process; a resumed run adds a file to the same directory
        self.writer = SummaryWriter(log_dir=str(Path(info["dir"]) / "tensorboard"))
        if config is not None:
            self.config(config)

    def log(self, metrics: dict, step: int):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()  # a killed run leaves every logged step readable

    def config(self, config: dict):
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
        self.writer.flush()

    def finish(self):
        self.writer.close()


class _Trackio:
    """trackio keeps one current run per process and ``trackio.init`` finishes the previous one:
    a cooldown probe opened between a phase's saves (``cooldown.Prober``) takes the slot, so the
    phase's run is reopened (``resume="allow"``, same name) at its next record."""

    def __init__(self, info: dict, config: dict | None, resume: bool):
        try:
            import trackio
        except ImportError:
            raise ConfigError(_missing("trackio")) from None
        self.trackio, self.info = trackio, info
        with contextlib.redirect_stdout(io.StringIO()):  # its banner (dashboard hints) each time a run opens
            self.run = trackio.init(project=info["project"], name=info["name"], group=info.get("group"), config=config,
                                    resume="allow", embed=False)

    def _current(self):
        return self.trackio.context_vars.current_run.get()

    def log(self, metrics: dict, step: int):
        if self._current() is not self.run:
            i = self.info
            with contextlib.redirect_stdout(io.StringIO()):
                self.run = self.trackio.init(project=i["project"], name=i["name"], group=i.get("group"), resume="allow", embed=False)
        self.run.log(metrics, step=step)

    def config(self, config: dict):
        pass  # trackio takes the config at init only

    def finish(self):
        if self._current() is self.run:  # else a later init already finished it
            with contextlib.redirect_stdout(io.StringIO()):
                self.trackio.finish()


# name -> (module whose presence means "installed", pip extra, backend)
BACKENDS = {
    "wandb": ("wandb", "wandb", _Wandb),
    "tensorboard": ("tensorboard", "tensorboard", _TensorBoard),
    "trackio": ("trackio", "trackio", _Trackio),
}


def check_names(names) -> list[str]:
    """Known tracker names, deduplicated in order (no import: config validation uses this)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"train.trackers must be a list of tracker names ({', '.join(BACKENDS)}), got {names!r}")
    out = []
    for n in names:
        if n not in BACKENDS:
            raise ConfigError(f"unknown tracker {n!r}: use {', '.join(BACKENDS)}")
        if n not in out:
            out.append(n)
    return out


def check(names) -> list[str]:
    """``check_names`` plus: each is installed. One ``ConfigError`` naming the extra otherwise;
    called before any compute (``importlib.util.find_spec`` imports nothing)."""
    out = check_names(names)
    for n in out:
        module, extra, _ = BACKENDS[n]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(_missing(n))
    return out


def _missing(name: str) -> str:
    module, extra, _ = BACKENDS[name]
    return f"tracker {name} needs the {module} package: pip install \"poelm[{extra}]\" (or \"poelm[track]\" for all three)"


# ----------------------------------------------------------------------------- records -> scalars
def scalars(rec: dict) -> dict:
    """Every finite number of a log record, keyed ``kind/field[/index or key]`` (``step`` and
    ``kind`` themselves excluded; booleans, strings and None dropped)."""
    prefix = str(rec.get("kind", "log"))
    out: dict = {}

    def walk(key, v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                out[key] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}/{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{key}/{i}", x)

    for k, v in rec.items():
        if k not in ("kind", STEP_KEY):
            walk(f"{prefix}/{k}", v)
    return out


# ----------------------------------------------------------------------------- the run
def new_id() -> str:
    """8 characters of [0-9a-z] (W&B's id alphabet)."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_info(out_dir, *, project=None, run_name=None, prior=None, resume=False, group=None, tags=()) -> dict:
    """The identity of a run: a resumed run keeps ``prior``'s; a new one gets a fresh id, the
    name ``run_name`` (default ``<out dir name>-<id>``, unique so trackio's resume-by-name never
    merges two runs), ``project`` (default the prior's, else ``poelm``), ``group`` and ``tags``."""
    if resume and prior:
        return dict(prior)
    rid = new_id()
    out = Path(out_dir).resolve()
    return {"id": rid, "name": run_name or f"{out.name}-{rid}", "project": project or (prior or {}).get("project") or DEFAULT_PROJECT,
            "group": group, "tags": list(tags), "dir": str(out)}


class Run:
    """The trackers of one run (rank 0). ``log(metrics, step)``, ``log_record(rec)``, ``config(d)``
    and ``finish()`` never raise: a backend that fails is reported once and dropped."""

    def __init__(self, names, info: dict, config: dict | None = None, resume: bool = False, warn=None):
        self.info = info
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.backends = {}
        for n in check(names):
            self._guard(n, lambda n=n: self.backends.__setitem__(n, BACKENDS[n][2](info, config, resume)))

    def _guard(self, name, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a dashboard must never stop training
            self.backends.pop(name, None)
            msg = " ".join(str(e).split())[:200]
            self.warn(f"warning: tracker {name} failed ({type(e).__name__}: {msg}); it is disabled, training goes on")

    def log(self, metrics: dict, step: int) -> None:
        for n, b in list(self.backends.items()):
            self._guard(n, lambda b=b: b.log(metrics, int(step)))

    def log_record(self, rec: dict) -> None:
        """One ``log.jsonl`` record, flattened (``scalars``), at its ``step``."""
        m = scalars(rec)
        if m and rec.get(STEP_KEY) is not None:
            self.log(m, rec[STEP_KEY])

    def config(self, config: dict) -> None:
        for n, b in list(self.backends.items()):
            self._guard(n, lambda b=b: b.config(config))

    def finish(self) -> None:
        for n, b in list(self.backends.items()):
            self._guard(n, b.finish)
        self.backends = {}

    def __bool__(self) -> bool:
        return bool(self.backends)


def start(names, out_dir, config: dict | None = None, *, opts: dict | None = None, prior: dict | None = None,
          resume: bool = False, cooldown: tuple[int, int] | None = None) -> Run | None:
    """The ``Run`` of a training phase, or None without trackers.

    ``opts``: ``project`` and ``run_name`` from the command line. ``prior``: the ``tracking``
    entry of the checkpoint the phase starts from. ``resume``: reopen ``prior``'s run. Otherwise a
    new run: grouped with ``prior``'s group or name (a continual phase with its base phase), and
    for a cooldown probe (``cooldown`` = (source step, N)) tagged with its source step and named
    ``<prior name>-cooldown-XXXXX-N`` (the probe's branch name after its run's)."""
    names = check_names(names)
    if not names:
        return None
    opts = opts or {}
    group, tags, name = None, [], opts.get("run_name")
    if prior and not resume:
        group = prior.get("group") or prior.get("name")
    if cooldown is not None and not resume:
        tags = [f"cooldown-from-step-{int(cooldown[0]):05d}"]
        if prior and not name:
            name = f"{prior.get('name')}-cooldown-{int(cooldown[0]):05d}-{int(cooldown[1])}"
    info = run_info(out_dir, project=opts.get("project"), run_name=name, prior=prior, resume=resume, group=group, tags=tags)
    return Run(names, info, config, resume=resume and bool(prior))


def measurement_run(names, record: dict, tracking: dict | None, *, opts: dict | None = None) -> Run | None:
    """The run a measurement logs into: ``tracking`` (the branch's or checkpoint's) when known,
    else one run per trajectory (id derived from the repo or target path, so every branch of it
    lands in the same run)."""
    names = check_names(names)
    if not names:
        return None
    opts = opts or {}
    if tracking:
        info = dict(tracking)
        if opts.get("project"):
            info["project"] = opts["project"]
        info.setdefault("dir", str(Path.cwd().resolve()))  # a published branch does not carry its run's local dir
    else:
        import hashlib

        where = str(record.get("repo") or record.get("target") or "measure")
        rid = hashlib.sha256(where.encode()).hexdigest()[:8]
        info = {"id": rid, "name": opts.get("run_name") or f"{Path(where.split('@')[0]).name}-measure-{rid}",
                "project": opts.get("project") or DEFAULT_PROJECT, "group": None, "tags": ["measure"],
                "dir": str(Path.cwd().resolve())}
    if opts.get("dir"):
        info["dir"] = str(Path(opts["dir"]).resolve())
    return Run(names, info, None, resume=True)
