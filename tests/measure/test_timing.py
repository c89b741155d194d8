"""The timing protocol (measure/timing.py): ratios over (round, prompt) cells with crossed-bootstrap
intervals, the implied speculative speedup by hand, and route mode thresholding the calibrated
confidence kind."""

import pytest
import torch

from poelm.core.model import ModelConfig, PoEGPT
from poelm.infer.engine import Engine
from poelm.measure import timing


class FakeResult:
    def __init__(self, tokens, stats):
        self.tokens, self.stats = [tokens], stats


class FakeEngine:
    """Generates ``n`` fixed tokens; each call advances a fake clock by a per-mode, per-round cost."""

    def __init__(self, clock, costs, stats):
        self.clock, self.costs, self.stats, self.calls = clock, costs, stats, []

    def generate(self, ids, n, options):
        name = {"stage": "stage0"}.get(options.mode, options.mode)
        self.calls.append(name)
        k = sum(c == name for c in self.calls) - 1  # this mode's call index: the warm-up, then 2 prompts a round
        self.clock[0] += self.costs[name][0 if k == 0 else (k - 1) // 2 + 1] * n
        toks = list(range(n)) if name != "wand" else [0] + [9] * (n - 1)
        return FakeResult(toks, self.stats.get(name, {}))


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"n_stages": 2, "max_seq_len": 64})()


def test_interval_is_median_and_min_max():
    assert timing.interval([1.0, 3.0, 2.0]) == {"value": 2.0, "ci": [1.0, 3.0], "repeats": [1.0, 3.0, 2.0]}
    assert timing.interval([])["value"] is None


def test_protocol_ratios_and_implied_speedup_by_hand(monkeypatch):
    """Issue 22's protocol: modes back to back on each prompt (rotated), speedup = sum T(full) /
    sum T(mode) over every (round, prompt) cell, a crossed-bootstrap interval inside the range of
    the per-cell ratios, the implied speculative speedup from teacher-forced rounds and the
    measured stage-0 cost share."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing, "teacher_forced_agreement", lambda model, x, y: ([True] * len(y), 0))
    # per-token cost of each mode in each of the 3 rounds (the warm-up call is the first entry)
    costs = {"full": [9.0, 1.0, 1.0, 1.2], "stage0": [9.0, 0.4, 0.5, 0.4], "speculative": [9.0, 0.5, 0.8, 0.6],
             "wand": [9.0, 1.0, 0.5, 2.0]}
    spec = {"accepted": 6, "proposed": 8, "rounds": 2, "row_rounds": 2, "new_tokens": 5, "accept_hist": [0, 0, 1, 0, 1]}
    wand = {"new_tokens": 5, "depth_hist": [3, 2], "stage_positions": [10, 10]}
    eng = FakeEngine(clock, costs, {"speculative": spec, "wand": wand, "full": {"new_tokens": 5}})
    prompts = [[0, 1, 2], [0, 3, 4]]
    out = timing.timed_generation(FakeModel(), prompts, eng, timing.modes_for(2, 4, bounds=[1.0]), n_prompts=2, n_tokens=5, repeats=3, samples=400)
    names = ["full", "stage0", "speculative", "wand"]
    assert eng.calls[:4] == names  # warm-up, every mode once
    assert eng.calls[4:8] == names and eng.calls[8:12] == names[1:] + names[:1]  # round 0: prompt 0, then prompt 1 rotated
    s = out["spec"]
    assert s["speedup"]["repeats"] == pytest.approx([2.0, 1.25, 2.0])  # T(full) / T(spec), round by round
    assert s["speedup"]["value"] == pytest.approx((1.0 + 1.0 + 1.2) / (0.5 + 0.8 + 0.6))  # every cell: 5 tokens
    lo, hi = s["speedup"]["ci"]
    assert 1.25 - 1e-9 <= lo < s["speedup"]["value"] < hi <= 2.0 + 1e-9  # a mediant of the cell ratios; not degenerate
    # teacher-forced rounds of 5 new tokens, all agreeing, m=4: one round drafting 3 -> per prompt 3 proposed, 1 round
    c = (0.4 + 0.5 + 0.4) / (1.0 + 1.0 + 1.2)
    assert s["c0_time"]["value"] == pytest.approx(c)
    assert s["implied_speedup"]["value"] == pytest.approx(10 / (2 + (6 + 2) * c + 2 * (1 - c)))
    assert s["accept_hist"] == [0, 0, 2, 0, 2] and s["identical_outputs"] == 2
    assert s["engine_check"]["acceptance"] == pytest.approx(12 / 16) and s["engine_check"]["teacher_forced"] == 1.0
    w = out["wand"]
    assert w["repeats"] == pytest.approx([1.0, 2.0, 0.6]) and w["value"] == pytest.approx(3.2 / 3.5)
    assert out["route"] is None and out["timing"]["repeats"] == 3 and out["timing"]["new_tokens"] == 10
    assert out["timing"]["prompts"] == 2 and out["timing"]["modes"] == names


def test_route_generation_thresholds_the_calibrated_confidence_kind():
    cfg = ModelConfig(vocab_size=64, depth=2, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=64, stage_layers=(1, 1))
    model = PoEGPT(cfg)
    model.init_weights(3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    prompt, n = [1, 5, 9, 2], 24
    eng = Engine(model)

    def confidences(new):
        """Stage 0's confidence of each kind at every new position, teacher-forced on ``new``
        (exact KV catch-up: the states route decoding saw)."""
        with torch.no_grad():
            p0 = model.stage_log_probs(torch.tensor([prompt + new[:-1]]))[0, 0, len(prompt) - 1:].exp()
        top = p0.topk(2, dim=-1).values
        return {"maxprob": top[:, 0], "margin": top[:, 0] - top[:, 1]}

    tau = float(confidences(eng.generate(prompt, n, mode="full").tokens[0])["margin"].median())
    for kind in ("maxprob", "margin"):
        res = eng.generate(prompt, n, mode="route", tau=tau, confidence=kind)
        conf = confidences(res.tokens[0])
        routed = {k: int((v >= tau).sum()) for k, v in conf.items()}
        assert routed["maxprob"] != routed["margin"]  # the two kinds decide differently here
        assert res.stats["depth_hist"][0] == routed[kind], (kind, routed)  # tokens decided by stage 0 alone
    with pytest.raises(Exception, match="maxprob or margin"):
        eng.generate(prompt, 4, mode="route", tau=0.5, confidence="entropy")
