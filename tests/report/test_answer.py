"""The answer on top of the report (issue 22): quality decides it, efficiency is reported beside it."""

from __future__ import annotations

import pytest

from poelm.report import answer as A
from poelm.report import tables as R
from poelm.report import judge as J
from poelm.report import verdict as V

PHASE = {"name": "c", "start_step": 100, "steps": 100, "warmup": 10, "peak": 0.5, "warmdown_ratio": 0.5, "final": 0.0}


def rec(step, bpb, d=None, acc=0.40, dacc=None, alpha=0.90, alpha_ci=0.01, speed=1.50, speed_ci=0.02, agree=0.95):
    """A record with the figures the answer reads; ``d`` / ``dacc``: the paired deltas vs the seed (value, lo, hi)."""
    r = {"schema": 1, "step": step, "phase": PHASE, "branch": f"step-{step:05d}", "K": 2, "lrm": 0.5,
         "bpb": {"full": {"value": bpb, "ci": [bpb - 0.01, bpb + 0.01]},
                 "single": [{"value": bpb + 0.02, "ci": None}, {"value": bpb + 0.01, "ci": None}], "prefix": []},
         "acc": {"full": {"value": acc, "ci": [acc - 0.002, acc + 0.002]}, "single": [{"value": acc - 0.01, "ci": None}] * 2},
         "spec": {"m": 4, "acceptance": alpha, "acceptance_ci": [alpha - alpha_ci, alpha + alpha_ci],
                  "speedup": {"value": speed, "ci": [speed - speed_ci, speed + speed_ci]}},
         "routing": {"agreement_s0_full": agree, "agreement_ci": [agree - 0.002, agree + 0.002]}}
    if d is not None:
        r["against"] = {"target": "repo@step-00100", "deltas": {"bpb.full": {"value": d[0], "ci": [d[1], d[2]]},
                                                                 "acc.full": {"value": dacc[0], "ci": [dacc[1], dacc[2]]}}}
    return r


def test_quality_better_efficiency_worse_answers_better():
    # BPB -0.05 [-0.06, -0.04] and accuracy +2 pp beyond their intervals; acceptance and speedup fall beyond theirs
    recs = [rec(100, 1.30),
            rec(105, 1.2995, d=(-0.0005, -0.001, 0.0), dacc=(0.0, -0.001, 0.001)),  # warmup: the noise floor
            rec(150, 1.25, d=(-0.05, -0.06, -0.04), acc=0.42, dacc=(0.02, 0.017, 0.025), alpha=0.70, speed=1.20, agree=0.90)]
    a = A.answer(recs)
    assert a["word"] == "better"
    assert a["lines"][0].startswith("**Answer: better.** The newest save `step-00150` (step 150, peak rel_it 50, lrm 0.5) has "
                                    "full-K BPB 1.250000 vs 1.300000 at the seed `step-00100`: Δ -0.050000 [-0.060000, -0.040000], "
                                    "below the seed beyond the noise band.")
    j = J.judge(recs)
    q = {g["kind"]: g for g in j["groups"]}
    assert q["quality"]["result"]["direction"] == "better" and len(q["quality"]["result"]["worse"]) == 0
    assert "Coherent divergence from the seed in the better direction" in q["quality"]["summary"]
    eff = q["efficiency"]["result"]
    assert {r["metric"].key for r in eff["worse"]} == {"spec.acceptance", "spec.speedup"}
    speed = next(ln for ln in a["lines"] if ln.startswith("Stage agreement and decoding speed"))
    assert "speculative acceptance α 0.9000 [0.8900, 0.9100] → 0.7000 [0.6900, 0.7100], changed beyond the intervals" in speed
    assert "speculative speedup 1.50x [1.48x, 1.52x] → 1.20x [1.18x, 1.22x], changed beyond the intervals" in speed
    rows = a["table"].splitlines()
    assert rows[2].startswith("| seed | `step-00100` | 100 | 1.300000 [1.290000, 1.310000] | — |")
    assert rows[3].startswith("| best / newest | `step-00150` | 150 | 1.250000 [1.240000, 1.260000] | -0.050000 [-0.060000, -0.040000] |")
    assert len(rows) == 4
    md = R.render_card(recs)
    assert md.index("## Answer") < md.index("## Verdict") < md.index("## Branches")
    assert md.count("**Answer: better.**") == 1


