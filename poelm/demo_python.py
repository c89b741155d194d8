"""``poelm demo --domain python``: domain-adaptive continual pretraining on the Python stdlib, offline.

The card's other continual patterns, on a tiny CPU model and real text nobody in this project
wrote (``data.stdlib``: the standard library's own ``.py`` files):

1. a base phase of the embedded default (``configs/embedded.toml``) on the embedded corpus;
2. ``extend-vocab``: the base checkpoint with ``new_tokens`` merges learned on the code's training
   split (``train.vocab``: old ids kept, new rows = mean of their pieces);
3. four continual phases of ``steps`` steps from the base save, adding the code with
   ``--add-data``: {old vocabulary, extended vocabulary} x {replay 0, replay 0.25}, saving every
   ``save_every`` steps;
4. every save measured on two slices, ``old`` (the embedded corpus's validation split) and
   ``new`` (the code's), against the base save, paired over documents (``measure.domains``);
5. ``report.md``: the answer (gain on code, retention on the old text, 95% intervals), the table
   per run and step (BPB, tokens per byte on code, training time), and ``slices.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from poelm import config as config_mod
from poelm.core.errors import PoelmError

REPLAYS = (0.0, 0.25)


def _table(res: dict, times: dict) -> str:
    cols = ["run", "step", "vocab", "new BPB", "gain on new [95% CI]", "old BPB", "retention on old [95% CI]", "tokens/byte (code)", "train s"]
    f = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ref = res["reference"]
    out.append(f"| seed | {ref['step']} | {ref['vocab_size']} | {ref['slices']['new']['bpb']:.4f} | | {ref['slices']['old']['bpb']:.4f} | | "
               f"{ref['slices']['new']['tokens_per_byte']:.4f} | |")
    for r in res["records"]:
        n, o = r["slices"]["new"], r["slices"]["old"]
        g, k = n["delta_bpb"], o["delta_bpb"]
        run = Path(r["target"]).parent.name
        out.append(f"| {run} | {r['step']} | {r['vocab_size']} | {n['bpb']:.4f} | {f(-g['value'])} [{f(-g['ci'][1] if g['ci'][1] is not None else None)}, "
                   f"{f(-g['ci'][0] if g['ci'][0] is not None else None)}] | {o['bpb']:.4f} | {f(k['value'])} [{f(k['ci'][0])}, {f(k['ci'][1])}] | "
                   f"{n['tokens_per_byte']:.4f} | {times.get(run, 0):.0f} |")
    return "\n".join(out)


def run_python_demo(workdir="poelm-demo-python", base_steps=120, steps=40, save_every=20, new_tokens=256, files=80,
                    slice_bytes=65_536, overrides=None, progress=True, log=print, overwrite=False) -> dict:
    from poelm.data.stdlib import write_corpus
    from poelm.fsio import atomic_write_text
    from poelm.measure import domains
    from poelm.report.answer import domain_markdown
    from poelm.train import checkpoint as ckpt_mod
    from poelm.train import loop
    from poelm.train.vocab import extend_vocab

    for name, v in (("--base-steps", base_steps), ("--continual-steps", steps), ("--save-every", save_every), ("--new-tokens", new_tokens)):
        if not isinstance(v, int) or v < 1:
            raise PoelmError(f"{name} must be a positive integer, got {v!r}")
    work = Path(workdir)
    if work.exists() and any(work.iterdir()):
        if not overwrite:
            raise PoelmError(f"{work} already holds a demo run; pass --overwrite to replace it or --workdir to use another folder")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    code = work / "python-stdlib.jsonl"
    c = write_corpus(code, max_files=files)
    log(f"corpus: {c['files']} stdlib files, {c['docs']} documents, {c['bytes']:,} bytes -> {code}")
    cfg = config_mod.load("embedded", list(overrides or []) + [f"schedule.steps={base_steps}", f"train.save_every={base_steps}"])
    times = {}
    t = time.time()
    loop.train(cfg, work / "base", progress=progress)
    times["base"] = time.time() - t
    seed = ckpt_mod.latest(work / "base")
    t = time.time()
    s = extend_vocab(seed, work / "ext", corpus_path=str(code), new_tokens=new_tokens)
    times["extend-vocab"] = time.time() - t
    log(f"extend-vocab: {s['from_vocab']} -> {s['to_vocab']} tokens in {times['extend-vocab']:.1f}s")
    runs = []
    for vocab, src in (("old", seed), ("ext", Path(s["checkpoint"]))):
        for r in REPLAYS:
            name = f"{vocab}-vocab-replay{r:g}"
            t = time.time()
            loop.continue_phase(src, work / name, steps=steps, progress=progress, overrides=[f"train.save_every={save_every}"],
                                add_data=str(code), replay=r)
            times[name] = time.time() - t
            runs.append(work / name)
            log(f"{name}: {steps} steps in {times[name]:.0f}s")
    saves = [str(p) for run in runs for p in sorted(run.glob("step-*")) if ckpt_mod.STEP_RE.match(p.name) and p.name != seed.name]
    t = time.time()
    res = domains.measure_targets(saves, {"old": "embedded", "new": str(code)}, against=str(seed), max_bytes=slice_bytes, device="cpu")
    times["measure"] = time.time() - t
    res["times_s"] = times
    atomic_write_text(work / "slices.json", json.dumps(res, indent=2) + "\n")
    md = ["# poelm demo --domain python", "",
          f"A tiny CPU model (the embedded default, {base_steps} base steps) continued {steps} steps on {c['files']} Python stdlib "
          f"files ({c['bytes']:,} bytes), with and without {s['to_vocab'] - s['from_vocab']} new tokens, replay 0 and 0.25; "
          f"slices of {slice_bytes:,} bytes each. Total {time.time() - t0:.0f}s.", "",
          domain_markdown(res, "new", "old"), "## Per run and step", "", _table(res, times), ""]
    atomic_write_text(work / "report.md", "\n".join(md))
    log(_table(res, times))
    log(f"report: {work / 'report.md'}")
    return res
