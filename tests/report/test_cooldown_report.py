"""Cooldown probes in the report: attached to the save they start from, the "BPB if annealed here"
table with intervals and Δ vs the seed, the verdict line, the plot line; the step trajectory unchanged."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from poelm.report import cooldown as C
from poelm.report import tables as R
from poelm.report import judge as V
from poelm.report.plots import series

FIXTURE = Path(__file__).parent / "card_trajectory.json"
SEED = "step-83923"


def _probe(step: int, n: int, value: float, ci, delta_ci=None, against=SEED) -> dict:
    """A measurement record of ``cooldown-<step>-<n>``: the card's record layout, our numbers."""
    rec = copy.deepcopy(json.loads(FIXTURE.read_text())["records"][0])
    rec.update(branch=f"cooldown-{step:05d}-{n}", step=step + n, lrm=0.0, rel_step=n, target=f"org/x@cooldown-{step:05d}-{n}",
               phase={"kind": "cooldown", "name": "cooldown", "start_step": step, "steps": n, "from_lrm": 0.5, "to_lrm": 0.0,
                      "shape": "1-sqrt"})
    rec["bpb"]["full"] = {"value": value, "ci": list(ci)}
    rec["against"] = None
    if delta_ci is not None:
        rec["against"] = {"target": f"org/x@{against}", "deltas": {"bpb.full": {"value": value - 0.724738, "ci": list(delta_ci)}}}
    return rec


@pytest.fixture()
def files(tmp_path):
    """The card trajectory's records plus two probes (one of them at the step of a save, 88,000)."""
    recs = json.loads(FIXTURE.read_text())["records"]
    probes = [_probe(86_000, 2000, 0.7201, (0.7195, 0.7207), (-0.0050, -0.0042)),
              _probe(87_500, 500, 0.7230, (0.7222, 0.7238), (-0.0021, -0.0013))]
    (tmp_path / "card.json").write_text(json.dumps({"records": recs}))
    paths = [tmp_path / "card.json"]
    for p in probes:
        paths.append(tmp_path / f"{p['branch']}.json")
        paths[-1].write_text(json.dumps(p))
    return paths


def test_probes_are_attached_not_mixed(files):
    plain = R.load_records(files[0])
    recs = R.load_records(files)  # a probe ending at step 88,000 does not collide with step-88000
    assert [r["branch"] for r in recs] == [r["branch"] for r in plain]
    by = {r["branch"]: r for r in recs}
    assert [p["branch"] for p in by["step-86000"][C.FIELD]] == ["cooldown-86000-2000"]
    assert C.UNMATCHED in recs[0] and [p["branch"] for p in recs[0][C.UNMATCHED]] == ["cooldown-87500-500"]
    assert V.verdict(recs) == V.verdict(plain)  # the step trajectory's verdict is untouched


def test_rows_section_and_verdict(files):
    recs = R.load_records(files)
    (row,) = C.rows(recs)
    assert row["branch"] == "step-86000" and row["probe"] == "cooldown-86000-2000" and row["steps"] == 2000
    assert row["annealed"] == 0.7201 and row["annealed_ci"] == (0.7195, 0.7207)
    assert row["delta"] == pytest.approx(0.7201 - 0.724738) and row["delta_ci"] == (-0.0050, -0.0042)
    assert row["own"] == V.value(next(r for r in recs if r["branch"] == "step-86000"), "bpb.full")
    head, desc, table = C.section(recs)
    assert head == "BPB if annealed here (cooldown probes)"
    line = next(x for x in table.splitlines() if "step-86000" in x)
    assert "0.720100 [0.719500, 0.720700] (2000-step 1-sqrt, lrm 0.5 → 0)" in line
    assert "-0.004638 [-0.005000, -0.004200]" in line and "`cooldown-86000-2000`" in line
    assert "`cooldown-87500-500`" in desc  # the unmatched probe is named, not dropped
    (v,) = C.verdict_lines(recs)
    assert v.startswith("BPB if annealed here (2000-step cooldown), 1 probed branch(es)")
    assert "1 below the seed beyond the interval, 0 above it, 0 within it" in v and "One probe" in v
    md = R.render_card(recs, front_matter=False)
    assert "### BPB if annealed here (cooldown probes)" in md and f"- {v}" in md


def test_verdict_within_noise_and_trend(tmp_path):
    recs = json.loads(FIXTURE.read_text())["records"]
    probes = [_probe(86_000, 500, 0.7240, (0.7230, 0.7250), (-0.0012, 0.0003)),
              _probe(90_000, 500, 0.7230, (0.7228, 0.7232), (-0.0020, -0.0014)),
              _probe(94_000, 500, 0.7210, (0.7205, 0.7215), None)]  # no paired interval: value CIs decide
    recs = C.attach(recs + probes)
    (v,) = C.verdict_lines(recs)
    # 94,000 has no against block: its interval [0.7205, 0.7215] vs the seed's (no CI) cannot decide
    assert "1 below the seed beyond the interval, 0 above it, 1 within it, 1 without an interval" in v
    assert "Trend over the probed branches (3 probes): drifting down (Mann–Kendall τ = -1.00" in v
    assert "too few probes for a significant test" in v  # 3 points: the smallest attainable p is 1/3
    xs, ys = series(recs)["bpb_vs_step"][C.label(500)]
    assert xs == [86_000, 90_000, 94_000] and ys == [0.7240, 0.7230, 0.7210]
    two = C.attach(json.loads(FIXTURE.read_text())["records"] + probes[:2])
    (v2,) = C.verdict_lines(two)
    # the paired Δ intervals [-0.0012, +0.0003] and [-0.0020, -0.0014] are disjoint, though the value intervals overlap
    assert ("falls from 0.724000 at step 86,000 to 0.723000 at step 90,000 (-0.001000) (their paired Δ-vs-seed "
            "intervals are disjoint: a real change)") in v2
    close = [_probe(86_000, 500, 0.7240, (0.7230, 0.7250), (-0.0012, 0.0003)), _probe(90_000, 500, 0.7230, (0.7228, 0.7232), (-0.0011, -0.0001))]
    (v3,) = C.verdict_lines(C.attach(json.loads(FIXTURE.read_text())["records"] + close))
    assert "(their paired Δ-vs-seed intervals overlap: within noise)" in v3
    loose = [_probe(86_000, 500, 0.7240, (0.7230, 0.7250), None), _probe(90_000, 500, 0.7230, (0.7228, 0.7232), None)]
    (v4,) = C.verdict_lines(C.attach(json.loads(FIXTURE.read_text())["records"] + loose))
    assert "(their intervals overlap: within noise)" in v4 and "2 without an interval" in v4


def test_no_probes_no_section(files):
    recs = R.load_records(files[0])
    assert C.section(recs) is None and C.verdict_lines(recs) == [] and C.plot_series(recs) == {}
    assert not any(k.startswith("BPB if annealed") for k in series(recs)["bpb_vs_step"])
