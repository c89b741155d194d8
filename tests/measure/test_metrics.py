"""Position-level metrics, quantiles, routing, bootstrap and speculative rounds on hand-made cases."""

import math

import numpy as np
import pytest
import torch

from poelm.core import poe
from poelm.measure.bootstrap import bootstrap, difference_stat, ratio_stat
from poelm.measure.metrics import (ALPHAS, BlockSums, RoutingHistogram, StreamingQuantile, position_stats,
                           projected_speedup, routing_at, routing_threshold, spec_rounds)


def _z(*rows):
    """Stage log-probs [K, 1, V] from per-stage logits."""
    return torch.log_softmax(torch.tensor([[r] for r in rows], dtype=torch.float32), dim=-1)


TB = torch.tensor([1, 2, 3])  # token bytes for V = 3


def test_alpha0_is_renormalised_geometric_mean_and_alpha1_the_product():
    z = _z([1.0, 2.0, 3.0], [3.0, 1.0, 0.0])  # K=2, one position, target 1
    p0, p1 = np.exp(z[0, 0].numpy().astype(np.float64)), np.exp(z[1, 0].numpy().astype(np.float64))
    geo = np.sqrt(p0 * p1)
    geo /= geo.sum()
    prod = p0 * p1
    prod /= prod.sum()
    half = (p0 * p1) ** (1 / math.sqrt(2))  # sum / sqrt(n) with n = 2
    half /= half.sum()
    st = position_stats(z, torch.tensor([1]), TB)
    assert st["nll_alpha"][0, 0].item() == pytest.approx(-math.log(geo[1]), abs=1e-6)
    assert st["nll_alpha"][ALPHAS.index(1.0), 0].item() == pytest.approx(-math.log(prod[1]), abs=1e-6)
    assert st["nll_alpha"][ALPHAS.index(0.5), 0].item() == pytest.approx(-math.log(half[1]), abs=1e-6)
    assert st["nll_single"][:, 0].tolist() == pytest.approx([-math.log(p0[1]), -math.log(p1[1])], abs=1e-6)
    # top-1: stage 0 says token 2, stage 1 token 0; the geometric mean picks argmax(geo)
    assert st["correct_single"][:, 0].tolist() == [False, False]
    assert st["correct_full"][0].item() == (int(np.argmax(geo)) == 1)
    assert st["agree"][0].item() == (int(np.argmax(geo)) == 2)


def test_prefix_matches_poe_and_k1_is_single_s0():
    g = torch.Generator().manual_seed(1)
    z = torch.log_softmax(torch.randn(4, 6, 7, generator=g) * 2, dim=-1)
    t = torch.randint(0, 7, (6,), generator=g)
    st = position_stats(z, t, torch.ones(7, dtype=torch.long))
    assert torch.equal(st["nll_prefix"][0], st["nll_single"][0])  # K'=1 is single s0
    for j in (2, 3):
        ref = poe.nll(poe.prefix(z, j), t)
        torch.testing.assert_close(st["nll_prefix"][j - 1], ref, atol=1e-5, rtol=0)
    for i, a in enumerate(ALPHAS):
        torch.testing.assert_close(st["nll_alpha"][i], poe.nll(poe.aggregate(z, a), t), atol=1e-5, rtol=0)


def test_special_targets_are_not_counted():
    z = _z([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]).expand(2, 3, 3).contiguous()
    tb = torch.tensor([0, 2, 3])  # token 0 is a special token (0 bytes)
    st = position_stats(z, torch.tensor([0, 1, -1]), tb)
    assert st["counted"].tolist() == [False, True, False]
    assert st["bytes"].tolist() == [0, 2, 0]
    bs = BlockSums(2, 3, block_tokens=2)
    bs.add(st, torch.arange(3))
    a = bs.array()
    assert a[:, bs.index["count"]].tolist() == [1.0, 0.0]
    assert a[0, bs.index["nll.single.0"]] == pytest.approx(st["nll_single"][0, 1].item())


