"""poelm.data.corpus / poelm.mixture: readers, split, packing, exact resume, ranks, mixture, validation."""

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from poelm.data import corpus as data
from poelm.config import DataConfig, SourceConfig
from poelm.core.errors import DataError
from poelm.data.mixture import TrainLoader
from poelm.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def btok():
    """Bytes-only tokenizer: one token per byte, printable ASCII c -> id ord(c) - 29."""
    return train_tokenizer(["x"], 260)


def ids(s):
    return [ord(c) - 29 for c in s]


def write_jsonl(path, texts, gz=False):
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if gz:
        path.write_bytes(gzip.compress(body.encode()))
    else:
        path.write_text(body)
    return path


def train_docs(texts, frac):
    return [t for t in texts if not data.is_val(t, frac)]


# ----------------------------------------------------------------------------- readers
def test_embedded_corpus():
    docs = list(data.read_documents("embedded"))
    assert len(docs) == 3306
    assert docs[0].startswith("ABASEMENT, n. A decent and customary mental attitude")
    assert sum(len(d) for d in docs) == 1_628_076


def test_txt_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TXT_DOC_CHARS", 12)
    f = tmp_path / "a.txt"
    f.write_text("aaaa\nbb\n\n\n  \ncc\n\ndddddddddddddddd\n\nee\r\nff\n")
    # paragraphs "aaaa\nbb" (7), "cc" (2), "dddd...d" (16), "ee\nff" (5); grouped up to 12 chars
    assert list(data.read_documents(str(f))) == ["aaaa\nbb\n\ncc", "dddddddddddddddd", "ee\nff"]


