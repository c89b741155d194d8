"""The package's layout rules, asserted on its source (nothing is imported):

- no import cycles between poelm's modules, module-level or lazy (``importlib.import_module``
  strings count too);
- rooms only import rooms below them (``ROOMS``: the pipeline's order);
- ``core/`` and ``infer/`` (what every export ships verbatim) import nothing of poelm outside
  themselves, and never use ``from ..`` (transformers' loader could not follow it);
- the team's static checker (``../shared/tools/check_imports.py``) prints ``ok`` when present.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "poelm"
CHECKER = ROOT.parent / "shared" / "tools" / "check_imports.py"

# Lower numbers are lower rooms. A module may import modules of its own room or of lower rooms.
ROOMS = {
    "core": 0, "fsio": 0, "schedule": 0,
    "infer": 1, "config": 1, "hf": 2,
    "data": 2, "track": 2,
    "train": 3,
    "trajectory": 4,
    "targets": 5,
    "measure": 6,
    "report": 7,
    "ops": 8,
    "demo": 9, "demo_python": 9,
    "cli": 10,
    "__main__": 11,
}


def _modname(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def own_imports(path: Path) -> list[tuple[str, int]]:
    """(poelm module imported, line) for every import of the package's own modules in ``path``."""
    mod = _modname(path)
    pkg_parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("poelm"):
                names = [f"{target}.{a.name}" for a in node.names]
                out += [(n if _exists(n) else target, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("poelm")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("poelm"):
                out.append((node.args[0].value, node.lineno))
    return out


def _exists(mod: str) -> bool:
    p = ROOT.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _files():
    return sorted(PKG.rglob("*.py"))


def test_rooms_only_import_lower_rooms():
    bad = []
    for f in _files():
        src = _room(_modname(f))
        if src == "__init__":
            continue
        assert src in ROOMS, f"{f}: room {src!r} has no place in tests/test_layout.py ROOMS"
        for target, line in own_imports(f):
            dst = _room(target)
            if dst in ("__init__",) or dst == src:
                continue
            if ROOMS[dst] > ROOMS[src] or (ROOMS[dst] == ROOMS[src] and dst != src):
                bad.append(f"{f.relative_to(ROOT)}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_lazy_included():
    graph = {_modname(f): {t for t, _ in own_imports(f) if _exists(t)} for f in _files()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if w == v:
                continue
            if state.get(w) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(w):] + [w]))
            if w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_shipped_rooms_are_self_contained():
    for room in ("core", "infer"):
        for f in sorted((PKG / room).glob("*.py")):
            text = f.read_text(encoding="utf-8")
            assert not re.search(r"^\s*from \.\.", text, re.M), f"{f}: a shipped module must not use 'from ..' (exports are flat)"
            for target, line in own_imports(f):
                assert _room(target) in ("core", room), f"{f}:{line} imports {target}: shipped rooms import only core/ and their own room"


def test_layout_rules_can_fail(tmp_path, monkeypatch):
    """The checks above are not vacuous: a lazy cycle and an upward import are found."""
    fake = tmp_path / "poelm"
    (fake / "core").mkdir(parents=True)
    (fake / "report").mkdir()
    for d in (fake, fake / "core", fake / "report"):
        (d / "__init__.py").write_text("")
    (fake / "core" / "model.py").write_text("def f():\n    from poelm.report import tables\n")
    (fake / "report" / "tables.py").write_text("from poelm.core import model\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    with pytest.raises(AssertionError, match="imports poelm.report.tables"):
        test_rooms_only_import_lower_rooms()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles_lazy_included()


@pytest.mark.skipif(not CHECKER.is_file(), reason="../shared/tools/check_imports.py is not beside this checkout")
def test_team_import_checker_says_ok():
    res = subprocess.run([sys.executable, str(CHECKER), "poelm"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    # "optional import" lines (an extra imported under try/except ImportError) may precede "ok"
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1].startswith("ok"), res.stdout + res.stderr


# import name -> distribution name, for the third-party modules poelm may import
DIST = {"torch": "torch", "safetensors": "safetensors", "tokenizers": "tokenizers", "transformers": "transformers",
        "huggingface_hub": "huggingface_hub", "pyarrow": "pyarrow", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "numpy": "numpy", "scipy": "scipy", "lm_eval": "lm_eval",
        "wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}


def _third_party(path: Path) -> dict[str, bool]:
    """Top-level third-party modules ``path`` imports -> whether every import of it is guarded
    by ``try/except ImportError``."""
    out: dict[str, bool] = {}

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            g = any(h.type is None or "ImportError" in ast.dump(h.type) or "ModuleNotFoundError" in ast.dump(h.type)
                    for h in node.handlers)
            for n in node.body + node.handlers:
                visit(n, guarded or g)
            for n in node.orelse + node.finalbody:
                visit(n, guarded)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for n in names:
            top = n.split(".")[0]
            if top in sys.stdlib_module_names or top in ("poelm", "__future__"):
                continue
            out[top] = out.get(top, True) and guarded
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def test_every_import_is_declared():
    """What a fresh ``pip install`` brings must be enough for every unguarded import."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(req):
        return req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower().replace("-", "_")

    declared = {name(r) for r in meta["dependencies"]}
    extras = {name(r) for rs in meta.get("optional-dependencies", {}).values() for r in rs}
    problems = []
    for f in _files():
        for top, guarded in _third_party(f).items():
            dist = DIST.get(top)
            if dist is None:
                problems.append(f"{f.relative_to(ROOT)}: {top} is not a known dependency (add it to pyproject and DIST)")
            elif dist not in declared and not (guarded and dist in extras):
                problems.append(f"{f.relative_to(ROOT)}: {top} is imported {'(guarded) ' if guarded else ''}but not declared")
    assert not problems, "\n".join(problems)