def test_wand_range_by_hand_and_shift_invariant():
    z = _z([0.0, 1.0, 2.0], [2.0, 1.0, 0.0])
    # c_0 = z_0, c_1 = (z_0 + z_1) / 2, delta = (z_1 - z_0) / 2; logits differences give the range
    d = (np.array([2.0, 1.0, 0.0]) - np.array([0.0, 1.0, 2.0])) / 2
    st = position_stats(z, torch.tensor([0]), TB)
    assert st["wand_range"][0, 0].item() == pytest.approx(d.max() - d.min(), abs=1e-6)
    g = torch.Generator().manual_seed(2)
    z = torch.log_softmax(torch.randn(4, 5, 9, generator=g) * 3, dim=-1)
    t = torch.zeros(5, dtype=torch.long)
    shift = torch.randn(4, 5, 1, generator=g) * 10  # a constant per stage and position
    a = position_stats(z, t, torch.ones(9, dtype=torch.long))["wand_range"]
    b = position_stats(z + shift, t, torch.ones(9, dtype=torch.long))["wand_range"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(a, poe.wand_ranges(z), atol=1e-5, rtol=0)


def test_wand_exit_never_changes_argmax_inside_bounds():
    g = torch.Generator().manual_seed(3)
    z = torch.log_softmax(torch.randn(4, 400, 11, generator=g) * 3, dim=-1)
    t = torch.zeros(400, dtype=torch.long)
    tb = torch.ones(11, dtype=torch.long)
    r = position_stats(z, t, tb)["wand_range"]
    bounds = torch.quantile(r, 0.5, dim=1).tolist()  # tight bounds: about half the positions are outside
    st = position_stats(z, t, tb, bounds=bounds)
    inside = (r <= torch.tensor(bounds)[:, None]).all(dim=0)
    assert inside.sum() > 10 and (st["exit_stage"] < 3).sum() > 0
    assert st["exit_agree"][inside].all()
    # the exit rule itself: margin of c_s above the remaining bounds' sum
    c = poe.cumulative(z)
    for s in range(3):
        m = poe.top2_margin(c[s])[1]
        first = st["exit_stage"] == s
        assert (m[first] > sum(bounds[s:])).all()


def test_margin_confidence():
    z = _z([0.0, math.log(3.0), math.log(6.0)])  # probabilities 0.1, 0.3, 0.6
    st = position_stats(z, torch.tensor([2]), TB, confidence="margin")
    assert st["conf"].item() == pytest.approx(0.3, abs=1e-6)
    assert position_stats(z, torch.tensor([2]), TB)["conf"].item() == pytest.approx(0.6, abs=1e-6)


def test_routing_threshold_is_lowest_meeting_the_cap():
    # 5 bins over [0, 1]; rates of the suffixes j..4: not monotone in j
    counts = [10, 10, 10, 10, 10]
    regress = [5, 0, 3, 0, 1]
    rates = [sum(regress[j:]) / sum(counts[j:]) for j in range(5)]  # .18, .1, .133, .05, .1
    r = routing_threshold(counts, regress, cap=0.12)
    assert r["index"] == 1 and r["tau"] == pytest.approx(0.2)
    assert r["fraction"] == pytest.approx(0.8) and r["value"] == pytest.approx(rates[1])
    assert routing_threshold(counts, regress, cap=0.06)["tau"] == pytest.approx(0.6)
    none = routing_threshold(counts, regress, cap=0.01)
    assert none["fraction"] == 0.0 and none["tau"] == 1.0
    assert routing_at(counts, regress, 3) == {"fraction": pytest.approx(0.4), "value": pytest.approx(0.05)}


def test_routing_histogram_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    z = torch.log_softmax(torch.randn(2, 3000, 5, generator=g) * 2, dim=-1)
    t = torch.randint(0, 5, (3000,), generator=g)
    st = position_stats(z, t, torch.ones(5, dtype=torch.long))
    h = RoutingHistogram(bins=50)
    h.add(st)
    for metric, per in (("target_regression", st["s0_regress"].double()), ("agreement", (~st["agree"]).double()),
                        ("nll", (st["nll_single"][0] - st["nll_alpha"][0]).double())):
        conf = st["conf"].double()
        rates = []
        for j in range(50):
            routed = h.routed(st["conf"], j)
            assert torch.equal(routed, conf * 50 >= j) or j == 0
            rates.append(per[routed].mean().item() if routed.any() else None)
        cap = float(np.median([x for x in rates if x is not None]))
        first = next(j for j, x in enumerate(rates) if x is not None and x <= cap)
        r = routing_threshold(*h.arrays(metric), cap=cap)
        assert r["index"] == first and r["tau"] == pytest.approx(first / 50)
        assert r["value"] == pytest.approx(rates[first])
        assert r["fraction"] == pytest.approx(h.routed(st["conf"], first).double().mean().item())


def test_projected_speedup():
    assert projected_speedup(0.5, 0.25) == pytest.approx(1 / (0.125 + 0.5))
    assert projected_speedup(0.0, 0.3) == 1.0


def test_streaming_quantile_exact_tail_and_histogram_error():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 5001, generator=g) * 10
    q = StreamingQuantile(2, 0.0, 30.0, bins=65536, n_max=6000)
    for a in range(0, 5001, 777):
        q.add(x[:, a : a + 777])
    xn = x.numpy().astype(np.float64)
    np.testing.assert_allclose(q.quantile(0.99), np.quantile(xn, 0.99, axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(q.max(), xn.max(axis=1), rtol=0, atol=1e-6)
    for p in (0.5, 0.9):
        np.testing.assert_allclose(q.quantile(p), np.quantile(xn, p, axis=1), rtol=0, atol=2 * q.resolution)


def test_bootstrap_ci_contains_point_and_shrinks():
    rng = np.random.default_rng(0)

    def blocks(n):
        nll = rng.gamma(5.0, 200.0, size=n)
        byt = rng.integers(3000, 4000, size=n).astype(float)
        return np.stack([nll, byt], axis=1)

    stat = ratio_stat([(0, 1, 1 / math.log(2))])
    widths = []
    for n in (16, 400):
        b = blocks(n)
        p, lo, hi = bootstrap(stat, b, samples=500, seed=1)
        assert p[0] == pytest.approx(b[:, 0].sum() / (math.log(2) * b[:, 1].sum()))
        assert lo[0] <= p[0] <= hi[0]
        widths.append(hi[0] - lo[0])
    assert widths[1] < widths[0] / 2
    b = blocks(50)
    again = bootstrap(stat, b, samples=300, seed=7)
    assert np.array_equal(again[1], bootstrap(stat, b, samples=300, seed=7)[1])
    # a paired delta of identical columns is exactly 0
    both = np.concatenate([b, b], axis=1)
    p, lo, hi = bootstrap(difference_stat([(0, 1, 1.0)], [(2, 3, 1.0)]), both, samples=200, seed=0)
    assert (p[0], lo[0], hi[0]) == (0.0, 0.0, 0.0)


def test_spec_rounds_by_hand():
    # new tokens 0..8; token 0 comes from the prefill
    agree = [False, True, True, False, True, True, True, True, True]
    s = spec_rounds(agree, m=4)
    # round 1 at p=1 drafts 4 (1..4), accepts 2, emits 3 -> p=4; round 2 drafts min(4, 9-4-1)=4, accepts 4 -> p=9
    assert (s["accepted"], s["proposed"], s["rounds"]) == (6, 8, 2)
    assert s["acceptance"] == 0.75 and s["mean_accepted"] == 3.0
    s = spec_rounds([True] * 3, m=4)  # p=1: drafts min(4, 1)=1, accepts it -> done
    assert (s["accepted"], s["proposed"], s["rounds"]) == (1, 1, 1)
    s = spec_rounds([True, False, False, False], m=2)  # rounds at p=1 (d=2, a=0), p=2 (d=1, a=0), p=3 (d=0)
    assert (s["accepted"], s["proposed"], s["rounds"]) == (0, 3, 3)