def test_bpb_inside_its_interval_answers_no_change():
    recs = [rec(100, 1.30), rec(105, 1.2995, d=(-0.0005, -0.001, 0.0), dacc=(0.0, -0.001, 0.001)),
            rec(150, 1.298, d=(-0.002, -0.006, 0.003), dacc=(0.001, -0.002, 0.004))]
    a = A.answer(recs)
    assert a["word"] == "no change"
    assert "Δ -0.002000 [-0.006000, +0.003000], inside the noise band: no change" in a["lines"][0]
    assert "Where in the schedule: saves below the seed beyond the noise band: warmup 0 of 1, peak 0 of 1." in a["lines"]


def test_worse_beyond_interval_and_best_save_and_speed_within_intervals():
    recs = [rec(100, 1.30), rec(105, 1.2995, d=(-0.0005, -0.001, 0.0), dacc=(0.0, -0.001, 0.001)),
            rec(130, 1.27, d=(-0.03, -0.035, -0.025), dacc=(0.01, 0.008, 0.012), speed=1.51),
            rec(160, 1.33, d=(0.03, 0.025, 0.035), dacc=(-0.01, -0.012, -0.008), speed=1.49)]
    a = A.answer(recs)
    assert a["word"] == "worse"
    assert a["lines"][1].startswith("Best save `step-00130` (step 130, peak rel_it 30, lrm 0.5): full-K BPB 1.270000, "
                                    "Δ -0.030000 [-0.035000, -0.025000], below the seed beyond the noise band.")
    assert "the first is `step-00130`" in a["lines"][2]
    speed = next(ln for ln in a["lines"] if ln.startswith("Stage agreement"))
    assert "speculative speedup 1.50x [1.48x, 1.52x] → 1.49x [1.47x, 1.51x], no change (intervals overlap)" in speed
    assert [ln.split(" | ")[0] for ln in a["table"].splitlines()[2:]] == ["| seed", "| best", "| newest"]


def test_data_override_is_marked_and_sibling_intervals_are_read():
    recs = [rec(100, 1.30), rec(150, 1.25, d=(-0.05, -0.06, -0.04), dacc=(0.02, 0.017, 0.025))]
    recs[1]["data_override"] = True
    recs[1]["data"] = "/tmp/other.txt"
    assert any(ln.startswith("⚠ Measured on another corpus") and "`step-00150` (/tmp/other.txt)" in ln for ln in A.answer(recs)["lines"])
    assert V.get(recs[1], "spec.acceptance") == (0.90, (pytest.approx(0.89), pytest.approx(0.91)))
    assert V.get({"crossover_gap": 0.1, "crossover_gap_ci": [0.05, 0.15]}, "crossover_gap") == (0.1, (0.05, 0.15))


def test_legend_says_the_underpowered_sentence_once(tmp_path):
    recs = [rec(100, 1.30), rec(105, 1.2995, d=(-0.0005, -0.001, 0.0), dacc=(0.0, -0.001, 0.001))]
    recs += [rec(110 + 10 * i, 1.30 - 0.01 * i, d=(-0.01 * i, -0.01 * i - 0.004, -0.01 * i + 0.004),
                 dacc=(0.0, -0.001, 0.001)) for i in (1, 2, 3)]  # 3 peak saves: no trend test can reach p < 0.05
    md = R.render_card(recs)
    assert md.count("the smallest attainable p is") == 1  # once, in the legend, not per figure
    assert "With 3 saves the smallest attainable p is 0.333" in md
    assert md.count("drifting down, τ -1.00 p 0.333†") == 3  # full K BPB, s0 and s1


def test_delta_text_without_a_paired_interval():
    """A noise test whose paired interval was not measured ([None, None], e.g. records of
    `poelm eval` only) reads as such instead of failing to format."""
    from poelm.report.answer import _delta_text

    assert _delta_text({"delta": -0.0123456, "ci": [None, None]}) == "Δ -0.012346 (no paired interval)"
    assert _delta_text({"delta": -0.0123456, "ci": [-0.02, -0.01]}) == "Δ -0.012346 [-0.020000, -0.010000]"
    assert _delta_text({"delta": None, "ci": None}) == "Δ not measured"