def test_jsonl_parquet_dir_glob(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ["one", "  ", "two"])
    write_jsonl(tmp_path / "c.jsonl.gz", ["three"], gz=True)
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["four", None, "five"]}), tmp_path / "d.parquet", row_group_size=2)
    (tmp_path / "notes.md").write_text("ignored")
    assert data.unit_count(tmp_path / "d.parquet") == 2
    assert data.read_unit(tmp_path / "d.parquet", 1) == ["five"]
    assert list(data.read_documents(str(tmp_path))) == ["one", "two", "three", "four", "five"]
    assert list(data.read_documents(str(tmp_path / "*.jsonl*"))) == ["one", "two", "three"]


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*missing.txt"):
        list(data.read_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no documents in .*empty.txt"):
        list(data.read_documents(str(tmp_path / "empty.txt")))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="bin.txt looks binary"):
        list(data.read_documents(str(tmp_path / "bin.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8"):
        list(data.read_documents(str(tmp_path / "latin1.txt")))
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match="notext.jsonl line 2 has no 'text' field"):
        list(data.read_documents(str(tmp_path / "notext.jsonl")))
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="badjson.jsonl line 2 is not valid JSON"):
        list(data.read_documents(str(tmp_path / "badjson.jsonl")))
    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="nocol.parquet has no 'text' column \\(columns: content, url\\)"):
        list(data.read_documents(str(tmp_path / "nocol.parquet")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type x.csv"):
        list(data.read_documents(str(tmp_path / "x.csv")))
    with pytest.raises(DataError, match="glob matches no files"):
        list(data.read_documents(str(tmp_path / "*.nothing")))


# ----------------------------------------------------------------------------- split
def test_split_is_a_hash_of_the_text():
    h = int.from_bytes(hashlib.blake2b(b"hello", digest_size=8).digest(), "big")
    assert data.doc_hash("hello") == h
    assert data.is_val("hello", h / 2**64 + 1e-9) and not data.is_val("hello", h / 2**64 - 1e-9)
    docs = [f"document number {i}" for i in range(4000)]
    val = {d for d in docs if data.is_val(d, 0.1)}
    assert val == {d for d in reversed(docs) if data.is_val(d, 0.1)}  # order does not matter
    assert abs(len(val) / 4000 - 0.1) < 0.02  # binomial sd = 0.0047


# ----------------------------------------------------------------------------- packing
def test_packing_by_hand(tmp_path, btok):
    doc = "abcdefghij"
    assert not data.is_val(doc, 0.01)
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "one.jsonl", [doc])), val_fraction=0.01)
    loader = TrainLoader(cfg, btok, seq_len=4)
    x, y = loader.next_batch(5)
    a, b, c, d, e, f, g, h, i, j = ids(doc)
    rows = [[0, a, b, c, d], [0, e, f, g, h], [0, i, j, 0, a], [0, b, c, d, e], [0, f, g, h, i]]
    assert x.tolist() == [r[:-1] for r in rows] and y.tolist() == [r[1:] for r in rows]
    assert loader.state_dict()["sources"][0] == {"name": "data", "epoch": 1, "unit": 0, "doc": 0, "tok": 10, "rows": 5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = [f"doc {i}: " + "xyzw"[i % 4] * (3 + (i * 7) % 40) for i in range(120)]
    write_jsonl(root / "a.jsonl", texts[:40])
    write_jsonl(root / "b.jsonl.gz", texts[40:70], gz=True)
    pq.write_table(pa.table({"text": texts[70:]}), root / "c.parquet", row_group_size=16)
    return root, texts


def test_rows_start_with_bos_and_cover_the_train_split(corpus, btok):
    root, texts = corpus
    cfg = DataConfig(path=str(root), val_fraction=0.1)
    loader = TrainLoader(cfg, btok, seq_len=31)
    x, y = loader.next_batch(160)
    assert (x[:, 0] == 0).all() and torch.equal(x[:, 1:], y[:, :-1])
    # Split the stream at BOS; a piece not starting with "doc " is the continuation of the
    # previous document (a row that starts inside a document). Re-joined, the first epoch is
    # every training document exactly once, and no validation document.
    docs = []
    for row in torch.cat([x, y[:, -1:]], 1).tolist():
        for k, piece in enumerate(btok.decode(row).split("<|bos|>")[1:]):
            if k == 0 and docs and not piece.startswith("doc "):
                docs[-1] += piece
            else:
                docs.append(piece)
    epoch0 = train_docs(texts, 0.1)
    assert 100 < len(epoch0) < 120 and len(docs) > len(epoch0)
    assert sorted(docs[:len(epoch0)]) == sorted(epoch0)
    assert docs[:len(epoch0)] != epoch0  # shuffled


def test_exact_resume_across_epochs(corpus, btok):
    root, _ = corpus
    cfg = DataConfig(path=str(root), val_fraction=0.1)
    straight = TrainLoader(cfg, btok, seq_len=63, seed=7)
    want = [straight.next_batch(16) for _ in range(8)]
    assert straight.state_dict()["sources"][0]["epoch"] >= 1  # the run crosses an epoch
    first = TrainLoader(cfg, btok, seq_len=63, seed=7)
    got = [first.next_batch(16) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    second = TrainLoader(cfg, btok, seq_len=63, seed=7)
    second.load_state_dict(state)
    got += [second.next_batch(16) for _ in range(4)]
    for (wx, wy), (gx, gy) in zip(want, got):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    assert second.state_dict() == straight.state_dict()
    # a different seed gives a different order
    other = TrainLoader(cfg, btok, seq_len=63, seed=8)
    assert not torch.equal(other.next_batch(16)[0], want[0][0])


def test_rank_shares_and_resume_on_another_world_size(corpus, btok):
    root, _ = corpus
    cfg = DataConfig(path=str(root), val_fraction=0.1)
    one = TrainLoader(cfg, btok, seq_len=16)
    full = [one.next_batch(8) for _ in range(3)]
    ranks = [TrainLoader(cfg, btok, seq_len=16) for _ in range(4)]
    shares = [[r.next_batch(8, rank=k, world_size=4) for _ in range(3)] for k, r in enumerate(ranks)]
    for step in range(3):
        assert torch.equal(torch.cat([shares[k][step][0] for k in range(4)]), full[step][0])
        assert torch.equal(torch.cat([shares[k][step][1] for k in range(4)]), full[step][1])
    assert all(r.state_dict() == one.state_dict() for r in ranks)
    # two steps on 2 ranks, resume on 4 ranks: step 3 is the 1-rank step 3
    two = TrainLoader(cfg, btok, seq_len=16)
    for _ in range(2):
        two.next_batch(8, rank=1, world_size=2)
    resumed = []
    for k in range(4):
        r = TrainLoader(cfg, btok, seq_len=16)
        r.load_state_dict(two.state_dict())
        resumed.append(r.next_batch(8, rank=k, world_size=4)[0])
    assert torch.equal(torch.cat(resumed), full[2][0])
    with pytest.raises(DataError, match="does not split evenly"):
        one.next_batch(6, rank=0, world_size=4)


def test_mixture_proportions(tmp_path, btok):
    a = write_jsonl(tmp_path / "a.jsonl", [f"a{i} " + "a" * (i % 50) for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"b{i} " + "b" * (i % 50) for i in range(300)])
    # weights 0.6 : 0.2 are normalised by their sum 0.8 -> 0.75 : 0.25
    cfg = DataConfig(sources=[SourceConfig("A", str(a), 0.6), SourceConfig("B", str(b), 0.2)], val_fraction=0.05)
    assert [s.weight for s in data.resolve_sources(cfg)] == pytest.approx([0.75, 0.25], abs=1e-15)
    loader = TrainLoader(cfg, btok, seq_len=8, seed=3)
    x, _ = loader.next_batch(2000)
    p = loader.proportions()
    assert abs(p["A"] - 0.75) < 0.03 and abs(p["B"] - 0.25) < 0.03  # sd = 0.0097
    for i in range(2000):  # each row is pure: all of A's letters or all of B's
        letters = set(btok.decode(x[i].tolist()).replace("<|bos|>", "")) - set("0123456789 ")
        assert letters <= ({"a"} if loader.source_of(i) == 0 else {"b"})
    st = loader.state_dict()
    assert [s["rows"] for s in st["sources"]] == loader.counts and sum(loader.counts) == 2000
    missing = DataConfig(sources=[SourceConfig("A", str(a), 1.0), SourceConfig("web", str(tmp_path / "gone"), 1.0)])
    with pytest.raises(DataError, match="data source 'web' path not found: .*gone"):
        TrainLoader(missing, btok, seq_len=8)
    dup = DataConfig(sources=[SourceConfig("A", str(a), 1.0), SourceConfig("A", str(b), 1.0)])
    with pytest.raises(DataError, match="'A' is used twice"):
        data.resolve_sources(dup)


def test_state_mismatch_errors(corpus, btok, tmp_path):
    root, _ = corpus
    loader = TrainLoader(DataConfig(path=str(root), val_fraction=0.1), btok, seq_len=8)
    state = loader.state_dict()
    other = TrainLoader(DataConfig(path=str(root), val_fraction=0.2), btok, seq_len=8)
    with pytest.raises(DataError, match="different data"):
        other.load_state_dict(state)
    reseeded = TrainLoader(DataConfig(path=str(root), val_fraction=0.1), btok, seq_len=8, seed=5)
    with pytest.raises(DataError, match="saved with data seed 0 but this loader uses 5"):
        reseeded.load_state_dict(state)


def test_all_val_source_is_an_error(tmp_path, btok):
    f = write_jsonl(tmp_path / "v.jsonl", ["only doc"])
    frac = data.doc_hash("only doc") / 2**64 + 1e-6  # puts the one document in validation
    with pytest.raises(DataError, match="no training documents"):
        TrainLoader(DataConfig(path=str(f), val_fraction=frac), btok, seq_len=4).next_batch(1)


# ----------------------------------------------------------------------------- validation
def test_val_tokens_by_hand(tmp_path, btok):
    texts = [f"v{i}" for i in range(400)]
    f = write_jsonl(tmp_path / "v.jsonl", texts)
    cfg = DataConfig(path=str(f), val_fraction=0.1)
    val = [t for t in texts if data.is_val(t, 0.1)]
    expect = [tok for t in val for tok in [0] + ids(t)]
    got = data.val_tokens(cfg, btok, 25)
    assert got.dtype == torch.long and got.tolist() == expect[:25]
    assert torch.equal(data.val_tokens(cfg, btok, 25), got)
    with pytest.raises(DataError, match=f"validation split has only {len(expect)} tokens but 100000 were asked"):
        data.val_tokens(cfg, btok, 100000)


def _val_stream(texts, frac):
    return [tok for t in texts if data.is_val(t, frac) for tok in [0] + ids(t)]


def test_three_source_mixture_slices_hold_every_source_in_proportion(tmp_path, btok):
    texts = {name: [f"{i}" + name * (3 + i % 7) for i in range(400)] for name in "abc"}
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", t) for name, t in texts.items()}
    cfg = DataConfig(sources=[SourceConfig(n, str(files[n]), w) for n, w in zip("abc", (5, 3, 2))], val_fraction=0.2)
    meas, calib = data.val_slices(cfg, btok, [600, 300])
    streams = {n: _val_stream(t, 0.2) for n, t in texts.items()}
    # by hand: each source gives the measurement slice its first w*600 tokens and the calibration
    # slice the next w*300, concatenated in source order
    want_m = streams["a"][:300] + streams["b"][:180] + streams["c"][:120]
    want_c = streams["a"][300:450] + streams["b"][180:270] + streams["c"][120:180]
    assert meas.tolist() == want_m and calib.tolist() == want_c
    for sl, n in ((meas, 600), (calib, 300)):  # every source in both, in proportion to its weight
        letters = [chr(t + 29) for t in sl.tolist() if t >= ord("a") - 29]
        got = {c: letters.count(c) for c in "abc"}
        total = sum(got.values())
        for c, w in zip("abc", (0.5, 0.3, 0.2)):
            assert abs(got[c] / total - w) < 0.05, (n, got)
    assert torch.equal(data.val_tokens(cfg, btok, 600), meas)  # the training evaluation's slice is the same


def test_measurement_slice_does_not_depend_on_the_calibration_size(tmp_path, btok):
    texts = [f"doc {i} " + "xyz" * (i % 9) for i in range(600)]
    f = write_jsonl(tmp_path / "one.jsonl", texts)
    mix = DataConfig(sources=[SourceConfig("one", str(f), 1.0), SourceConfig("two", str(write_jsonl(tmp_path / "two.jsonl", texts[::-1])), 1.0)],
                     val_fraction=0.3)
    single = DataConfig(path=str(f), val_fraction=0.3)
    for cfg in (single, mix):
        ref = data.val_slices(cfg, btok, [500])[0]
        for calib in (1, 50, 400):
            meas, cal = data.val_slices(cfg, btok, [500, calib])
            assert torch.equal(meas, ref) and cal.numel() == calib
    have = len(_val_stream(texts, 0.3))
    short = [data.val_slices(single, btok, [have - 10, c], allow_fewer=True) for c in (20, 200, 2000)]
    assert all(torch.equal(m, short[0][0]) for m, _ in short)  # fitted into a short split: still the same
    assert short[0][0].numel() == int(have * data.MEAS_SHARE)
    left = have - short[0][0].numel()
    assert left > 200 and [c.numel() for _, c in short] == [20, 200, left]
    assert data.slice_sizes(100, [50, 20]) == [50, 20] and data.slice_sizes(100, [95, 3]) == [88, 3]
    assert data.slice_sizes(100, [95, 0]) == [95, 0] and data.slice_sizes(100, [200]) == [100]


def test_val_batches_cover_every_target_once():
    tokens = torch.arange(11)
    batches = list(data.val_batches(tokens, batch_size=2, seq_len=4))
    assert [x.tolist() for x, _ in batches] == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9]]]
    assert [y.tolist() for _, y in batches] == [[[1, 2, 3, 4], [5, 6, 7, 8]], [[9, 10]]]
    exact = list(data.val_batches(torch.arange(9), 4, 4))  # (9 - 1) % 4 == 0: no short tail
    assert len(exact) == 1 and exact[0][1].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_fingerprint_and_tokenizer_texts(tmp_path):
    d1 = tmp_path / "one"
    d1.mkdir()
    write_jsonl(d1 / "a.jsonl", ["alpha " * 10, "beta " * 10, "gamma " * 10])
    cfg = DataConfig(path=str(d1), val_fraction=0.05)
    fp = data.data_fingerprint(cfg)
    moved = d1.rename(tmp_path / "two")
    assert data.data_fingerprint(DataConfig(path=str(moved), val_fraction=0.05)) == fp
    assert data.data_fingerprint(DataConfig(path=str(moved), val_fraction=0.1)) != fp
    write_jsonl(moved / "b.jsonl", ["delta"])
    assert data.data_fingerprint(DataConfig(path=str(moved), val_fraction=0.05)) != fp
    a = SourceConfig("a", str(moved / "a.jsonl"), 1.0)
    b = SourceConfig("b", str(moved / "b.jsonl"), 1.0)
    mix = data.data_fingerprint(DataConfig(sources=[a, b]))
    assert data.data_fingerprint(DataConfig(sources=[a, SourceConfig("b", b.path, 3.0)])) != mix
    assert data.data_fingerprint(DataConfig(sources=[SourceConfig("a", a.path, 2.0), SourceConfig("b", b.path, 2.0)])) == mix
    train = train_docs(list(data.read_documents(a.path)), 0.05)
    got = list(data.tokenizer_texts(DataConfig(path=a.path, val_fraction=0.05), max_chars=75))
    assert sum(map(len, got)) == min(75, sum(map(len, train)))
    assert all(t in train[i] for i, t in enumerate(got))
