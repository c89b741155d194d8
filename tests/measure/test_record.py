"""The typed record: docs/record.md is generated from it; old records load; writes round-trip."""

import json
from pathlib import Path

import pytest

from poelm.measure import record
from poelm.measure.record import Block, Figure, Record

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "tests" / "report" / "card_trajectory.json"


def test_docs_are_generated_from_the_dataclasses():
    assert (ROOT / "docs" / "record.md").read_text() == record.render_doc(), \
        "docs/record.md is stale: python -m poelm.measure.record > docs/record.md"


def test_old_card_records_load():
    recs = json.loads(CARD.read_text())["records"]
    typed = [record.load(r) for r in recs]
    assert [t.step for t in typed] == [r["step"] for r in recs]
    t, r = typed[0], recs[0]
    assert isinstance(t.bpb.full, Figure) and t.bpb.full.value == r["bpb"]["full"]["value"]
    assert t.figure("bpb.single.3") == (r["bpb"]["single"][3]["value"], None)
    assert t.figure("crossover_gap") == (r["crossover_gap"], None)
    assert t.figure("spec.acceptance")[0] == r["spec"]["acceptance"]
    assert t.generation is None and t.timing is None  # keys the card's records predate: not measured
    again = record.load(t.to_dict())
    assert again.to_dict() == t.to_dict()


def test_legacy_metric_name_and_unknown_keys():
    t = record.load({"step": 3, "routing": {"metric": "target_regression", "tau": 0.5, "later_key": 1}, "new_block": {"a": 1},
                     "crossover_gap": 0.25, "crossover_gap_ci": [0.2, 0.3]})
    assert t.routing.metric == "target" and t.routing.tau == 0.5
    assert record.untyped_keys(t) == ["new_block", "routing.later_key"]
    d = t.to_dict()
    assert d["routing"]["later_key"] == 1 and d["new_block"] == {"a": 1}  # kept verbatim
    assert t.figure("crossover_gap") == (0.25, (0.2, 0.3))
    assert t.figure("routing.tau") == (0.5, None) and t.figure("wand.bounds") == (None, None)
    assert t.get("routing.generation.speedup") is None and t.get("new_block.a") == 1


def test_bad_block_is_a_type_error():
    with pytest.raises(TypeError, match="Bpb: expected a JSON object"):
        record.load({"bpb": [1, 2]})
    assert Record().schema == record.SCHEMA


def test_from_meta_head():
    meta = {"step": "12", "lrm": 0.5, "phase": {"name": "B2"}, "branch": "step-00012", "other": 1}
    r = Record.from_meta(meta, target="R@step-00012", branch=meta["branch"], K=2, stage_layers=(1, 2), poelm_version="x")
    d = r.to_dict()
    assert (d["step"], d["lrm"], d["phase"], d["K"], d["stage_layers"], d["branch"]) == (12, 0.5, {"name": "B2"}, 2, [1, 2], "step-00012")
    assert d["tokens"] is None and "other" not in d and d["schema"] == record.SCHEMA and d["bpb"] is None


def test_to_bytes_is_strict_json():
    import numpy as np

    body = record.to_bytes(Record(step=np.int64(3), crossover_gap=float("nan"), stage_layers=[np.int32(1)], lrm=np.float32(0.5)))
    d = json.loads(body)
    assert body.endswith(b"\n") and d["step"] == 3 and d["crossover_gap"] is None and d["stage_layers"] == [1] and d["lrm"] == 0.5
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        record.to_bytes({"x": object()})
