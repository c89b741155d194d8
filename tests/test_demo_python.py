"""``poelm demo --domain python`` end to end on the tiny model: four runs, two slices, one report."""

import json

from poelm.demo_python import run_python_demo
from poelm.ops.selftest import TINY


def test_python_demo_tiny(tmp_path):
    ov = [o for o in TINY if not o.startswith(("schedule.", "train.save_every"))]
    res = run_python_demo(tmp_path / "d", base_steps=2, steps=2, save_every=2, new_tokens=16, files=12, slice_bytes=4000,
                          overrides=ov, progress=False, log=lambda m: None)
    runs = sorted({r["target"].split("/")[-2] for r in res["records"]})
    assert runs == ["ext-vocab-replay0", "ext-vocab-replay0.25", "old-vocab-replay0", "old-vocab-replay0.25"]
    assert {r["vocab_size"] for r in res["records"]} == {320, 336} and res["reference"]["vocab_size"] == 320
    md = (tmp_path / "d" / "report.md").read_text()
    assert "## Answer" in md and md.count("gain on `new`") == 4
    assert json.loads((tmp_path / "d" / "slices.json").read_text())["records"] == res["records"]
