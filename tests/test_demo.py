"""The demo end to end on a tiny model: trajectory branches, calibration, cards, report."""

import importlib.util
import json
import subprocess

import pytest

from poelm import demo
from poelm.trajectory import publish
from poelm.trajectory import verify
from poelm.core.errors import PoelmError

TINY = [
    "model.vocab_size=320", "model.depth=3", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1",
    "model.intermediate=64", "model.max_seq_len=64", "model.stage_layers=[1,1,1]",
    "train.seq_len=32", "train.device_batch_size=4", "train.eval_every=0", "train.eval_tokens=2048",
    "data.tokenizer_train_chars=200000",
]


def test_demo_pipeline_end_to_end(tmp_path):
    work = tmp_path / "demo"
    lines = []
    out = demo.run_demo(work, overrides=TINY, base_steps=6, continual_steps=4, save_every=2, split_tokens=2048,
                        calib_tokens=1024, progress=False, log=lines.append)
    assert out["branches"] == ["step-00006", "step-00008", "step-00010"]  # the seed first, then every save
    rows = publish.list_branches(out["trajectory"])
    assert [r["main"] for r in rows] == [False, False, True]
    assert [r["with_state"] for r in rows] == [True, False, False]  # the seed is continuable exactly from its branch
    assert f"spike guard (train.skip_spikes = 6): {out['continual']['skipped_steps']} of 4 updates skipped" in "\n".join(lines)
    assert all(r["bpb"] is not None for r in rows)
    assert verify.verify(out["trajectory"]) == []
    for b in out["branches"]:
        cfg = json.loads(subprocess.run(["git", "-C", out["trajectory"], "show", f"{b}:config.json"], capture_output=True, text=True, check=True).stdout)
        assert len(cfg["poe_wand_p99_bounds_per_stage_head"]) == 2
        card = subprocess.run(["git", "-C", out["trajectory"], "show", f"{b}:README.md"], capture_output=True, text=True, check=True).stdout
        assert "Per-stage BPB" in card and f"`{b}`" in card
    report = (work / "report" / "report.md").read_text()
    assert "## Verdict" in report and "step-00010" in report
    pngs = ["alpha_sweep.png", "bpb_vs_step.png", "spec_routing_vs_step.png", "wand_vs_step.png"]
    if importlib.util.find_spec("lm_eval") is not None:  # the demo scores the local eval task on every branch
        pngs.insert(1, "benchmarks_vs_step.png")
    assert sorted(p.name for p in (work / "report").glob("*.png")) == pngs
    # the closing summary: one row per branch with the record's own figures, then where to look
    head = next(i for i, line in enumerate(lines) if "full-K BPB [95% CI]" in line)
    table = lines[head + 1 : head + 4]
    for line, b, r in zip(table, out["branches"], rows):
        rec = json.loads(subprocess.run(["git", "-C", out["trajectory"], "show", f"{b}:poelm_measure.json"], capture_output=True, text=True, check=True).stdout)
        lo, hi = rec["bpb"]["full"]["ci"]
        assert line.split()[:3] == [b, str(rec["step"]), f"{rec['lrm']:.3f}"], line
        assert f"{rec['bpb']['full']['value']:.4f} [{lo:.4f}, {hi:.4f}]" in line, line
        if b == out["branches"][0]:
            assert line.endswith("(the seed)")
        else:
            d = rec["against"]["deltas"]["bpb.full"]
            assert line.endswith(f"{d['value']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"), line
    tail = "\n".join(lines[head + 4 :])
    assert str(work / "report" / "report.md") in tail and f"poelm checkout {out['trajectory']}@main DIR" in tail
    with pytest.raises(PoelmError, match="already holds a demo run"):
        demo.run_demo(work, overrides=TINY, progress=False, log=lambda *a: None)
