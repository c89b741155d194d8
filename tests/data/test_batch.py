"""``poelm batch`` against real (tiny) runs: it reproduces every logged batch hash, across a
resume on 2 ranks (gloo), and a run on shards logs the text run's hashes and losses."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poelm import config
from poelm.cli import main
from poelm.data import batches, pretokenize
from poelm.data.tokenizer import train_tokenizer
from poelm.train import loop as train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CFG = """
[model]
vocab_size = 300
depth = 2
n_embd = 32
n_head = 2
n_kv_head = 1
intermediate = 64
max_seq_len = 32
stage_layers = [1, 1]

[data]
val_fraction = 0.1
mixture_seed = 4
{sources}

[schedule]
steps = 6
warmup = 1

[train]
seq_len = 32
device_batch_size = 2
tokens_per_step = 256
eval_every = 0
eval_tokens = 256
log_every = 1
save_every = 3
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts, sources = [], []
    for name, letters, w in (("left", "abcdefg", 3), ("right", "pqrstuv", 1)):
        rng = random.Random(name)
        docs = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(5, 40))) for _ in range(150)]
        texts += docs
        (root / name).mkdir()
        (root / name / "part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        sources.append(f'[[data.sources]]\nname = "{name}"\npath = "{root / name}"\nweight = {w}\n')
    train_tokenizer(texts, 300).save(root)
    (root / "run.toml").write_text(CFG.format(sources="\n".join(sources)))
    return root


def _fresh(corpus, path: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copy(corpus / "tokenizer.json", path / "tokenizer.json")  # skip BPE training
    return path


def _records(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _hashes(run):
    return {r["step"]: r["hash"] for r in _records(run, "batch")}


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    out = _fresh(corpus, tmp_path_factory.mktemp("runs") / "straight")
    train.train(config.load(str(corpus / "run.toml")), out, progress=False)
    return out


def _batch(capsys, *args):
    rc = main(["batch", *map(str, args)])
    cap = capsys.readouterr()
    return rc, [json.loads(x) for x in cap.out.splitlines()], cap.err


def test_batch_reproduces_every_logged_hash(straight, capsys):
    logged = _hashes(straight)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and len(set(logged.values())) == 6
    for step in range(1, 7):  # steps 1-3 from the stream's start, 4-6 from step-00003's position
        rc, lines, _ = _batch(capsys, straight, "--step", step, "--decode")
        head, rows = lines[0], lines[1:]
        assert rc == 0 and head["hash"] == logged[step] == head["logged_hash"]
        assert head["first_row"] == (step - 1) * 8 and len(rows) == 8 and all(len(r["ids"]) == 33 for r in rows)
        assert {r["source"] for r in rows} <= {"left", "right"} and all(r["text"].startswith("<|bos|>") for r in rows)
        assert [r["row"] for r in rows] == list(range((step - 1) * 8, step * 8))
    # the rows' letters say their source (disjoint alphabets)
    for r in rows:
        assert set(r["text"].replace("<|bos|>", "").replace(" ", "")) <= set("abcdefg" if r["source"] == "left" else "pqrstuv")


def test_resume_on_two_ranks_logs_and_reproduces_the_same_hashes(straight, corpus, capsys, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "poelm", "train",
           "--resume", str(straight / "step-00003"), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _hashes(out) == {s: h for s, h in _hashes(straight).items() if s > 3}  # world-size independent
    assert _records(out, "dist")[0]["world_size"] == 2
    rc, lines, _ = _batch(capsys, out, "--step", 4)  # no save at or before step 3 in this run dir: from row 0
    assert rc == 0 and lines[0]["hash"] == lines[0]["logged_hash"] == _hashes(straight)[4]
    full = {r["step_row"]: r for r in _batch(capsys, out / "step-00006", "--step", 5)[1][1:]}
    for rank in (0, 1):
        rc, lines, _ = _batch(capsys, out, "--step", 5, "--rank", rank)
        head, rows = lines[0], lines[1:]
        assert rc == 0 and head["world_size"] == 2 and head["rank"] == rank
        # 2 ranks x 2 rows per micro-step, 2 micro-steps: rank 1 took step rows 2, 3, 6, 7
        assert [r["step_row"] for r in rows] == batches.rank_rows(8, 2, 2, rank) == ([0, 1, 4, 5] if rank == 0 else [2, 3, 6, 7])
        assert all(r == full[r["step_row"]] for r in rows)


def test_a_run_on_shards_is_the_run_on_text(straight, corpus, tmp_path, capsys):
    cfg = config.load(str(corpus / "run.toml"))
    tok_dir = straight  # the run's tokenizer
    from poelm.data.tokenizer import Tokenizer

    pretokenize.tokenize(cfg.data, tmp_path / "shards", Tokenizer.load(tok_dir), workers=2)
    for s in cfg.data.sources:
        s.path = str(tmp_path / "shards" / s.name)
    out = _fresh(corpus, tmp_path / "on_shards")
    train.train(cfg, out, progress=False)
    assert _hashes(out) == _hashes(straight)
    assert [r["loss"] for r in _records(out, "train")] == [r["loss"] for r in _records(straight, "train")]
    assert _batch(capsys, out, "--step", 5)[1][0]["hash"] == _hashes(straight)[5]


def test_bad_steps_and_changed_data(straight, corpus, tmp_path, capsys):
    for step in (0, 7):
        rc, lines, err = _batch(capsys, straight, "--step", step)
        assert rc == 2 and lines == [] and err.startswith("error: ") and "did not train step" in err and len(err.splitlines()) == 1
    rc, _, err = _batch(capsys, straight, "--step", 2, "--rank", 1)
    assert rc == 2 and "ran on 1 rank" in err
    # the same run, its data changed since: one more document in a source
    data2 = tmp_path / "corpus2"
    shutil.copytree(corpus, data2)
    run2 = tmp_path / "run2"
    shutil.copytree(straight, run2)
    for c in run2.glob("step-*/config.json"):
        c.write_text(c.read_text().replace(str(corpus), str(data2)))
    rc, lines, _ = _batch(capsys, run2, "--step", 5)
    assert rc == 0 and lines[0]["hash"] == _hashes(straight)[5]  # moved, not changed
    with open(data2 / "left" / "part.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    rc, lines, err = _batch(capsys, run2, "--step", 5)
    assert rc == 2 and lines == [] and "changed since it trained" in err
    # a log whose hash does not match the data (same sizes, other bytes)
    shutil.rmtree(data2)
    shutil.copytree(corpus, data2)
    log = run2 / "log.jsonl"
    log.write_text(log.read_text().replace(_hashes(straight)[2], "0" * 32))
    rc, _, err = _batch(capsys, run2, "--step", 2, "--out", tmp_path / "b.jsonl")
    assert rc == 2 and "differs from the logged" in err and not (tmp_path / "b.jsonl").exists()
