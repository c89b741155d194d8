"""poelm.data.shards / pretokenize / prefetch: shards give the text loader's rows exactly,
tokenising resumes after a kill, and prefetching keeps the loader state exact."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from poelm.cli import main
from poelm.config import DataConfig, SourceConfig
from poelm.core.errors import DataError
from poelm.data import corpus, pretokenize, shards
from poelm.data.mixture import TrainLoader
from poelm.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    words = [f"w{i} alpha beta gamma {i * 7}" for i in range(200)]
    return train_tokenizer(words, 300)


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory):
    """Every reader: jsonl, jsonl.gz, parquet in row groups (one empty row, one None), txt."""
    import gzip

    root = tmp_path_factory.mktemp("text")
    docs = [f"doc {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][i % 4] for _ in range(2 + (i * 7) % 30)) for i in range(260)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[60:100]).encode()))
    pq.write_table(pa.table({"text": docs[100:200] + ["  ", None]}), root / "c.parquet", row_group_size=16)
    (root / "d.txt").write_text("\n\n".join(docs[200:]))
    return root


@pytest.fixture(scope="module")
def shard_dir(texts_dir, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    pretokenize.tokenize(DataConfig(path=str(texts_dir), val_fraction=0.1), out, tok, workers=2)
    return out


def _batches(loader, n, rows, **kw):
    return [loader.next_batch(rows, **kw) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b)) and len(a) == len(b)


def test_index_and_dtype(shard_dir, texts_dir, tok):
    idx = json.loads((shard_dir / "index.json").read_text())
    assert idx["dtype"] == "uint16" and idx["tokenizer_fingerprint"] == tok.fingerprint and idx["name"] == "data"
    assert [s["file"] for s in idx["shards"]] == ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt"]
    assert [s["units"] for s in idx["shards"]] == [1, 1, 7, 1]  # 102 parquet rows in groups of 16
    assert idx["docs"] == 100 + 100 + 1  # the blank and None parquet rows are skipped; d.txt is one document (<8192 chars)
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    text_cfg, shard_cfg = DataConfig(path=str(texts_dir), val_fraction=0.1), DataConfig(path=str(shard_dir), val_fraction=0.1)
    assert corpus.data_fingerprint(text_cfg) == corpus.data_fingerprint(shard_cfg)  # the same data


@pytest.mark.parametrize("frac", [0.1, 0.3])
def test_shards_give_the_text_rows(shard_dir, texts_dir, tok, frac):
    text_cfg, shard_cfg = DataConfig(path=str(texts_dir), val_fraction=frac), DataConfig(path=str(shard_dir), val_fraction=frac)
    a = TrainLoader(text_cfg, tok, seq_len=47, seed=3, prefetch=False)
    b = TrainLoader(shard_cfg, tok, seq_len=47, seed=3, prefetch=False)
    want = _batches(a, 12, 24)
    assert a.state_dict()["sources"][0]["epoch"] >= 1  # across an epoch boundary
    assert _same(want, _batches(b, 12, 24)) and a.state_dict() == b.state_dict()
    # rank shares from shards, and a text run resumed on shards (and the reverse)
    r1 = TrainLoader(shard_cfg, tok, seq_len=47, seed=3, prefetch=False)
    _batches(r1, 6, 24, rank=1, world_size=3)
    half = TrainLoader(text_cfg, tok, seq_len=47, seed=3, prefetch=False)
    _batches(half, 6, 24)
    on_shards = TrainLoader(shard_cfg, tok, seq_len=47, seed=3, prefetch=False)
    on_shards.load_state_dict(json.loads(json.dumps(half.state_dict())))
    shares = [TrainLoader(shard_cfg, tok, seq_len=47, seed=3, prefetch=False) for _ in range(3)]
    for k, s in enumerate(shares):
        s.load_state_dict(r1.state_dict())
    for step in range(6, 12):
        assert torch.equal(on_shards.next_batch(24)[0], want[step][0])
        got = torch.cat([s.next_batch(24, rank=k, world_size=3)[0] for k, s in enumerate(shares)])
        assert torch.equal(got, want[step][0])
    # validation split and tokenizer texts
    assert torch.equal(corpus.val_tokens(text_cfg, tok, 300, allow_fewer=True), corpus.val_tokens(shard_cfg, tok, 300, allow_fewer=True))
    assert list(corpus.tokenizer_texts(text_cfg, 5000)) == list(corpus.tokenizer_texts(shard_cfg, 5000))


def test_mixture_config_and_cli(texts_dir, tok, tmp_path, capsys):
    tok.save(tmp_path)
    cfg = tmp_path / "mix.toml"
    cfg.write_text(f'[data]\nval_fraction = 0.1\nmixture_seed = 5\n[[data.sources]]\nname = "js"\npath = "{texts_dir}/*.jsonl*"\nweight = 3\n'
                   f'[[data.sources]]\nname = "pq"\npath = "{texts_dir}/c.parquet"\nweight = 1\n')
    out = tmp_path / "mix"
    assert main(["tokenize", str(cfg), str(out), "--tokenizer", str(tmp_path), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert f'path = "{out.resolve() / "js"}"' in printed and (out / "pq" / "index.json").is_file()
    assert (out / "tokenizer.json").read_text() == (out / "js" / "tokenizer.json").read_text() == tok.to_json()
    text = DataConfig(sources=[SourceConfig("js", f"{texts_dir}/*.jsonl*", 3), SourceConfig("pq", f"{texts_dir}/c.parquet", 1)],
                      val_fraction=0.1, mixture_seed=5)
    sh = DataConfig(sources=[SourceConfig("js", str(out / "js"), 3), SourceConfig("pq", str(out / "pq"), 1)], val_fraction=0.1, mixture_seed=5)
    a, b = TrainLoader(text, tok, seq_len=31), TrainLoader(sh, tok, seq_len=31)
    assert _same(_batches(a, 5, 16), _batches(b, 5, 16)) and a.state_dict() == b.state_dict()
    # bad input: one line, exit 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert main(["tokenize", str(texts_dir), str(tmp_path / "busy")]) == 2
    assert main(["tokenize", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert main(["tokenize", str(texts_dir), str(tmp_path / "o"), "--tokenizer", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "not a shard folder" in err[0] and "not found" in err[1] and "tokenizer file not found" in err[2]
    assert not (tmp_path / "o").exists()


def test_resume_after_a_kill(texts_dir, tok, shard_dir, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(texts_dir), val_fraction=0.1)
    out = tmp_path / "s"
    real = shards.write_shard
    written = []

    def dies_on_parquet(final, units, *a):
        if final.name >= "shard-00002":
            next(iter(units))
            raise KeyboardInterrupt  # killed while writing the third shard
        written.append(final.name)
        return real(final, units, *a)

    monkeypatch.setattr(shards, "write_shard", dies_on_parquet)
    with pytest.raises(KeyboardInterrupt):
        pretokenize.tokenize(cfg, out, tok, workers=1)
    assert not (out / "index.json").exists() and not (out / "shard-00002").exists()
    with pytest.raises(DataError, match="incomplete shard folder"):
        TrainLoader(DataConfig(path=str(out)), tok, seq_len=8)
    monkeypatch.setattr(shards, "write_shard", lambda final, *a: (written.append(final.name), real(final, *a))[1])
    written.clear()
    pretokenize.tokenize(cfg, out, tok, workers=1)
    assert written == ["shard-00002", "shard-00003"]  # the complete shards were kept
    for f in ("index.json", "shard-00002/tokens.bin", "shard-00000/docs.npy", "shard-00003/hashes.npy"):
        assert (out / f).read_bytes() == (shard_dir / f).read_bytes(), f
    assert not list(out.glob(".*.tmp"))
    # a different tokenizer is refused by the loader
    other = train_tokenizer(["zzz yyy"], 270)
    with pytest.raises(DataError, match="another tokenizer"):
        TrainLoader(DataConfig(path=str(out)), other, seq_len=8)


def test_prefetch_keeps_the_state_exact(shard_dir, texts_dir, tok):
    for path in (texts_dir, shard_dir):
        cfg = DataConfig(path=str(path), val_fraction=0.1)
        straight = TrainLoader(cfg, tok, seq_len=63, seed=7, prefetch=False)
        want = _batches(straight, 8, 16)
        first = TrainLoader(cfg, tok, seq_len=63, seed=7, prefetch=True)
        got = _batches(first, 4, 16)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["rows"] == 64 and first._job is not None  # the fifth batch is being prepared
        twin = copy.deepcopy(first)  # the cooldown probe's copy: at the handed-out position
        second = TrainLoader(cfg, tok, seq_len=63, seed=7, prefetch=True)
        second.load_state_dict(state)
        got += _batches(second, 4, 16)
        assert _same(want, got) and second.state_dict() == straight.state_dict()
        second.close()
        assert second._job is None and torch.equal(second.next_batch(16)[0], straight.next_batch(16)[0])
        assert torch.equal(twin.next_batch(16)[0], want[4][0]) and torch.equal(first.next_batch(16)[0], want[4][0])
        # other arguments than the prepared batch's: rewind, same rows
        mixed = TrainLoader(cfg, tok, seq_len=63, seed=7, prefetch=True)
        parts = [mixed.next_batch(16), mixed.next_batch(8), mixed.next_batch(8)]
        assert torch.equal(torch.cat([p[0] for p in parts[1:]]), want[1][0]) and mixed.rows == 32


def test_batch_hash_is_per_row(texts_dir, tok):
    cfg = DataConfig(path=str(texts_dir), val_fraction=0.1)
    one = TrainLoader(cfg, tok, seq_len=15)
    one.next_batch(12)
    h = one.batch_hash()
    two = TrainLoader(cfg, tok, seq_len=15)
    for _ in range(3):  # another cut into micro-batches (accumulation), rank 0 of 2
        two.next_batch(4, rank=0, world_size=2)
    assert two.batch_hash() == h and one.batch_hash() is None
    r1 = TrainLoader(cfg, tok, seq_len=15)
    r1.next_batch(12, rank=1, world_size=2)
    assert r1.batch_hash() is None  # only the logging rank hashes
    ids, src, h2 = TrainLoader(cfg, tok, seq_len=15).take(12)
    assert h2 == h and ids.shape == (12, 16) and src == [0] * 12


def test_a_text_corpus_is_not_taken_for_shards(tmp_path):
    (tmp_path / "index.json").write_text('{"files": []}')
    (tmp_path / "shard-0001.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "shard-0002").mkdir()
    assert not shards.is_shard_dir(tmp_path)
    assert [s.name for s in corpus.resolve_sources(DataConfig(path=str(tmp_path)))] == ["data"]
    assert list(corpus.read_documents(str(tmp_path))) == ["hello"]


def test_a_changed_source_file_is_tokenised_again(texts_dir, tok, tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "text"
    shutil.copytree(texts_dir, src)
    cfg = DataConfig(path=str(src), val_fraction=0.1)
    pretokenize.tokenize(cfg, tmp_path / "s", tok)
    with open(src / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "a new document"}) + "\n")
    real, written = shards.write_shard, []
    monkeypatch.setattr(shards, "write_shard", lambda final, *a: (written.append(final.name), real(final, *a))[1])
    idx = pretokenize.tokenize(cfg, tmp_path / "s", tok)[0]
    assert written == ["shard-00000"] and idx["docs"] == 202
    assert corpus.data_fingerprint(cfg) == corpus.data_fingerprint(DataConfig(path=str(tmp_path / "s"), val_fraction=0.1))
