"""poelm average: the fp32 mean of saves of one run, as a folder or branch avg-XXXXX-N (provenance
in its manifest, checked by verify); bad inputs are one error line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poelm import cli, targets
from poelm.core.errors import CheckpointError
from poelm.train import checkpoint
from poelm.trajectory import average as A
from poelm.trajectory import publish as P
from poelm.trajectory import verify
from poelm.trajectory.gitrepo import GitRepo
from test_export import make_ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    out = {}
    for i, step in enumerate((100, 200, 300)):
        make_ckpt(root / "run" / f"step-{step:05d}", step=step, tokens=1000 * (i + 1), seed=i)
        out[step] = root / "run" / f"step-{step:05d}"
    return out


@pytest.fixture(scope="module")
def repo(ckpts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("avgrepo") / "repo"
    for s in (100, 200, 300):
        P.publish(ckpts[s], repo)
    return repo


def weights(folder: Path) -> dict:
    return {k[len("model."):]: v for k, v in load_file(str(folder / "model.safetensors")).items()}


def test_average_of_one_save_is_that_save_bitwise(ckpts, tmp_path):
    src = load_file(str(ckpts[200] / "model.safetensors"))
    out = A.average([ckpts[200]], tmp_path / "one")
    got = weights(out)
    assert set(got) == set(src)
    assert all(got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]) for k in src)
    man = json.loads((out / P.MANIFEST).read_text())
    assert man["kind"] == "average" and man["average"]["n"] == 1 and man["average"]["accumulate"] == "fp32"
    assert json.loads((out / "config.json").read_text())["step"] == 200


def test_average_of_two_saves_is_the_elementwise_mean(ckpts, tmp_path):
    a, b = load_file(str(ckpts[100] / "model.safetensors")), load_file(str(ckpts[300] / "model.safetensors"))
    out = A.average([ckpts[300], ckpts[100]], tmp_path / "two")  # any order: sorted by step
    got = weights(out)
    for k in a:
        assert torch.equal(got[k], (a[k].float() + b[k].float()) / 2), k
    assert not torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    cfg, man = json.loads((out / "config.json").read_text()), json.loads((out / P.MANIFEST).read_text())
    assert (cfg["step"], cfg["tokens"], cfg["poe_wand_p99_bounds_per_stage_head"]) == (300, 3000, None)  # the newest save's place
    assert [s["step"] for s in man["average"]["sources"]] == [100, 300]
    # the result loads like any save
    model, _, meta = checkpoint.load_model(out)
    assert meta["step"] == 300 and torch.equal(model.state_dict()["lm_head.weight"], got["lm_head.weight"])


def test_mean_state_accumulates_in_fp32():
    x = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    y = torch.tensor([1.0078125, 3.0], dtype=torch.bfloat16)
    got = A.mean_state(iter([{"w": x}, {"w": y}]))["w"]
    assert got.dtype == torch.float32 and got.tolist() == [1.00390625, 2.5]  # 1.00390625 is not a bf16 value


def test_published_average_branch_provenance_and_verify(ckpts, repo, capsys):
    refs = GitRepo(repo).refs()
    rc = cli.main(["average", f"{repo}@step-00300", "--last", "2", "--publish", str(repo)])
    assert rc == 0
    assert f"{repo}@avg-00300-2" in capsys.readouterr().out
    new = GitRepo(repo).refs()
    assert set(new) - set(refs) == {"avg-00300-2"} and new["main"] == refs["main"]
    man = P.read_json(GitRepo(repo), "avg-00300-2", P.MANIFEST)
    srcs = man["average"]["sources"]
    assert man["kind"] == "average" and man["step"] == 300
    assert [(s["branch"], s["commit"]) for s in srcs] == [("step-00200", refs["step-00200"]), ("step-00300", refs["step-00300"])]
    assert verify.verify(repo) == []
    rows = [r for r in P.list_branches(repo, cooldowns=True) if r.get("kind") == "average"]
    assert [(r["branch"], r["source_step"], r["steps"]) for r in rows] == [("avg-00300-2", 300, 2)]
    t = targets.resolve(f"{repo}@avg-00300-2")  # a TARGET like any branch
    expect = A.mean_state(iter([load_file(str(ckpts[s] / "model.safetensors")) for s in (200, 300)]))
    assert all(torch.equal(weights(t.path)[k], v) for k, v in expect.items())
    # a tampered manifest (wrong N) is caught
    g = GitRepo(repo)
    bad = dict(man, average={**man["average"], "n": 3})
    g.write_files("avg-00300-2", {P.MANIFEST: json.dumps(bad).encode()}, new["avg-00300-2"], False, "tamper")
    assert any("avg-00300-2: manifest records an average" in p for p in verify.verify(repo))


def _refuses(argv, capsys, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    return err[0]


def test_bad_inputs_one_line_nothing_written(ckpts, tmp_path, capsys):
    repo = tmp_path / "repo"
    for s in (100, 200):
        P.publish(ckpts[s], repo)
    refs = GitRepo(repo).refs()
    # another architecture (a K=1 model of the same trunk)
    other = tmp_path / "k1" / "step-00300"
    shutil.copytree(ckpts[300], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["stage_layers"] = [3]
    (other / "config.json").write_text(json.dumps(cfg))
    checkpoint.write_manifest(other)
    _refuses(["average", str(ckpts[100]), str(other), "--out", str(tmp_path / "o1")], capsys, "different architectures (model.stage_layers")
    # another tokenizer
    from poelm.data.tokenizer import train_tokenizer

    tok = tmp_path / "tok" / "step-00300"
    shutil.copytree(ckpts[300], tok)
    train_tokenizer(["completely different words here"] * 40 + ["zebra quartz vexing jumps"] * 40, 300).save(tok)
    checkpoint.write_manifest(tok)
    _refuses(["average", str(ckpts[100]), str(tok), "--out", str(tmp_path / "o2")], capsys, "different tokenizers")
    # a missing TARGET, the same step twice, too few saves for --last, one save to publish, no destination
    _refuses(["average", str(ckpts[100]), str(tmp_path / "nope"), "--out", str(tmp_path / "o3")], capsys, "not found")
    _refuses(["average", str(ckpts[100]), f"{repo}@step-00100", "--out", str(tmp_path / "o4")], capsys, "step 100 is given twice")
    _refuses(["average", f"{repo}@step-00200", "--last", "3", "--publish", str(repo)], capsys, "fewer than --last 3")
    _refuses(["average", f"{repo}@step-00200", "--publish", str(repo)], capsys, "two or more saves")
    _refuses(["average", str(ckpts[100]), str(ckpts[200])], capsys, "--publish REPO")
    # a save the repo does not hold
    _refuses(["average", str(ckpts[200]), str(ckpts[300]), "--publish", str(repo)], capsys, "has no branch step-00300")
    assert GitRepo(repo).refs() == refs
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    with pytest.raises(CheckpointError, match="nothing to average"):
        A.check_same_run([])


def test_measured_average_rides_on_its_save_in_the_records(ckpts, tmp_path):
    from poelm.measure import run as measure

    repo = tmp_path / "repo"
    for s in (200, 300):
        P.publish(ckpts[s], repo)
    branch = A.publish_average([ckpts[200], ckpts[300]], repo)
    kw = dict(split_tokens=256, calib_tokens=64, probe_set=None, progress=False, samples=50)
    measure.measure_target(f"{repo}@step-00300", **kw)
    rec = measure.measure_target(f"{repo}@{branch}", against=f"{repo}@step-00200", **kw)
    assert rec["branch"] == "avg-00300-2" and rec["step"] == 300
    man = P.read_json(GitRepo(repo), branch, P.MANIFEST)
    assert man["kind"] == "average" and man["average"]["n"] == 2  # the measurement commit keeps the provenance
    (r300,) = P.read_records(repo)
    assert [a["branch"] for a in r300["averages"]] == ["avg-00300-2"]
    assert r300["averages"][0]["bpb"]["full"]["value"] == rec["bpb"]["full"]["value"]
    assert verify.verify(repo) == []
