"""``poelm average``: the arithmetic mean of the weights of several saves of one run.

Averaging the latest saves of a high-LR phase approximates the model an LR decay would reach,
with no training at all: LAWA (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and
BERT Training with Latest Weight Averaging", arXiv:2209.14981) and Sanyal et al. 2023 ("Early
Weight Averaging meets High Learning Rates for LLM Pre-training", arXiv:2306.03241). Next to a
cooldown probe (``poelm.train.cooldown``) it is a second, free estimate of "what would BPB be if
we annealed here?".

What is averaged: every tensor of the ``PoEGPT`` state dict, uniformly, ``w = (1/N) sum_i w_i``,
accumulated in **fp32** whatever the saves' dtype (a bf16 sum of many saves would lose the low
bits that distinguish them), then cast to the branch dtype (``export.default_dtype``: the
stored dtype of a CPU run, bf16 for a bf16-autocast run; ``dtype`` to choose). One save averaged
is that save, bit for bit. Only saves of one run are averaged: the same architecture (every
``ModelConfig`` field), the same tokenizer (``Tokenizer.fingerprint``) and the same data settings
(``poelm_config.data``), each step once; anything else is one ``CheckpointError`` line, raised
from the configs and safetensors headers before a weight is read.

The average takes the newest save's place in the trajectory (step, tokens, lrm, phase: the point
the estimate is about) and is written as a Hugging Face folder (``export.export``) whose
``poelm_manifest.json`` carries ``kind = "average"`` and an ``average`` block (the sources:
label, step, tokens, lrm and, when published, the branch, its commit and the sha256 of its
weights). Published, it is branch ``avg-XXXXX-N`` (XXXXX the newest averaged step, N the number
of saves; ``publish.AVERAGE_BRANCH``), forked from ``step-XXXXX``; like a cooldown probe it never
becomes a step branch and never moves ``main``, and ``verify`` checks it on its own
(``verify_averages``). WAND bounds and the routing threshold of the sources are not carried over:
measuring the branch calibrates its own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from poelm.core.errors import CheckpointError, PublishError
from poelm.core.model import ModelConfig
from poelm.fsio import atomic_write_json
from poelm.train import checkpoint
from poelm.trajectory import export as export_mod
from poelm.trajectory.publish import (MANIFEST, average_branches, average_of, branch_name, branch_step, check_cooldown_source,
                                      open_repo, read_json, step_branches)

ACCUMULATE = "fp32"
METHOD = "uniform arithmetic mean of every weight (LAWA)"


def average_branch_name(step: int, n: int) -> str:
    """``avg-XXXXX-N``: the mean of N saves, the newest at step XXXXX (5+ digits)."""
    if int(step) < 0 or int(n) < 2:
        raise PublishError(f"an average branch needs step >= 0 and at least 2 saves, got step {step}, {n} save(s)")
    return f"avg-{int(step):05d}-{int(n)}"


# ----------------------------------------------------------------------------- sources
def describe(path) -> dict:
    """What averaging needs from one save (a checkpoint dir, a run dir: its newest, or an exported
    folder), read from its JSON files and the safetensors header only (no weights): ``path``,
    ``weights`` (file), ``prefix`` of the state keys, ``shapes``, ``model`` (ModelConfig),
    ``poelm_config``, ``meta``, ``tokenizer`` (fingerprint), ``tokenizer_json``."""
    from poelm.data.tokenizer import Tokenizer

    d = checkpoint.save_dir(path)
    if checkpoint.is_hf_export(d):
        hf = checkpoint.read_json(d / "config.json", "export config")
        cfg, prefix = hf.get("poelm_config"), "model."
        meta = {k: hf.get(k) for k in ("step", "rel_step", "phase", "lrm", "tokens", "tokens_in_phase")}
        if isinstance(cfg, dict) and (cfg.get("train") or {}).get("dtype") == "bf16":
            meta["autocast_dtype"] = "bf16"
    else:
        checkpoint.verify(d)  # a truncated or corrupted save is never averaged
        cfg, prefix = checkpoint.read_json(d / "config.json", "checkpoint config"), ""
        meta = checkpoint.read_json(d / "meta.json", "checkpoint meta")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{d} carries no poelm config (config.json poelm_config / [model]): its run is unknown")
    if meta.get("step") is None:
        raise CheckpointError(f"{d} does not record its step")
    try:
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:  # safetensors raises several types on a damaged file
        raise CheckpointError(f"cannot read model weights {d / 'model.safetensors'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    tok_text = (d / "tokenizer.json").read_text(encoding="utf-8") if (d / "tokenizer.json").is_file() else None
    if tok_text is None:
        raise CheckpointError(f"{d} has no tokenizer.json; a save must carry its tokenizer")
    return {"path": d, "weights": d / "model.safetensors", "prefix": prefix, "shapes": shapes, "model": ModelConfig.from_dict(cfg["model"]),
            "poelm_config": cfg, "meta": meta, "tokenizer": Tokenizer.from_json(tok_text, source=str(d / "tokenizer.json")).fingerprint,
            "tokenizer_json": tok_text}


def check_same_run(infos: list[dict], labels: list[str] | None = None) -> None:
    """One ``CheckpointError`` line unless every save has the first one's architecture, tokenizer,
    data settings and weight names/shapes, and no step appears twice."""
    if not infos:
        raise CheckpointError("nothing to average: give two or more saves (REPO@step-A REPO@step-B ..., or one TARGET with --last N)")
    labels = labels or [str(i["path"]) for i in infos]
    a, la = infos[0], labels[0]
    for b, lb in zip(infos[1:], labels[1:]):
        ma, mb = a["model"].to_dict(), b["model"].to_dict()
        diff = [k for k in ma if ma[k] != mb.get(k)]
        if diff:
            k = diff[0]
            raise CheckpointError(f"cannot average {la} and {lb}: different architectures (model.{k} {ma[k]} vs {mb[k]}); "
                                  "average saves of one run")
        if a["tokenizer"] != b["tokenizer"]:
            raise CheckpointError(f"cannot average {la} and {lb}: different tokenizers; average saves of one run")
        if a["poelm_config"].get("data") != b["poelm_config"].get("data"):
            raise CheckpointError(f"cannot average {la} and {lb}: different data settings ([data]); average saves of one run")
        if a["shapes"] != b["shapes"]:
            raise CheckpointError(f"cannot average {la} and {lb}: their weights differ in names or shapes")
    steps = [int(i["meta"]["step"]) for i in infos]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        raise CheckpointError(f"step {dup[0]} is given twice; average distinct saves")


def mean_state(states) -> dict:
    """``{name: (1/N) sum_i state_i[name]}`` accumulated and returned in fp32 (module docstring); integer
    tensors (none in PoEGPT today) must agree and are kept. ``states`` may be an iterator, so
    only one source and the accumulator are in memory at a time."""
    acc, n = None, 0
    for st in states:
        n += 1
        if acc is None:
            acc = {k: (v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()) for k, v in st.items()}
            continue
        for k, v in st.items():
            if v.is_floating_point():
                acc[k] += v.to(torch.float32)
            elif not torch.equal(acc[k], v):
                raise CheckpointError(f"cannot average: integer tensor {k} differs between saves")
    if acc is None:
        raise CheckpointError("nothing to average")
    return {k: (v / n if v.is_floating_point() else v) for k, v in acc.items()}


def _states(infos):
    from safetensors.torch import load_file

    for i in infos:
        try:
            st = load_file(str(i["weights"]))
        except Exception as e:
            raise CheckpointError(f"cannot read model weights {i['weights']}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        p = i["prefix"]
        yield {k[len(p):]: v for k, v in st.items() if k.startswith(p)}


def source_entry(info: dict, label: str) -> dict:
    m = info["meta"]
    return {"label": label, "step": int(m["step"]), "tokens": m.get("tokens"), "lrm": m.get("lrm")}


def average(sources, out_dir, labels=None, dtype: str | None = None, extra: dict | None = None) -> Path:
    """Average the saves at ``sources`` (paths; ``labels`` name them in the manifest) into the
    Hugging Face folder ``out_dir`` (atomic; new or an earlier export). Returns the folder.

    The folder holds the newest save's trajectory fields with the mean weights, and its
    ``poelm_manifest.json`` the ``average`` block (``extra`` is merged into it)."""
    export_mod.check_dtype(dtype)
    labels = [str(x) for x in (labels or sources)]
    infos = [describe(p) for p in sources]
    check_same_run(infos, labels)
    order = sorted(range(len(infos)), key=lambda i: int(infos[i]["meta"]["step"]))
    infos, labels = [infos[i] for i in order], [labels[i] for i in order]
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or checkpoint.is_hf_export(out))):
        raise CheckpointError(f"{out} exists and is not an earlier poelm export; choose a new output folder")
    newest = infos[-1]
    state = mean_state(_states(infos))
    with tempfile.TemporaryDirectory(prefix="poelm-average-") as tmp:
        src = Path(tmp) / "src"  # a minimal checkpoint of the mean: what export.export reads
        src.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads(json.dumps(newest["poelm_config"]))
        cfg.pop(export_mod.BOUNDS_KEY, None)  # the sources' calibration is not the average's
        atomic_write_json(src / "config.json", cfg)
        meta = {k: v for k, v in newest["meta"].items() if k in ("step", "rel_step", "phase", "lrm", "tokens", "tokens_in_phase", "autocast_dtype")}
        atomic_write_json(src / "meta.json", meta)
        (src / "tokenizer.json").write_text(newest["tokenizer_json"], encoding="utf-8")
        checkpoint.write_manifest(src)
        export_mod.export(src, out, dtype=dtype)
    man = json.loads((out / MANIFEST).read_text())
    man["kind"] = "average"
    man["average"] = {"n": len(infos), "method": METHOD, "accumulate": ACCUMULATE,
                      "weights_dtype": json.loads((out / "config.json").read_text()).get("dtype"),
                      "sources": [source_entry(i, lb) for i, lb in zip(infos, labels)], **(extra or {})}
    atomic_write_json(out / MANIFEST, man)
    return out


# ----------------------------------------------------------------------------- choosing saves
def last_branches(repo, upto: str, n: int, api=None) -> list[str]:
    """The ``n`` step branches of ``repo`` ending at ``upto`` (inclusive), oldest first."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PublishError(f"--last needs a positive number of saves, got {n}")
    refs = open_repo(repo, api=api).refs()
    have = [b for b in step_branches(refs) if branch_step(b) <= branch_step(upto)]
    if len(have) < n:
        raise PublishError(f"{repo} has {len(have)} step branch(es) up to {upto}, fewer than --last {n}")
    return have[-n:]


