import math

import torch

from poelm.core import poe


def test_aggregate_alpha_definitions_by_hand():
    z = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 3.0]]), -1)  # 2 stages, V=3
    geo = torch.log_softmax((z[0] + z[1]) / 2, -1)
    assert torch.allclose(poe.aggregate(z, 0.0), geo)
    assert torch.allclose(poe.aggregate(z, 1.0), torch.log_softmax(z[0] + z[1], -1))
    assert torch.allclose(poe.aggregate(z, 0.5), torch.log_softmax((z[0] + z[1]) / math.sqrt(2), -1))
    assert torch.allclose(poe.aggregate(z[:1], 0.7), z[0])  # one stage: its own distribution
    assert torch.allclose(poe.prefix(z, 1), z[0])


def test_wand_range_constant_shift_invariance_and_values():
    z = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = poe.wand_ranges(z)
    # c0 = [0,1,2]; c1 = [1,1,1]; c2 = [1,1,1]; delta0 = [1,0,-1] range 2; delta1 = 0
    assert torch.allclose(r, torch.tensor([2.0, 0.0]))
    shifted = z + torch.tensor([[5.0], [-3.0], [0.25]])
    assert torch.allclose(poe.wand_ranges(shifted), r)


def test_wand_exit_never_changes_argmax_within_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        z = torch.log_softmax(torch.randn(4, 16, generator=g) * 3, -1)
        ranges = poe.wand_ranges(z)
        c = poe.cumulative(z)
        for s in range(3):
            bound = ranges[s:].sum().item()  # the true remaining ranges are the tightest valid bounds
            if poe.wand_exit(c[s], bound):
                assert c[s].argmax() == c[-1].argmax()


def test_bpb_hand_example_specials_count_zero_bytes():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    targets = torch.tensor([0, 1, 2])
    token_bytes = torch.tensor([0, 2, 3])  # token 0 is special (BOS)
    nll, nbytes = poe.bpb_sums(logp, targets, token_bytes)
    assert math.isclose(nll.item(), -math.log(0.25) - math.log(0.8), rel_tol=1e-6)
    assert nbytes.item() == 5
    assert math.isclose(poe.bpb(nll.item(), nbytes.item()), (math.log(4) + math.log(1.25)) / (math.log(2) * 5), rel_tol=1e-6)


def test_bpb_formula_on_scalars_arrays_and_tensors():
    import numpy as np

    assert poe.bpb(10.0, 5.0) == 10.0 / (math.log(2) * 5.0)
    assert math.isnan(poe.bpb(1.0, 0.0))
    assert isinstance(poe.bpb(np.float64(2.0), np.int64(1)), float) and poe.bpb(np.float64(2.0), np.int64(1)) == 2 / math.log(2)
    a = poe.bpb(np.array([2.0, 4.0, 1.0]), np.array([1, 2, 0]))  # one per bootstrap resample; no bytes -> NaN
    np.testing.assert_allclose(a[:2], [2 / math.log(2)] * 2)
    assert np.isnan(a[2])
    t = poe.bpb(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64))
    assert math.isclose(t[0].item(), 1 / math.log(2), rel_tol=1e-12) and math.isnan(t[1].item())
