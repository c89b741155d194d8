"""``poelm eval``: the shipped offline task, stage selection, records and report, bad input.

The tests that run lm-evaluation-harness skip without it (``pytest.importorskip("lm_eval")``;
CI installs the ``eval`` extra after the main suite); the rest run everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from poelm import cli
from poelm.core.errors import PoelmError
from poelm.core.model import ModelConfig, PoEGPT
from poelm.data.corpus import is_val
from poelm.measure import evals
from poelm.measure.tasks import devils_cloze
from poelm.report import benchmarks
from poelm.report import tables as report
from poelm.train import checkpoint
from poelm.trajectory import publish
from poelm.trajectory import verify

PHASE = {"name": "b2", "start_step": 0, "steps": 1000, "warmup": 10, "peak": 0.5, "warmdown_ratio": 0.55, "final": 0.0}


# ----------------------------------------------------------------------------- the local task (no lm_eval needed)
def test_cloze_items_are_heldout_deterministic_and_well_formed():
    texts = devils_cloze.entries()
    assert len(texts) == 999  # poelm/data/embedded/README.md
    docs = devils_cloze.items(0.1, texts)
    assert docs == devils_cloze.items(0.1, texts)
    held = {devils_cloze._parse(t) for t in texts if is_val(t, 0.1)} - {None}
    assert len(docs) == len(held) == 85
    answers = {a for _, a in held}
    golds = []
    for d in docs:
        assert len(d["choices"]) == devils_cloze.CHOICES == len(set(d["choices"]))
        assert (d["query"], d["choices"][d["gold"]]) in held  # the gold choice is the entry's own definition start
        assert all(c in answers for c in d["choices"])  # distractors are held-out text too
        assert 4 <= len(d["choices"][d["gold"]].split()) <= devils_cloze.WORDS
        golds.append(d["gold"])
    assert {golds.count(g) for g in range(4)} <= set(range(12, 32))  # the gold position is spread, not fixed
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)  # hash order: --limit takes a spread
    small = devils_cloze.items(0.05, texts)
    assert {d["query"] for d in small} < {d["query"] for d in docs}  # a smaller split is a subset
    with pytest.raises(PoelmError, match="held-out entries"):
        devils_cloze.items(0.001, texts[:20])


def test_cloze_entry_parsing():
    assert devils_cloze._parse("ABATIS, n. Rubbish in front of a fort, to prevent the rubbish outside") == (
        "ABATIS, n.", "Rubbish in front of a fort, to prevent")
    assert devils_cloze._parse("ACCORD, v.t. To agree with someone") == ("ACCORD, v.t.", "To agree with someone")
    assert devils_cloze._parse("I is the first letter of the alphabet") is None
    assert devils_cloze._parse("BORE, n. A person.") is None  # shorter than MIN_WORDS


def test_parse_stages():
    assert evals.parse_stages(None) == ("full", None) == evals.parse_stages("full")
    assert evals.parse_stages("2") == ("stage=2", 2) == evals.parse_stages("stage=2")
    assert evals.parse_stages("prefix=3") == ("prefix=3", [0, 1, 2])
    for bad in ("prefix=0", "wand", "stage=x", "-1", "prefix=", ""):
        with pytest.raises(PoelmError, match="--stages"):
            evals.parse_stages(bad)
    evals._check_stages("prefix=3", [0, 1, 2], 3, "m")
    with pytest.raises(PoelmError, match="K=3"):
        evals._check_stages("stage=3", 3, 3, "m")


def test_merge_replaces_only_the_same_task_and_stages():
    old = {"schema": 1, "step": 5, "bpb": {"full": {"value": 2.0}}, "benchmarks": [
        {"task": "a", "metric": "acc", "stages": "full", "value": 0.1},
        {"task": "a", "metric": "acc", "stages": "stage=0", "value": 0.2},
        {"task": "b", "metric": "acc", "stages": "full", "value": 0.3}]}
    new = evals.merge(old, [{"task": "a", "metric": "acc", "stages": "full", "value": 0.9},
                            {"task": "a", "metric": "acc_norm", "stages": "full", "value": 0.8}])
    got = {(e["task"], e["metric"], e["stages"]): e["value"] for e in new["benchmarks"]}
    assert got == {("a", "acc", "full"): 0.9, ("a", "acc_norm", "full"): 0.8, ("a", "acc", "stage=0"): 0.2, ("b", "acc", "full"): 0.3}
    assert new["bpb"] == old["bpb"] and len(old["benchmarks"]) == 3  # the input is not modified


def test_report_section_and_plot_from_entries(tmp_path):
    def rec(step, v, extra=()):
        e = [{"task": "t", "metric": "acc", "stages": "full", "value": v, "stderr": 0.05, "n": 20, "limit": 20,
              "num_fewshot": 0, "chance": 0.25, "lm_eval": "0.4.13"}, *extra]
        return {"schema": 1, "step": step, "branch": f"step-{step:05d}", "K": 2, "benchmarks": e}

    recs = [rec(10, 0.30), rec(20, 0.45, [{"task": "t", "metric": "acc", "stages": "stage=0", "value": 0.35, "stderr": None}])]
    assert benchmarks.series(recs) == {"t acc": ([10, 20], [0.30, 0.45], [0.05, 0.05]), "t acc (stage=0)": ([20], [0.35], [None])}
    [(head, desc, table)] = benchmarks.sections(recs)
    assert head == "Benchmarks vs step" and "chance 0.2500" in desc and "20 documents (--limit 20)" in desc
    assert table.splitlines()[2] == "| `step-00010` (seed) | 10 | 0.3000 ± 0.0500 | not measured |"
    assert table.splitlines()[3] == "| `step-00020` | 20 | 0.4500 ± 0.0500 | 0.3500 |"
    assert benchmarks.sections([{"schema": 1, "step": 1}]) == [] and benchmarks.make_plots([{"schema": 1, "step": 1}], tmp_path) == []
    [png] = benchmarks.make_plots(recs, tmp_path)
    assert png.name == "benchmarks_vs_step.png" and png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- without lm_eval
def test_without_lm_eval_one_line_and_exit_2(monkeypatch, capfd, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert not evals.available()
    assert cli.main(["eval", str(tmp_path), "--tasks", devils_cloze.NAME]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err == f"error: {evals.INSTALL_HINT}\n" and "poelm[eval]" in err
    lines = []
    assert evals.demo_evals(tmp_path, log=lines.append) is None
    assert len(lines) == 1 and "poelm[eval]" in lines[0] and "skipped" in lines[0]


# ----------------------------------------------------------------------------- with lm_eval
TEXTS = [t for t in devils_cloze.entries()[:60]]


def _ckpt(d, step, seed, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=3, n_embd=32, n_head=2, n_kv_head=1, intermediate=64,
                      max_seq_len=128, stage_layers=(1, 1, 1))
    model = PoEGPT(cfg)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # perturbed, so the stages (and the branches) predict differently
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "data": {"path": "embedded", "val_fraction": 0.1}}))
    (d / "meta.json").write_text(json.dumps({"step": step, "rel_step": step, "phase": PHASE, "lrm": 0.5, "tokens": 100 * step,
                                             "tokens_in_phase": 100 * step}))
    tok.save(d)
    checkpoint.write_manifest(d)
    return d


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    from poelm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("evaltraj")
    tok = train_tokenizer(TEXTS, 400)
    ckpts = [_ckpt(root / "run" / f"step-{s:05d}", s, i, tok) for i, s in enumerate((10, 20, 30))]
    repo = root / "repo"
    for c in ckpts:
        publish.publish(c, repo)
    # step 20 was measured before: its figures must survive the eval
    publish.update_branch_files(repo, "step-00020", {publish.MEASURE: json.dumps(
        {"schema": 1, "step": 20, "K": 3, "bpb": {"full": {"value": 3.25, "ci": [3.0, 3.5]}}}).encode()})
    return root, repo, ckpts


def _refs(repo):
    return subprocess.run(["git", f"--git-dir={repo}", "show-ref"], capture_output=True, text=True, check=True).stdout


def test_eval_every_branch_writes_records_and_the_report_shows_them(trajectory, capfd, tmp_path):
    pytest.importorskip("lm_eval")
    _, repo, _ = trajectory
    assert cli.main(["eval", str(repo), "--tasks", devils_cloze.NAME, "--limit", "6", "--batch-size", "4"]) == 0
    out, _ = capfd.readouterr()
    assert out.count(f"{devils_cloze.NAME} acc ") == 3 and "model cards refreshed" in out
    recs = publish.read_records(repo)
    assert [r["step"] for r in recs] == [10, 20, 30]
    for r in recs:
        es = {e["metric"]: e for e in r["benchmarks"]}
        assert set(es) == {"acc", "acc_norm"}
        for e in es.values():
            assert e["task"] == devils_cloze.NAME and e["stages"] == "full" and e["n"] == 6 and e["limit"] == 6
            assert e["chance"] == 0.25 and e["batch_size"] == 4 and e["lm_eval"]
            assert 0.0 <= e["value"] <= 1.0 and e["value"] * 6 == pytest.approx(round(e["value"] * 6))  # k of 6 right
    assert recs[1]["bpb"]["full"]["value"] == 3.25  # measure's figures kept
    assert recs[0]["K"] == 3 and recs[0]["phase"]["name"] == "b2" and "bpb" not in recs[0]  # minimal record
    assert verify.verify(repo) == []

    # stage 0 alone: new entries next to the full-K ones
    assert cli.main(["eval", f"{repo}@step-00030", "--tasks", devils_cloze.NAME, "--limit", "6", "--stages", "0"]) == 0
    last = publish.read_records(repo)[-1]
    assert sorted((e["stages"], e["metric"]) for e in last["benchmarks"]) == [
        ("full", "acc"), ("full", "acc_norm"), ("stage=0", "acc"), ("stage=0", "acc_norm")]

    records = report.load_records(repo)
    text = report.build_tables(records)
    assert "### Benchmarks vs step" in text and f"{devils_cloze.NAME} acc (stage=0)" in text
    v = next(e for e in records[0]["benchmarks"] if e["metric"] == "acc")
    assert f"| `step-00010` (seed) | 10 | {v['value']:.4f} ± {v['stderr']:.4f} |" in text
    paths = report.write_report(records, tmp_path / "report")
    assert paths["benchmarks_vs_step"].is_file() and "benchmarks_vs_step.png" in paths["report"].read_text()
    card = subprocess.run(["git", f"--git-dir={repo}", "show", "step-00030:README.md"], capture_output=True, text=True, check=True).stdout
    assert "Benchmarks vs step" in card


def test_eval_checkpoint_dir_batch_sizes_agree_and_out_file(trajectory, tmp_path):
    pytest.importorskip("lm_eval")
    _, _, ckpts = trajectory
    got = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}.json"
        [r] = evals.run_eval(str(ckpts[0]), [devils_cloze.NAME], stages="prefix=2", batch_size=bs, limit=5, out=str(out), log=lambda *_: None)
        rec = json.loads(out.read_text())
        assert rec == r["record"] and r["repo"] is None and rec["step"] == 10
        got[bs] = {e["metric"]: (e["value"], e["stderr"]) for e in rec["benchmarks"]}
        assert {e["stages"] for e in rec["benchmarks"]} == {"prefix=2"}
    assert got[1] == got[4]
    assert not (ckpts[0] / publish.MEASURE).exists()  # --out: the checkpoint is not written
    [r] = evals.run_eval(str(ckpts[0]), [devils_cloze.NAME], limit=3, log=lambda *_: None)
    assert json.loads((ckpts[0] / publish.MEASURE).read_text()) == r["record"]  # no --out: the record next to the weights
    (ckpts[0] / publish.MEASURE).unlink()


def _bad(argv, capfd) -> str:
    assert cli.main(argv) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_tasks_one_line_exit_2_nothing_written(trajectory, capfd, tmp_path):
    pytest.importorskip("lm_eval")
    _, repo, _ = trajectory
    before = _refs(repo)
    # data that cannot be loaded (a task YAML of one's own whose file is missing): no index of lm-eval's tasks needed
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "gone.yaml").write_text("task: poelm_test_gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                   f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                                   "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    err = _bad(["eval", str(repo), "--tasks", f"{devils_cloze.NAME},poelm_test_gone", "--include-path", str(inc)], capfd)
    assert "poelm_test_gone" in err and "cannot be loaded" in err
    err = _bad(["eval", str(repo), "--tasks", devils_cloze.NAME, "--stages", "prefix=4"], capfd)
    assert "K=3" in err
    err = _bad(["eval", str(repo), "--tasks", f"{devils_cloze.NAME},,"], capfd)
    assert "--tasks" in err
    err = _bad(["eval", str(repo), "--tasks", devils_cloze.NAME, "--out", str(tmp_path / "no" / "such.json")], capfd)
    assert "does not exist" in err
    err = _bad(["eval", str(repo), "--tasks", devils_cloze.NAME, "--limit", "0"], capfd)
    assert "--limit" in err
    assert _refs(repo) == before  # nothing written to any branch


def test_unknown_task_name_one_line_exit_2_nothing_written(trajectory, capfd):
    pytest.importorskip("lm_eval")
    _, repo, _ = trajectory
    before = _refs(repo)
    # only lm-eval's full task index can say a name is unknown: ~20 s to build (15k YAML files)
    err = _bad(["eval", str(repo), "--tasks", f"{devils_cloze.NAME},hellaswagg"], capfd)
    assert "unknown lm-eval task 'hellaswagg'" in err and "hellaswag" in err
    assert _refs(repo) == before  # nothing written to any branch