def last_checkpoints(path, n: int) -> list[Path]:
    """The ``n`` checkpoints of a run dir ending at its newest (or at ``path`` when it is one save)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"--last needs a positive number of saves, got {n}")
    p = Path(path)
    run, upto = (p.parent, p) if (p / "model.safetensors").is_file() else (p, checkpoint.latest(p))
    if upto is None or not checkpoint.STEP_RE.match(upto.name):
        raise CheckpointError(f"{path}: --last N needs a run dir or one of its step-XXXXX checkpoints")
    saves = sorted((int(checkpoint.STEP_RE.match(d.name).group(1)), d) for d in run.iterdir()
                   if checkpoint.STEP_RE.match(d.name) and (d / "manifest.json").is_file())
    have = [d for s, d in saves if s <= int(checkpoint.STEP_RE.match(upto.name).group(1))]
    if len(have) < n:
        raise CheckpointError(f"{run} has {len(have)} checkpoint(s) up to {upto.name}, fewer than --last {n}")
    return have[-n:]


# ----------------------------------------------------------------------------- publishing
def check_publish(repo, steps: list[int], tokens: list, api=None) -> dict:
    """Before any averaging: ``repo`` holds a step branch for every averaged step (the average
    forks from the newest and records each one's commit), with the same token count when both
    are known. Returns ``{step: (branch, commit, weights sha256)}``."""
    check_cooldown_source(repo, max(steps), api=api)  # one line when repo lacks the newest step
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    out = {}
    for s, t in zip(steps, tokens):
        b = branch_name(s)
        if b not in refs:
            raise PublishError(f"{repo} has no branch {b}: an average records the branch of every save it averages; publish step {s} first")
        man = read_json(backend, b, MANIFEST) or {}
        if t is not None and man.get("tokens") is not None and man["tokens"] != t:
            raise PublishError(f"{repo}@{b} holds {man['tokens']} tokens but the save averaged as step {s} has {t}: not the same run")
        out[s] = (b, refs[b], ((man.get("files") or {}).get("model.safetensors") or {}).get("sha256"))
    return out


def publish_average(sources, repo, labels=None, dtype: str | None = None, force: bool = False, api=None) -> str:
    """Average ``sources`` and publish the result as branch ``avg-XXXXX-N`` of ``repo``; return it.

    Everything is checked before any weight is read: at least two saves of one run, the repo
    holding each averaged step, the branch new unless ``force``."""
    labels = [str(x) for x in (labels or sources)]
    infos = [describe(p) for p in sources]
    check_same_run(infos, labels)
    if len(infos) < 2:
        raise PublishError("an average of one save is that save: give two or more saves to publish an avg-XXXXX-N branch")
    steps = [int(i["meta"]["step"]) for i in infos]
    branch = average_branch_name(max(steps), len(infos))
    linked = check_publish(repo, steps, [i["meta"].get("tokens") for i in infos], api=api)
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    old = refs.get(branch)
    if old is not None and not force:
        raise PublishError(f"{branch} already exists in {repo}; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="poelm-publish-") as tmp:
        folder = average(sources, Path(tmp) / "export", labels=labels, dtype=dtype)
        man = json.loads((folder / MANIFEST).read_text())
        for e in man["average"]["sources"]:
            e["branch"], e["commit"], e["weights_sha256"] = linked[e["step"]]
        atomic_write_json(folder / MANIFEST, man)
        source = branch_name(max(steps))
        message = f"{branch}: mean of {len(steps)} saves (steps {', '.join(map(str, sorted(steps)))}), accumulated in {ACCUMULATE}"
        backend.write_branch(folder, branch, old or refs[source], old, False, refs.get("main"), message)
    return branch


# ----------------------------------------------------------------------------- verify
def verify_averages(backend, refs, check_files) -> list[str]:
    """Problems of the ``avg-XXXXX-N`` branches (``poelm.trajectory.verify`` calls this with its
    file checker): an ``average`` manifest block with N sources whose newest step is XXXXX, every
    source branch present with the weights it had when averaged (sha256), step XXXXX in manifest /
    config.json / weights header, every file against the manifest, ``main`` never on it."""
    problems = []
    for b in average_branches(refs):
        step, n = average_of(b)
        man = read_json(backend, b, MANIFEST)
        if man is None:
            problems.append(f"{b}: no readable {MANIFEST}")
            continue
        avg = man.get("average") if isinstance(man.get("average"), dict) else {}
        srcs = avg.get("sources") if isinstance(avg.get("sources"), list) else []
        if man.get("kind") != "average" or not srcs:
            problems.append(f"{b}: its manifest does not record an average (kind/average missing)")
        elif len(srcs) != n or avg.get("n") != n or max(int(s.get("step", -1)) for s in srcs) != step:
            problems.append(f"{b}: manifest records an average of {len(srcs)} saves ending at step "
                            f"{max(int(s.get('step', -1)) for s in srcs)}, its name says {n} ending at {step}")
        for s in srcs:
            sb = s.get("branch")
            if sb is None:
                continue
            if sb not in refs:
                problems.append(f"{b}: its source branch {sb} is missing")
                continue
            sha = (((read_json(backend, sb, MANIFEST) or {}).get("files") or {}).get("model.safetensors") or {}).get("sha256")
            if s.get("weights_sha256") and sha != s["weights_sha256"]:
                problems.append(f"{b}: its source {sb} no longer holds the weights that were averaged")
        if man.get("step") != step:
            problems.append(f"{b}: manifest says step {man.get('step')}, an average ending at step {step} must say {step}")
        problems += check_files(backend, b, man, step)[0]
        if "main" in refs and refs["main"] == refs[b]:
            problems.append(f"main: points at the average {b}; main tracks the newest step branch")
    return problems
