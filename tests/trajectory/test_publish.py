"""Trajectory publishing: step branches in a local git repo (and the Hub path against a fake API),
all-or-nothing writes, main never moving backwards, verify catching swapped/duplicated weights."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from poelm import cli
from poelm.trajectory import publish as P
from poelm.trajectory import verify
from poelm import targets
from poelm.core.errors import PoelmError, PublishError
from poelm.trajectory.gitrepo import GitRepo
from test_export import make_ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints at steps 100, 200, 300 (tokens increasing), each with its own weights."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, step in enumerate((100, 200, 300)):
        make_ckpt(root / f"step-{step:05d}", step=step, tokens=1000 * (i + 1), seed=i)
        out[step] = root / f"step-{step:05d}"
    return out


def git(repo, *args) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, check=True, text=True).stdout.strip()


def tree_hash(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def trajectory(ckpts, tmp_path_factory):
    """100 and 300 published, then 200 (out of order): main must stay at 300."""
    repo = tmp_path_factory.mktemp("traj") / "repo"
    before = {s: tree_hash(d) for s, d in ckpts.items()}
    branches = [P.publish(ckpts[s], repo) for s in (100, 300, 200)]
    assert {s: tree_hash(d) for s, d in ckpts.items()} == before  # checkpoints only read
    return repo, branches


def test_trajectory_branches_and_main(trajectory):
    repo, branches = trajectory
    assert branches == ["step-00100", "step-00300", "step-00200"]
    refs = GitRepo(repo).refs()
    assert set(refs) == {"main", "step-00100", "step-00200", "step-00300"}
    assert refs["main"] == refs["step-00300"]  # never moved back to 200
    rows = P.list_branches(repo)
    assert [(r["branch"], r["step"], r["tokens"], r["lrm"], r["phase"], r["main"]) for r in rows] == [
        ("step-00100", 100, 1000, 0.5, "b2", False), ("step-00200", 200, 2000, 0.5, "b2", False),
        ("step-00300", 300, 3000, 0.5, "b2", True)]
    # each branch is the child of the previous step: `git log step-00300` reads the trajectory
    assert git(repo, "rev-parse", "step-00200^") == refs["step-00100"]
    assert verify.verify(repo) == []


def test_branch_loadable_at_its_revision(trajectory, ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    from poelm.train.checkpoint import load_model

    repo, _ = trajectory
    out = P.checkout(repo, "step-00200", tmp_path / "s200")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hf.config.step == 200 and hf.config.tokens == 2000
    ref, _, _ = load_model(ckpts[200])
    sd = hf.model.state_dict()
    assert all((sd[k] == v).all() for k, v in ref.state_dict().items())
    # main materialises the newest step
    main = P.checkout(repo, "main", tmp_path / "main")
    assert json.loads((main / "config.json").read_text())["step"] == 300


def test_republish_refused_without_force(trajectory, ckpts):
    repo, _ = trajectory
    refs = GitRepo(repo).refs()
    with pytest.raises(PublishError, match="already exists.*--force"):
        P.publish(ckpts[200], repo)
    assert GitRepo(repo).refs() == refs


def test_force_republish_keeps_history_and_main(ckpts, tmp_path):
    repo = tmp_path / "repo"
    P.publish(ckpts[100], repo)
    old = GitRepo(repo).refs()["step-00100"]
    assert P.publish(ckpts[100], repo, force=True) == "step-00100"
    refs = GitRepo(repo).refs()
    assert refs["step-00100"] != old and git(repo, "rev-parse", "step-00100^") == old
    assert refs["main"] == refs["step-00100"]


@pytest.mark.parametrize("stage", ["hash_files", "mktree", "commit", "update_refs"])
def test_failed_publish_leaves_repo_as_before(trajectory, ckpts, tmp_path, monkeypatch, stage):
    repo = tmp_path / "repo"
    P.publish(ckpts[100], repo)
    refs = GitRepo(repo).refs()

    def boom(*a, **k):
        raise OSError(f"simulated failure in {stage}")

    monkeypatch.setattr(GitRepo, stage, boom)
    with pytest.raises(PublishError, match="simulated failure.*repository is unchanged"):
        P.publish(ckpts[200], repo)
    assert GitRepo(repo).refs() == refs


def test_ref_transaction_is_all_or_nothing(ckpts, tmp_path, monkeypatch):
    """A concurrent writer moved main: git refuses the whole transaction, the branch included."""
    repo = tmp_path / "repo"
    P.publish(ckpts[100], repo)
    real = GitRepo.refs
    monkeypatch.setattr(GitRepo, "refs", lambda self: {**real(self), "main": "1" * 40})
    with pytest.raises(PublishError, match="updating branches"):
        P.publish(ckpts[200], repo)
    monkeypatch.undo()
    assert set(GitRepo(repo).refs()) == {"main", "step-00100"}


def test_killed_publish_leaves_no_branch(ckpts, tmp_path):
    repo = tmp_path / "repo"
    P.publish(ckpts[100], repo)
    refs = GitRepo(repo).refs()
    marker = tmp_path / "objects-written"
    code = f"""
