"""Trajectory report: golden tables vs the reference card, verdict, plots, missing data, loading."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from poelm.report import tables as R
from poelm.report import judge as J
from poelm.report import verdict as V
from poelm.core.errors import PoelmError
from poelm.report.plots import figures, make_plots, series
from poelm.schedule import Phase, lrm

FIXTURE = Path(__file__).parent / "card_trajectory.json"
CARD = Path(__file__).resolve().parents[3] / "shared" / "reference" / "cognica-poe-3b-continual-model-card.txt"
BRANCHES = ["step-83923", "step-84000", "step-86000", "step-88000", "step-90000", "step-92000", "step-94000", "step-96000"]


@pytest.fixture(scope="module")
def recs():
    return R.load_records(FIXTURE)


@pytest.fixture(scope="module")
def lines(recs):
    return J.verdict(recs)


def md_tables(md: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """``{### heading: (header, {branch: cells after the branch column})}`` parsed back from markdown."""
    out, head = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            head = line[4:].strip()
        elif line.startswith("|") and head and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if head not in out:
                out[head] = (cells, {})
            else:
                out[head][1][cells[0].replace("`", "").replace(" (seed)", "").replace(" (best)", "")] = cells[1:]
    return out


def card_tables(text: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """The reference card's tables: a heading line, a '| Branch |' header line, then rows split
    over two lines ('step-XXXXX (seed) |' and '83,923 | ... |')."""
    heads = ["Per-checkpoint val BPB", "Per-stage BPB", "Per-stage standalone target accuracy",
             "Self-speculative decoding", "Confidence-aware routing", "WAND p99 bounds", "Bayesian PoE", "Sample-mode probe"]
    out, cur, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if any(line.startswith(h) for h in heads):
            cur = line.strip()
        elif cur and line.startswith("| Branch |") and cur not in out:
            out[cur] = ([c.strip() for c in line.strip().strip("|").split("|")], {})
        m = re.match(r"^(step-\d+)( \(seed\))? \|$", line)
        if cur in out and m:
            out[cur][1][m.group(1)] = [c.strip() for c in lines[i + 1].strip().strip("|").split("|")]
    return out


def strip_paren(h: str) -> str:
    return re.sub(r"\s*\([^)]*\)", "", h).strip()


def section(tables, prefix):
    hits = [k for k in tables if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(tables))
    return tables[hits[0]]


# ----------------------------------------------------------------------------- fixture
def test_fixture_is_the_card_trajectory_in_record_schema(recs):
    assert [r["branch"] for r in recs] == BRANCHES
    ph = Phase(**{k: v for k, v in recs[0]["phase"].items()})
    assert (ph.name, ph.start_step, ph.steps, ph.warmup, ph.peak, ph.warmdown_ratio, ph.final) == \
        ("B2", 83923, 50800, 1000, 0.5, 0.55, 0.0)
    for r in recs:
        assert r["schema"] == 1 and r["K"] == 4
        assert r["lrm"] == lrm(r["step"], ph)
        assert r["rel_step"] == r["step"] - 83923
        assert r["bpb"]["full"]["ci"] is None and r["against"] is None
    assert recs[1]["lrm"] == pytest.approx(0.0385) and recs[2]["lrm"] == 0.5


# ----------------------------------------------------------------------------- golden tables
HAND = {  # typed from the card (independent of the fixture and of the card parser)
    ("Per-checkpoint val BPB", "step-83923"): ["83,923", "0", "0.772893", "0.724738"],
    ("Per-checkpoint val BPB", "step-96000"): ["96,000", "12,077", "0.878945", "0.827363"],
    ("Per-stage BPB", "step-86000"): ["86,000", "0.822195", "0.825607", "0.823068", "0.822524", "0.821900", "0.825607", "0.823529", "0.822770"],
    ("Per-stage standalone target accuracy", "step-92000"): ["92,000", "0.4364", "0.4380", "0.4385", "0.4391", "0.4384"],
    ("Self-speculative decoding", "step-92000"): ["92,000", "0.9970", "3.94", "1.60x"],
    ("Confidence-aware routing", "step-94000"): ["94,000", "77.69%", "1.643x", "0.9721"],
    ("WAND p99 bounds", "step-94000"): ["94,000", "3.2967", "1.6240", "1.1702"],
    ("Bayesian PoE", "step-83923"): ["83,923", "0.724738", "0.791984", "0.980340", "1.298269", "1.778352", "+0.000465"],
}


def test_tables_reproduce_hand_typed_card_cells(recs):
    tables = md_tables(R.build_tables(recs))
    for (sec, branch), want in HAND.items():
        assert section(tables, sec)[1][branch] == want, (sec, branch)


@pytest.mark.skipif(not CARD.exists(), reason="reference card not available")
def test_tables_reproduce_every_card_number(recs):
    ours = md_tables(R.build_tables(recs))
    card = card_tables(CARD.read_text(encoding="utf-8"))
    numeric = ["Per-checkpoint val BPB", "Per-stage BPB", "Per-stage standalone target accuracy", "Self-speculative decoding",
               "Confidence-aware routing", "WAND p99 bounds", "Bayesian PoE"]
    for sec in numeric:
        c_head, c_rows = section(card, sec)
        o_head, o_rows = section(ours, sec)
        assert [strip_paren(h) for h in o_head] == [strip_paren(h) for h in c_head], sec
        assert list(c_rows) == BRANCHES and list(o_rows) == BRANCHES
        for b in BRANCHES:
            assert o_rows[b] == c_rows[b], (sec, b)
    # probe: the transcribed cells for the first two branches, "pending" in the card -> "not measured"
    c_head, c_rows = section(card, "Sample-mode probe")
    o_head, o_rows = section(ours, "Sample-mode probe")
    assert [strip_paren(h) for h in o_head[2:6]] == [strip_paren(h) for h in c_head[2:6]]
    for b in BRANCHES[:2]:
        for ours_cell, card_cell in zip(o_rows[b][1:5], c_rows[b][1:5]):
            assert ours_cell[0] in "✓✗" and ours_cell[2:] == card_cell
    for b in BRANCHES[2:]:
        assert all("pending" in c for c in c_rows[b][1:5]) and o_rows[b][1:6] == ["not measured"] * 5
    assert o_rows["step-83923"][-1] == "3/4 passed" and o_rows["step-84000"][-1] == "1/4 passed"


def test_branches_table_positions_and_notes(recs):
    head, rows = section(md_tables(R.build_tables(recs)), "Branches")
    assert head == ["Branch", "Step", "Phase position", "lrm", "Notes"]
    assert rows["step-83923"][:3] == ["83,923", "continual phase rel_it = 0", "0.0000"]
    assert rows["step-84000"][:3] == ["84,000", "rel_it = 77 (warmup)", "0.0385"]
    assert rows["step-86000"][:3] == ["86,000", "rel_it = 2,077 (peak +1,077)", "0.5000"]
    # the card's LR-shock signature (BPB +0.097 / acc -4.4pp / α -4.5pp), generated
    assert rows["step-86000"][3] == "first save after warmup; vs seed: BPB +0.097457 / acc -4.40pp / α -4.50pp"


def test_branch_notes_carry_the_paired_interval_when_there_is_one(recs):
    rs = copy.deepcopy(recs[:3])
    rs[2]["against"] = {"target": "cognica/Cognica-PoE-v1.0-3B-base-continual-learning@step-83923",
                        "deltas": {"bpb.full": {"value": 0.097457, "ci": [0.0951, 0.0998]}}}
    _, rows = section(md_tables(R.build_tables(rs)), "Branches")
    assert rows["step-86000"][3] == "first save after warmup; vs seed: BPB +0.097457 [+0.095100, +0.099800] / acc -4.40pp / α -4.50pp"
    assert rows["step-84000"][3] == "vs seed: BPB -0.000151 / acc -0.01pp / α -1.16pp"  # no against block: no interval


# ----------------------------------------------------------------------------- verdict
def _line(lines, label):
    hits = [ln for ln in lines if ln.startswith(label + ":")]
    assert len(hits) == 1, label
    return hits[0]


def test_verdict_bpb_lr_shock_then_peak_phase_oscillation(lines):
    full = _line(lines, "full K=4 BPB")
    assert "Δ +0.102625 (95% interval not available)" in full
    assert "outside the noise band (warmup floor 0.000151)" in full
    assert "worse than the seed" in full
    assert "LR shock: +0.097608 at step 86,000, the first save after warmup" in full
    assert "Within the peak phase (6 saves, steps 86,000–96,000): no monotonic trend" in full
    assert "oscillating within an envelope of 0.822195–0.832245, range 0.010050" in full
    # every BPB series (training log, full, each stage) oscillates within the peak phase
    for label in ["training-log val BPB", "single s0 BPB", "single s1 BPB", "single s2 BPB", "single s3 BPB"]:
        ln = _line(lines, label)
        assert "LR shock" in ln and "no monotonic trend" in ln and "oscillating" in ln, label


def test_verdict_noise_band_and_overall(lines):
    assert lines[0].startswith("Seed step-83923 (step 83,923); newest step-96000 (step 96,000); phase B2: warmup ends "
                               "at step 84,923, warmdown starts at step 106,784")
    assert "inside the noise band" in _line(lines, "spec acceptance α")  # 0.9853 vs 0.9852, floor 0.0116
    assert "indistinguishable from the seed" in _line(lines, "spec acceptance α")
    assert "not measured at the newest save" in _line(lines, "probe prompts passed")
    quality = next(ln for ln in lines if ln.startswith("Quality ("))
    assert quality.startswith("Quality (step 96,000 vs the seed): 9 of 9 figures outside the noise band: 0 the better way (none), "
                              "9 the worse way (BPB ×7, accuracy ×2)")
    assert "Coherent divergence from the seed in the worse direction" in quality
    eff = next(ln for ln in lines if ln.startswith("Inference efficiency ("))
    assert "3 of 5 figures outside the noise band" in eff and "not how good the model is" in eff
    trend = next(ln for ln in lines if ln.startswith("Trends within"))
    assert "the peak phase is an oscillation regime" in trend


def test_trend_and_noise_by_hand():
    up = V.trend([1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert up["kind"] == "rising" and up["tau"] == pytest.approx(1.0) and up["p"] == pytest.approx(2 / 120)  # exact MK: 1 of 5! orders
    osc = V.trend([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert osc["kind"] == "oscillating" and (osc["lo"], osc["hi"]) == (1.0, 4.0)
    assert V.trend([1, 2, 3], [1.0, 2.0, 3.0])["kind"] == "drifting up"  # n=3: p >= 1/3, never significant
    assert V.trend([1, 2], [1.0, 2.0])["kind"] == "too few"
    ph = {"name": "c", "start_step": 100, "steps": 100, "warmup": 10, "peak": 1.0, "warmdown_ratio": 0.5, "final": 0.0}
    recs = [{"schema": 1, "step": s, "phase": ph, "x": x} for s, x in ((100, 1.0), (105, 1.1), (150, 2.0))]
    nt = V.noise_test(recs, 0, 2, "x", V.phase_of(recs))
    assert nt["delta"] == 1.0 and nt["floor"] == pytest.approx(0.1) and nt["outside"] is True
    recs[2]["x"] = 1.05
    assert V.noise_test(recs, 0, 2, "x", V.phase_of(recs))["outside"] is False


def test_against_block_gives_delta_interval(recs):
    rs = copy.deepcopy(recs[:3])
    rs[2]["against"] = {"target": "cognica/Cognica-PoE-v1.0-3B-base-continual-learning@step-83923",
                        "deltas": {"bpb.full": {"value": 0.097457, "ci": [0.0951, 0.0998]}}}
    full = _line(J.verdict(rs), "full K=4 BPB")
    assert "95% CI [+0.095100, +0.099800]" in full and "interval excludes no change" in full
    rs[2]["against"]["target"] = "some/other@step-1"  # an interval against another checkpoint is not a delta vs the seed
    assert "95% interval not available" in _line(J.verdict(rs), "full K=4 BPB")


# ----------------------------------------------------------------------------- missing measurements
def test_missing_measurement_renders_not_measured(recs, tmp_path):
    rs = copy.deepcopy(recs)
    rs[3]["spec"] = None
    rs[4]["bpb"]["single"][2]["value"] = None
    del rs[5]["routing"]
    rs[6]["train_val_bpb"] = None
    rs[7]["wand"] = None
    tables = md_tables(R.build_tables(rs))
    assert section(tables, "Self-speculative decoding")[1]["step-88000"] == ["88,000"] + ["not measured"] * 3
    assert section(tables, "Per-stage BPB")[1]["step-90000"][4] == "not measured"
    assert section(tables, "Per-stage BPB")[1]["step-90000"][3] == "0.828213"
    assert section(tables, "Confidence-aware routing")[1]["step-92000"][1:] == ["not measured"] * 3
    assert section(tables, "Per-checkpoint val BPB")[1]["step-94000"][2] == "not measured"
    assert section(tables, "WAND p99 bounds")[1]["step-96000"][1:] == ["not measured"] * 3
    lines = J.verdict(rs)
    assert "not measured at the newest save" in _line(lines, "WAND p99 bound 0 → 1")
    assert "(5 saves, steps 86,000–96,000)" in _line(lines, "training-log val BPB")
    paths = R.write_report(rs, tmp_path)
    assert set(paths) == {"report", "bpb_vs_step", "spec_routing_vs_step", "wand_vs_step", "alpha_sweep"}
    assert len(series(rs)["spec_routing_vs_step"]["spec acceptance α"][0]) == 7


# ----------------------------------------------------------------------------- plots and report files
def test_plots_are_pngs_with_the_plotted_data(recs, tmp_path):
    paths = make_plots(recs, tmp_path)
    assert [p.name for p in paths] == ["bpb_vs_step.png", "spec_routing_vs_step.png", "wand_vs_step.png", "alpha_sweep.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    figs = figures(recs)
    lines = {ln.get_label(): ln for ax in figs["bpb_vs_step"].axes for ln in ax.get_lines()}
    for label in ["full K=4", "single s0", "single s1", "single s2", "single s3", "lrm"]:
        assert len(lines[label].get_xdata()) == 8, label
    assert list(lines["full K=4"].get_ydata()) == [r["bpb"]["full"]["value"] for r in recs]
    assert list(lines["lrm"].get_ydata()) == [r["lrm"] for r in recs]
    assert list(lines["warmup end (step 84,923)"].get_xdata()) == [84923, 84923]
    assert "lrm (schedule)" in lines and not any(k.startswith("warmdown start") for k in lines)  # 106,784 > 96,000
    sr = {ln.get_label(): ln for ln in figs["spec_routing_vs_step"].axes[0].get_lines()}
    assert list(sr["routed to stage 0"].get_ydata()) == [r["routing"]["fraction"] for r in recs]
    assert len(sr["spec acceptance α"].get_xdata()) == 8
    wd = [ln for ln in figs["wand_vs_step"].axes[0].get_lines() if ln.get_label().startswith("bound")]
    assert [ln.get_label() for ln in wd] == ["bound 0 → 1", "bound 1 → 2", "bound 2 → 3"]
    assert all(len(ln.get_xdata()) == 8 for ln in wd)
    al = {ln.get_label(): ln for ln in figs["alpha_sweep"].axes[0].get_lines()}
    assert list(al) == ["step-83923 (seed)", "step-96000 (newest)"]
    assert list(al["step-96000 (newest)"].get_ydata()) == recs[-1]["alpha_sweep"]["bpb"]


def test_write_report_and_cards(recs, tmp_path):
    paths = R.write_report(recs, tmp_path)
    md = paths["report"].read_text(encoding="utf-8")
    assert "## Verdict" in md and "![BPB per stage vs step with the LR multiplier](bpb_vs_step.png)" in md
    assert not md.startswith("---")
    card = R.render_card(recs, repo_id="org/poe-trajectory", upto_step=88000)
    assert card.startswith("---\n") and 'revision="step-88000"' in card
    rows = section(md_tables(card), "Per-stage BPB")[1]
    assert list(rows) == BRANCHES[:4] and "currently" not in card
    main = R.render_card(recs, repo_id="org/poe-trajectory", main=True)
    assert "| main | latest | tracks newest published step |  | currently `step-96000` |" in main
    with pytest.raises(PoelmError):
        R.render_card(recs, upto_step=1)


# ----------------------------------------------------------------------------- loading and CLI
def test_load_records_sources(recs, tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    for r in recs:
        (flat).mkdir(exist_ok=True)
        (flat / f"{r['branch']}.json").write_text(json.dumps(r))
    assert [r["step"] for r in R.load_records(flat)] == [r["step"] for r in recs]
    run = tmp_path / "run"
    for r in reversed(recs[:3]):
        (run / r["branch"]).mkdir(parents=True)
        (run / r["branch"] / "poelm_measure.json").write_text(json.dumps(r))
    assert [r["step"] for r in R.load_records(run)] == [83923, 84000, 86000]
    files = [flat / "step-90000.json", flat / "step-83923.json"]
    assert [r["step"] for r in R.load_records(files)] == [83923, 90000]
    with pytest.raises(PoelmError, match="two measurement records for step 83923"):
        R.load_records(files + [flat / "step-83923.json"])
    (tmp_path / "bad.json").write_text('{"step": 1}')
    with pytest.raises(PoelmError, match="not a poelm measurement record"):
        R.load_records(tmp_path / "bad.json")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(R.publish, "read_records", lambda src: seen.append(src) or list(reversed(recs[:2])))
    assert [r["step"] for r in R.load_records(repo)] == [83923, 84000] and seen == [repo]


def test_cli_report(tmp_path, capsys):
    from poelm.cli import main

    assert main(["report", str(FIXTURE), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "oscillation regime" in out and (tmp_path / "rep" / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_update_cards_gives_each_branch_the_report_up_to_its_step(recs, monkeypatch):


    writes = {}
    monkeypatch.setattr(R.publish, "read_records", lambda repo: list(recs))
    monkeypatch.setattr(R.publish, "update_branch_files", lambda repo, branch, files: writes.__setitem__(branch, files["README.md"].decode()))
    done = R.update_cards("repo", ["step-86000"])
    assert done == ["step-86000", "step-96000"]  # the measured branch and the newest (main)
    early, main = writes["step-86000"], writes["step-96000"]
    assert "0.822195" in early and "0.827363" not in early  # its own row, not later ones
    assert "0.827363" in main and "0.724738" in main
    assert len(R.update_cards("repo")) == len(recs)


def test_short_series_are_underpowered_not_oscillating():
    t = V.trend([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])
    assert t["kind"] == "drifting down" and t["underpowered"] and t["min_p"] == pytest.approx(2 / 24)
    assert t["p_rho"] == pytest.approx(2 / 24)  # exact Spearman p, not scipy's 0 for |rho| = 1
    t5 = V.trend([1, 2, 3, 4, 5], [5.0, 4.0, 3.0, 2.0, 1.0])
    assert t5["kind"] == "falling" and not t5["underpowered"] and t5["p"] == pytest.approx(2 / 120)


# ----------------------------------------------------------------------------- auditable figures (issue 14)
def _with_new_fields(recs):
    rs = copy.deepcopy(recs[:3])
    for i, r in enumerate(rs):
        r["routing"].update(metric="agreement", tau=0.17 + 0.01 * i, value_tau0_calib=0.031, value_tau0=0.030, value=0.019,
                            cap_met_at_tau0=False,
                            generation={"speedup": {"value": 1.10, "ci": [1.05, 1.20], "repeats": [1.05, 1.10, 1.20]},
                                        "agreement": 0.97, "identical": 3, "prompts": 4})
        r["spec"]["speedup"] = {"value": 1.50 + 0.3 * i, "ci": [1.45 + 0.3 * i, 1.55 + 0.3 * i], "repeats": []}
        r["spec"].update(implied_speedup={"value": 1.9, "ci": [1.8, 2.0]}, c0_time={"value": 0.41, "ci": [0.4, 0.42]},
                         accept_hist=[1, 0, 2, 3, 10], identical_outputs=4, prompts=4, new_tokens=64)
        r["wand"]["exit"] = {"agreement": 0.99}
        r["wand"]["generation"] = {"speedup": {"value": 0.95, "ci": [0.9, 1.0]}, "agreement": 0.98, "identical": 2, "prompts": 4,
                                   "mean_depth": 2.5, "depth_hist": [30, 4, 6, 24]}
        r["timing"] = {"prompts": 4, "new_tokens_per_prompt": 16, "repeats": 3, "ms_per_token": {"full": 7.5}}
        r["probe"] = {"set": "embedded", "max_new_tokens": 60, "passed": i % 2, "total": 2, "words_matched": 4 + i, "words_total": 8,
                      "grading": "start of the continuation",
                      "results": [{"name": "devil:ABSURDITY", "answer": "A statement or belief", "graded": "A statement of men.",
                                   "pass": False, "matched_words": 2, "answer_words": 4},
                                  {"name": "devil:ROPE", "answer": "An obsolescent appliance for", "graded": "An obsolescent appliance for it.",
                                   "pass": i % 2 == 1, "matched_words": 2 + 2 * (i % 2), "answer_words": 4}]}
    rs[0]["routing"].update(tau=0.0, cap_met_at_tau0=True, value_tau0_calib=0.012, fraction=1.0)
    rs[0]["routing"].pop("generation")
    return rs


def test_new_sections_name_the_metric_tau_and_measured_speedups(recs):
    rs = _with_new_fields(recs)
    tables = md_tables(R.build_tables(rs))
    card = section(tables, "Confidence-aware routing")[1]
    assert card["step-83923"][1:3] == ["cap met with no threshold", "—"] and card["step-84000"][1] == "87.86%"
    head, rows = section(tables, "Routing calibration")
    assert head[2:] == ["τ", "metric at τ = 0 (calib)", "metric at τ (held out)", "measured route speedup", "route agreement with full"]
    assert rows["step-83923"][1:3] == ["0 (cap met with no threshold)", "0.0120"]
    assert rows["step-83923"][4] == "not timed (no threshold)"
    assert set(rows) == {"step-83923", "step-84000", "step-86000"}  # seed, best and newest: the audit rows
    assert "| `step-84000` (best) |" in R.build_tables(rs)
    assert rows["step-86000"][1] == "0.1900" and rows["step-86000"][4] == "1.10x [1.05x, 1.20x]"
    assert "Metric: agreement ≤ 0.02 (maxprob confidence)" in R.build_tables(rs)
    _, rows = section(tables, "WAND adaptive depth")
    assert rows["step-86000"][1:] == ["0.9900", "0.9800", "2/4", "0.95x [0.90x, 1.00x]", "2.50", "30 / 4 / 6 / 24"]
    _, rows = section(tables, "Speculative decoding timing")
    assert rows["step-86000"][1:4] == ["1.90x [1.80x, 2.00x]", "0.410 [0.400, 0.420]", "1 / 0 / 2 / 3 / 10"]
    assert section(tables, "Self-speculative decoding")[1]["step-84000"][3] == "1.80x [1.75x, 1.85x]"
    head, rows = section(tables, "Probe grades per prompt")
    assert head[:3] == ["Prompt", "expected start", "`step-83923` (seed)"]
    assert rows["devil:ROPE"][1:] == ["✗ 2/4 words", "✓ 4/4 words", "✗ 2/4 words"]
    assert rows["**total**"][2] == "1/2 passed; 5/8 words"
    probe = section(tables, "Sample-mode probe")[1]
    assert probe["step-84000"][2] == "✓ An obsolescent appliance for it."  # the graded start, not the whole continuation
    md = R.build_tables(rs)
    assert "4 probe prompts × 16 new tokens, median [min, max] of 3 rounds" in md  # a record from before issue 22
    for r in rs:
        r["timing"]["interval"] = "95% crossed bootstrap over rounds and prompts"
        r["generation"] = {"prompts": 32, "context_tokens": 64, "new_tokens_per_prompt": 32, "seed": 5}
    md = R.build_tables(rs)
    assert "4 prompts of the generation set × 16 new tokens × 3 interleaved rounds, 95% interval over rounds and prompts" in md
    assert "32 contexts of 64 tokens cut from the measurement slice (seed 5) × 32 greedy new tokens, 95% interval over prompts" in md


def test_verdict_calls_a_timing_change_real_only_beyond_its_interval(recs):
    rs = _with_new_fields(recs)
    line = _line(J.verdict(rs), "spec end-to-end speedup")  # 1.50 [1.45, 1.55] -> 2.10 [2.05, 2.15]: no overlap
    assert "outside the noise band" in line and "intervals do not overlap" in line
    rs[2]["spec"]["speedup"]["ci"] = [1.50, 2.20]  # overlapping intervals: not a change, whatever the warmup floor says
    line = _line(J.verdict(rs), "spec end-to-end speedup")
    assert "inside the noise band" in line and "indistinguishable from the seed" in line
    rs[2]["spec"]["speedup"] = 2.10  # a bare number (an old record): no interval, no call
    line = _line(J.verdict(rs), "spec end-to-end speedup")
    assert "noise band not available (a timing figure needs both records' intervals)" in line
    nt = V.noise_test(rs, 0, 2, "spec.speedup", V.phase_of(rs), timing=True)
    assert nt["floor"] is not None and nt["outside"] is None  # the floor alone does not decide a timing figure
    assert V.noise_test(rs, 0, 2, "spec.speedup", V.phase_of(rs))["outside"] is True
