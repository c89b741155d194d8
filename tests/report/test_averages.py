"""Weight averages in the report: attached to their newest averaged save, shown beside its own BPB and
its cooldown probe, and the verdict says whether the two annealing estimates agree."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from poelm.report import averages as A
from poelm.report import tables as R
from poelm.report import judge as V  # the verdict lives in judge.py
from poelm.report.plots import series
from test_cooldown_report import FIXTURE, SEED, _probe


def _avg(step: int, n: int, value: float, ci, delta_ci=None) -> dict:
    rec = copy.deepcopy(json.loads(FIXTURE.read_text())["records"][0])
    rec.update(branch=f"avg-{step:05d}-{n}", step=step, target=f"org/x@avg-{step:05d}-{n}")
    rec["bpb"]["full"] = {"value": value, "ci": list(ci)}
    rec["against"] = None
    if delta_ci is not None:
        rec["against"] = {"target": f"org/x@{SEED}", "deltas": {"bpb.full": {"value": value - 0.724738, "ci": list(delta_ci)}}}
    return rec


def _files(tmp_path: Path, *extra) -> list[Path]:
    recs = json.loads(FIXTURE.read_text())["records"]
    (tmp_path / "card.json").write_text(json.dumps({"records": recs}))
    paths = [tmp_path / "card.json"]
    for rec in extra:
        paths.append(tmp_path / f"{rec['branch']}.json")
        paths[-1].write_text(json.dumps(rec))
    return paths


def test_averages_attach_to_their_save_and_leave_the_trajectory(tmp_path):
    probe = _probe(86_000, 2000, 0.7201, (0.7195, 0.7207), (-0.0050, -0.0042))
    avg = _avg(86_000, 3, 0.7210, (0.7203, 0.7217), (-0.0044, -0.0031))
    plain = R.load_records(_files(tmp_path))
    recs = R.load_records(_files(tmp_path, avg, probe))  # same step as step-86000: no duplicate-step error
    assert [r["branch"] for r in recs] == [r["branch"] for r in plain]
    by = {r["branch"]: r for r in recs}
    assert [a["branch"] for a in by["step-86000"][A.FIELD]] == ["avg-86000-3"]
    assert V.verdict(recs) == V.verdict(plain)
    (row,) = A.rows(recs)
    assert (row["branch"], row["n"], row["own"], row["avg"]) == ("step-86000", 3, 0.822195, 0.7210)
    assert row["delta"] == 0.7210 - 0.724738 and row["delta_ci"] == (-0.0044, -0.0031)
    assert [(p["branch"], p["bpb"]) for p in row["probes"]] == [("cooldown-86000-2000", 0.7201)]
    head, _, table = A.section(recs)
    assert head.startswith("BPB of the average of the last N saves")
    assert "0.721000 [0.720300, 0.721700] (N = 3)" in table and "+0.000900" in table  # average − probe
    (line,) = A.verdict_lines(recs)
    assert "below the seed beyond the interval" in line
    assert "the two estimates agree (paired Δ-vs-seed intervals overlap)" in line and "same answer" in line
    card = R.render_card(recs)
    assert "BPB of the average of the last N saves" in card and line in card
    assert series(recs)["bpb_vs_step"]["BPB of the average of the last 3 saves"] == ([86000], [0.7210])


def test_disagreeing_estimates_are_named(tmp_path):
    probe = _probe(86_000, 2000, 0.7201, (0.7195, 0.7207), (-0.0050, -0.0042))
    avg = _avg(86_000, 2, 0.7300, (0.7290, 0.7310), (+0.0046, +0.0060))
    (line,) = A.verdict_lines(R.load_records(_files(tmp_path, avg, probe)))
    assert "disagree (paired Δ-vs-seed intervals disjoint)" in line
    assert "answer the card's question differently (average: above, probe: below)" in line
    # an average of a step with no record goes to the seed, like a probe
    recs = R.load_records(_files(tmp_path, _avg(85_000, 2, 0.73, (0.72, 0.74))))
    assert [a["branch"] for a in recs[0][A.UNMATCHED]] == ["avg-85000-2"] and A.rows(recs) == []