import time, pathlib
from poelm.trajectory import publish
from poelm.trajectory import gitrepo
real = gitrepo.GitRepo.commit
def slow(self, *a, **k):
    out = real(self, *a, **k)
    pathlib.Path({str(marker)!r}).write_text(out)
    time.sleep(60)
    return out
gitrepo.GitRepo.commit = slow
publish.publish({str(ckpts[200])!r}, {str(repo)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the publish never reached its commit"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert GitRepo(repo).refs() == refs  # the commit object exists, no ref points at it
    assert P.publish(ckpts[200], repo) == "step-00200"  # and the next attempt succeeds


def _swap_blobs(repo: Path, a: str, b: str, name: str, extra: dict | None = None):
    """Rewrite branches a and b with their ``name`` files exchanged (what a buggy uploader does)."""
    g = GitRepo(repo)
    ta, tb = g.tree(a), g.tree(b)
    ta[name], tb[name] = tb[name], ta[name]
    for br, t in ((a, ta), (b, tb)):
        for fname, data in (extra or {}).get(br, {}).items():
            t[fname] = g.hash_bytes(data)
        old = g.refs()[br]
        g.update_refs([(br, g.commit(g.mktree(t), [old], "swap"), old)])


def test_verify_flags_swapped_weights(ckpts, tmp_path, capsys):
    repo = tmp_path / "repo"
    for s in (100, 200):
        P.publish(ckpts[s], repo)
    _swap_blobs(repo, "step-00100", "step-00200", "model.safetensors")
    problems = verify.verify(repo)
    assert "step-00100: model.safetensors does not match its manifest (sha256/size): corrupted or replaced" in problems
    assert "step-00100: model.safetensors holds the weights of step 200" in problems
    assert "step-00200: model.safetensors holds the weights of step 100" in problems
    assert cli.main(["verify", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "problem: step-00200: model.safetensors holds the weights of step 100" in err


def test_verify_flags_swap_even_with_regenerated_manifests(ckpts, tmp_path):
    repo = tmp_path / "repo"
    for s in (100, 200):
        P.publish(ckpts[s], repo)
    g = GitRepo(repo)
    mans = {b: json.loads(g.read(b, "poelm_manifest.json")) for b in ("step-00100", "step-00200")}
    w = {b: mans[b]["files"]["model.safetensors"] for b in mans}
    mans["step-00100"]["files"]["model.safetensors"], mans["step-00200"]["files"]["model.safetensors"] = w["step-00200"], w["step-00100"]
    _swap_blobs(repo, "step-00100", "step-00200", "model.safetensors",
                extra={b: {"poelm_manifest.json": json.dumps(m).encode()} for b, m in mans.items()})
    problems = verify.verify(repo)
    assert not any("does not match its manifest" in p for p in problems)
    assert "step-00100: model.safetensors holds the weights of step 200" in problems


def test_verify_flags_duplicate_weights_tokens_and_main(ckpts, tmp_path):
    repo = tmp_path / "repo"
    for s in (100, 200):
        P.publish(ckpts[s], repo)
    g = GitRepo(repo)
    t100, t200 = g.tree("step-00100"), g.tree("step-00200")
    man = json.loads(g.read("step-00200", "poelm_manifest.json"))
    man["files"]["model.safetensors"] = json.loads(g.read("step-00100", "poelm_manifest.json"))["files"]["model.safetensors"]
    man["tokens"] = 500  # and the token count went backwards
    t200["model.safetensors"] = t100["model.safetensors"]
    t200["poelm_manifest.json"] = g.hash_bytes(json.dumps(man).encode())
    old = g.refs()["step-00200"]
    new = g.commit(g.mktree(t200), [old], "dup")
    g.update_refs([("step-00200", new, old), ("main", g.refs()["step-00100"], old)])  # main moved backwards
    problems = verify.verify(repo)
    assert "step-00200: holds the same weights as step-00100" in problems
    assert "step-00200: tokens 500 do not increase over step-00100 (1000)" in problems
    assert "main: holds step 100, not the newest step 200" in problems


@pytest.mark.parametrize("bad", ["step-1", "step-0100", "step-00100/x", "../step-00100", "step-00100 ", "main;rm -rf /",
                                 "$(touch x)", "feature", "step-00100..main", "", "step-00100\n"])
def test_bad_branch_names_rejected(trajectory, tmp_path, bad):
    repo, _ = trajectory
    with pytest.raises(PublishError, match="invalid branch"):
        P.checkout(repo, bad, tmp_path / "x")
    with pytest.raises(PoelmError, match="invalid (branch|revision)|empty|nothing before"):
        targets.resolve(f"{repo}@{bad}")
    with pytest.raises(PublishError, match="invalid branch"):
        P.update_branch_files(repo, bad, {"README.md": b"x"})
    assert not (tmp_path / "x").exists()


def test_missing_revision_and_names(trajectory, tmp_path):
    repo, _ = trajectory
    assert targets.repository(f"{repo}@step-00200") == (str(repo), "step-00200")
    assert targets.repository(str(repo)) == (str(repo), None)
    with pytest.raises(PoelmError, match="no branch step-00400"):
        targets.repository(f"{repo}@step-00400")
    with pytest.raises(PublishError, match="no branch step-00400"):
        P.checkout(repo, "step-00400", tmp_path / "x")
    with pytest.raises(PublishError, match="main"):
        P.check_branch("main", allow_main=False)
    for name in ("../x", "a/b", "poelm_manifest.json", ".git"):
        with pytest.raises(PublishError, match="invalid file name"):
            P.update_branch_files(repo, "step-00200", {name: b"x"})
    with pytest.raises(PublishError, match="not a git repository"):
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "f").write_text("x")
        P.list_branches(tmp_path / "plain")
    assert P.branch_name(7) == "step-00007" and P.branch_name(123456) == "step-123456"


def test_update_branch_files_and_records(ckpts, tmp_path):
    repo = tmp_path / "repo"
    for s in (100, 200):
        P.publish(ckpts[s], repo)
    rec = {"step": 200, "bpb": {"full": {"value": 1.25, "ci": [1.2, 1.3]}}}
    cfg = json.loads(GitRepo(repo).read("step-00200", "config.json"))
    cfg["poe_wand_p99_bounds_per_stage_head"] = [0.75, 0.5]
    P.update_branch_files(repo, "step-00200", {"poelm_measure.json": json.dumps(rec).encode(),
                                               "config.json": json.dumps(cfg).encode()})
    P.update_branch_files(repo, "step-00100", {"poelm_measure.json": json.dumps({**rec, "step": 100}).encode()})
    refs = GitRepo(repo).refs()
    assert refs["main"] == refs["step-00200"]  # main followed its branch
    assert [r["step"] for r in P.read_records(repo)] == [100, 200]
    assert [r["bpb"] for r in P.list_branches(repo)] == [1.25, 1.25]
    assert verify.verify(repo) == []  # the manifest was refreshed
    out = P.checkout(repo, "main", tmp_path / "main")
    assert json.loads((out / "config.json").read_text())["poe_wand_p99_bounds_per_stage_head"] == [0.75, 0.5]


def test_publisher_background_and_failures(ckpts, tmp_path, caplog):
    repo = tmp_path / "repo"
    before = tree_hash(ckpts[100])
    pub = P.Publisher(repo)
    pub.submit(ckpts[100])
    pub.submit(tmp_path / "missing-ckpt")
    pub.submit(ckpts[200])
    with pytest.raises(PublishError, match="1 publish.*missing-ckpt"):
        pub.close()
    assert pub.published == ["step-00100", "step-00200"]
    assert "publishing" in caplog.text and "missing-ckpt" in caplog.text
    assert tree_hash(ckpts[100]) == before
    with pytest.raises(PublishError, match="closed"):
        pub.submit(ckpts[300])


def test_cli_verbs(ckpts, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli.main(["publish", str(ckpts[100]), str(repo)]) == 0
    assert cli.main(["publish", str(ckpts[100]), str(repo)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["branches", str(repo)]) == 0
    assert "step-00100" in capsys.readouterr().out
    assert cli.main(["checkout", str(repo), "step-00100", str(tmp_path / "co")]) == 0
    assert cli.main(["checkout", str(repo), "../etc", str(tmp_path / "co2")]) == 2
    assert cli.main(["verify", str(repo)]) == 0
    assert cli.main(["export", str(ckpts[100]), str(tmp_path / "ex"), "--bounds", "1,2"]) == 0
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["poe_wand_p99_bounds_per_stage_head"] == [1.0, 2.0]


# ----------------------------------------------------------------------------- the Hub path
class FakeHub:
    """The subset of ``huggingface_hub.HfApi`` poelm uses, in memory (the Hub is unreachable here).
    ``fail`` names a method (and optional revision) that raises, to simulate a dropped upload."""

    def __init__(self, root: Path):
        self.root, self.commits, self.branches, self.fail = root, {}, {}, None
        self._ids = itertools.count()

    def _check(self, method, revision=None):
        if self.fail and self.fail[0] == method and self.fail[1] in (None, revision):
            raise ConnectionError(f"simulated {method} failure")

    def _new(self, files):
        oid = f"{next(self._ids):040x}"
        self.commits[oid] = dict(files)
        return oid

    def _resolve(self, repo_id, rev):
        b = self.branches[repo_id]
        if rev in b:
            return b[rev]
        if rev in self.commits:
            return rev
        raise KeyError(f"revision {rev} not found")

    def create_repo(self, repo_id, repo_type=None, exist_ok=False):
        if repo_id not in self.branches:
            self.branches[repo_id] = {"main": self._new({".gitattributes": b"*.safetensors filter=lfs\n"})}

    def list_repo_refs(self, repo_id, repo_type=None):
        return SimpleNamespace(branches=[SimpleNamespace(name=n, target_commit=o) for n, o in self.branches[repo_id].items()])

    def create_branch(self, repo_id, *, branch, revision=None, repo_type=None, exist_ok=False):
        self._check("create_branch", branch)
        if branch in self.branches[repo_id]:
            raise ValueError(f"branch {branch} exists")
        self.branches[repo_id][branch] = self._resolve(repo_id, revision or "main")

    def delete_branch(self, repo_id, *, branch, repo_type=None):
        del self.branches[repo_id][branch]

    def upload_folder(self, *, repo_id, folder_path, revision, commit_message, delete_patterns=None, parent_commit=None, repo_type=None):
        self._check("upload_folder", revision)
        head = self.branches[repo_id][revision]
        if parent_commit is not None and parent_commit != head:
            raise ValueError("parent_commit is not the head")
        files = {} if delete_patterns == "*" else dict(self.commits[head])
        files[".gitattributes"] = self.commits[head].get(".gitattributes", b"")
        files.update({p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()})
        self.branches[repo_id][revision] = oid = self._new(files)
        return SimpleNamespace(oid=oid)

    def create_commit(self, repo_id, operations, *, commit_message, revision, parent_commit=None, repo_type=None):
        self._check("create_commit", revision)
        head = self.branches[repo_id][revision]
        if parent_commit is not None and parent_commit != head:
            raise ValueError("parent_commit is not the head")
        files = dict(self.commits[head])
        files.update({op.path_in_repo: op.path_or_fileobj for op in operations})
        self.branches[repo_id][revision] = oid = self._new(files)
        return SimpleNamespace(oid=oid)

    def list_repo_files(self, repo_id, revision=None, repo_type=None):
        return sorted(self.commits[self._resolve(repo_id, revision or "main")])

    def hf_hub_download(self, repo_id, filename, revision=None, repo_type=None):
        oid = self._resolve(repo_id, revision or "main")
        path = self.root / oid / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.commits[oid][filename])
        return str(path)


def test_hub_path_against_fake_api(ckpts, tmp_path):
    hub = FakeHub(tmp_path / "hubcache")
    repo = "hf://org/poe-tiny"
    assert P.publish(ckpts[100], repo, api=hub) == "step-00100"
    assert P.publish(ckpts[300], repo, api=hub) == "step-00300"
    assert P.publish(ckpts[200], repo, api=hub) == "step-00200"
    rows = P.list_branches(repo, api=hub)
    assert [(r["branch"], r["main"]) for r in rows] == [("step-00100", False), ("step-00200", False), ("step-00300", True)]
    assert set(hub.branches["org/poe-tiny"]) == {"main", "step-00100", "step-00200", "step-00300"}  # staging removed
    assert verify.verify(repo, api=hub) == []
    with pytest.raises(PublishError, match="already exists"):
        P.publish(ckpts[200], repo, api=hub)
    # a dropped upload: no step branch, main untouched, only a staging branch that verify names
    before = dict(hub.branches["org/poe-tiny"])
    hub.fail = ("upload_folder", None)
    steps_dir = tmp_path / "s400"
    make_ckpt(steps_dir, step=400, tokens=4000, seed=3)
    with pytest.raises(PublishError, match="uploading step-00400.*simulated"):
        P.publish(steps_dir, repo, api=hub)
    refs = hub.branches["org/poe-tiny"]
    assert "step-00400" not in refs and refs["main"] == before["main"]
    assert "poelm-staging-step-00400: a staging branch left by a failed publish (delete it)" in verify.verify(repo, api=hub)
    hub.fail = None
    assert P.publish(steps_dir, repo, api=hub) == "step-00400"
    assert "poelm-staging-step-00400" not in hub.branches["org/poe-tiny"]
    # measure's update reaches main too (main is a copy of the newest branch on the Hub)
    P.update_branch_files(repo, "step-00400", {"poelm_measure.json": json.dumps({"step": 400, "bpb": {"full": {"value": 1.0}}}).encode()},
                          api=hub)
    assert [r["step"] for r in P.read_records(repo, api=hub)] == [400]
    out = P.checkout(repo, "main", tmp_path / "co", api=hub)
    assert json.loads((out / "poelm_measure.json").read_text())["step"] == 400
    assert verify.verify(repo, api=hub) == []
    with pytest.raises(PublishError, match="invalid Hub repository"):
        P.list_branches("hf://../x", api=hub)
