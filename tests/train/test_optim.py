"""Single-process tests of poelm/train/optim.py: Newton-Schulz, groups, update rules, determinism,
lr multiplier, clipping, and state round trips."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from poelm.config import OptimConfig
from poelm.core.errors import CheckpointError, PoelmError
from poelm.core.model import ModelConfig, PoEGPT
from poelm.train.optim import NS_COEFFS, RESID_LR_SCALE, adamw_update, build_optimizer, orthogonalize

TINY = dict(vocab_size=300, depth=4, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=32, stage_layers=(2, 1, 1))



def tiny_model(seed=0, **over):
    m = PoEGPT(ModelConfig(**{**TINY, **over}))
    m.init_weights(seed)
    return m


def batch(seed=1, B=4, T=16, V=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model, opt, idx, tgt, steps):
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- Newton-Schulz
def test_orthogonalize_singular_values_in_band():
    # Documented band for the (3.4445, -4.7750, 2.0315) quintic after 5 steps: ~[0.68, 1.14]
    # on random Gaussian matrices (measured over seeds 0-4); asserted as [0.6, 1.3].
    G = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(orthogonalize(G, 5))
    assert 0.6 < sv.min().item() and sv.max().item() < 1.3
    # Tall matrices are transposed, so the result is the transpose of the wide case.
    assert torch.equal(orthogonalize(G.T), orthogonalize(G).T)
    # Scale invariance (normalised by the Frobenius norm first).
    torch.testing.assert_close(orthogonalize(7.0 * G), orthogonalize(G), atol=1e-5, rtol=1e-5)


def test_orthogonalize_diagonal_follows_polynomial_by_hand():
    # diag(3, 4): Frobenius norm 5, so singular values start at 0.6 and 0.8 and each step maps
    # s -> a s + b s^3 + c s^5.
    a, b, c = NS_COEFFS
    expect = []
    for s in (0.6, 0.8):
        for _ in range(5):
            s = a * s + b * s**3 + c * s**5
        expect.append(s)
    out = orthogonalize(torch.diag(torch.tensor([3.0, 4.0])), 5, eps=0.0)
    torch.testing.assert_close(out, torch.diag(torch.tensor(expect)), atol=1e-5, rtol=1e-5)
    assert abs(expect[0] - 1) < 0.35 and abs(expect[1] - 1) < 0.35


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("over", [{}, {"value_embeds": False}, {"stage_layers": (4,)}, {"stage_layers": (4,), "value_embeds": False}])
def test_every_parameter_in_exactly_one_group(over):
    model = tiny_model(**over)
    opt = build_optimizer(model, OptimConfig(optimizer="poelm"))
    names = [n for n, _ in model.named_parameters()]
    lay = opt.layout()
    assert [d["name"] for d in lay] == names  # each parameter exactly once, in model order
    by = {d["name"]: d["group"] for d in lay}
    matrices = {f"blocks.{i}.{m}.weight" for i in range(4) for m in
                ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {n for n, g in by.items() if g == "matrix"} == matrices
    K = len(model.config.stage_layers)
    assert {n for n, g in by.items() if g == "unembedding"} == {"lm_head.weight"} | {f"stage_heads.{k}.weight" for k in range(K)}
    ve = {f"value_embeds.{i}.weight" for i in ("1", "3")} if model.config.value_embeds else set()
    assert {n for n, g in by.items() if g == "embedding"} == {"wte.weight"} | ve
    gates = {f"blocks.{i}.attn.ve_gate.weight" for i in ("1", "3")} if model.config.value_embeds else set()
    assert {n for n, g in by.items() if g == "gate"} == gates
    assert by["resid_lambdas"] == "resid" and by["x0_lambdas"] == "x0"
    assert set(by.values()) <= set(opt.groups) and len(by) == len(list(model.parameters()))


def test_reference_ops_scalars_train_under_poelms_optimizer():
    """smear_gate / smear_lambda / backout_lambda (the reference's ops) land in the smear group at
    the reference's fixed lr 0.2, undecayed; one step moves smear_gate by lr (Adam's first step)."""
    from poelm.train.optim import SMEAR_LR

    model = tiny_model(smear=True, backout=True)
    opt = build_optimizer(model, OptimConfig(optimizer="poelm", weight_decay=0.1))
    by = {d["name"]: d["group"] for d in opt.layout()}
    assert {n for n, g in by.items() if g == "smear"} == {"smear_gate.weight", "smear_lambda", "backout_lambda"}
    assert opt.groups["smear"].lr == SMEAR_LR == 0.2 and opt.groups["smear"].weight_decay == 0.0
    before = model.smear_gate.weight.detach().clone()
    model.smear_gate.weight.grad = torch.ones_like(before)
    for n, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.smear_gate.weight.detach(), before - SMEAR_LR, atol=1e-6, rtol=0)


def test_unknown_parameter_is_an_error():
    model = tiny_model()
    model.extra_bias = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(PoelmError, match="extra_bias"):
        build_optimizer(model, OptimConfig(optimizer="poelm"))


def test_set_lrm_scales_every_group():
    cfg = OptimConfig(optimizer="poelm")
    opt = build_optimizer(tiny_model(), cfg)
    base = {"matrix": cfg.matrix_lr, "embedding": cfg.embedding_lr, "unembedding": cfg.unembedding_lr,
            "gate": cfg.matrix_lr, "resid": cfg.scalar_lr * RESID_LR_SCALE, "x0": cfg.scalar_lr, "smear": 0.2}
    assert {n: g.lr for n, g in opt.groups.items()} == base
    opt.set_lrm(0.25)
    assert {n: g.lr for n, g in opt.groups.items()} == {n: v * 0.25 for n, v in base.items()}


def test_lrm_scales_the_actual_step():
    # The first AdamW step moves each element by lr * g / (|g| + eps) = +-lr where |g| >> eps.
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="poelm"))
    opt.set_lrm(0.5)
    before = model.lm_head.weight.detach().clone()
    model.loss(*batch())[0].backward()
    g = model.lm_head.weight.grad.clone()
    opt.step()
    big = g.abs() > 1e-5
    assert big.float().mean() > 0.5
    delta = model.lm_head.weight.detach() - before
    torch.testing.assert_close(delta[big], -torch.sign(g[big]) * 0.5 * OptimConfig(optimizer="poelm").unembedding_lr, rtol=1e-4, atol=0)
    # lrm = 0 freezes everything.
    p0 = params(model)
    opt.set_lrm(0.0)
    model.loss(*batch())[0].backward()
    opt.step()
    assert all(torch.equal(p0[n], p) for n, p in model.named_parameters())


def test_momentum_warmup():
    opt = build_optimizer(tiny_model(), OptimConfig(optimizer="poelm", muon_momentum=0.95))
    assert [round(opt.muon_momentum(s), 6) for s in (0, 150, 300, 1000)] == [0.85, 0.9, 0.95, 0.95]


# ----------------------------------------------------------------------------- update rules
def test_muon_first_step_is_scaled_orthogonalized_gradient():
    # From a zero buffer, buf = (1-m) g and the Nesterov blend is (1-m^2) g; orthogonalisation is
    # scale invariant, so the step is -lr * max(1, rows/cols)^0.5 * orthogonalize(g).
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="poelm"))
    model.loss(*batch())[0].backward()
    fc, q = model.blocks[0].mlp.c_fc.weight, model.blocks[0].attn.c_q.weight  # [64, 32] tall, [32, 32]
    g_fc, g_q = fc.grad.clone(), q.grad.clone()
    w_fc, w_q = fc.detach().clone(), q.detach().clone()
    opt.step()
    lr = OptimConfig(optimizer="poelm").matrix_lr
    torch.testing.assert_close(fc.detach() - w_fc, -lr * 2**0.5 * orthogonalize(g_fc), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(q.detach() - w_q, -lr * orthogonalize(g_q), atol=1e-6, rtol=1e-4)
    # Momentum buffer after one step at warm-up momentum 0.85.
    buf = opt.state[next(s.index for s in opt.slots if s.name == "blocks.0.mlp.c_fc.weight")]["momentum_buffer"]
    torch.testing.assert_close(buf, 0.15 * g_fc)


def test_adamw_matches_torch():
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(5, 7, generator=g)
    grads = [torch.randn(5, 7, generator=g) for _ in range(4)]
    ref = torch.nn.Parameter(p0.clone())
    topt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.clone(), torch.zeros(5, 7), torch.zeros(5, 7)
    for t, gr in enumerate(grads, 1):
        ref.grad = gr.clone()
        topt.step()
        adamw_update(p, gr, m, v, t, 0.01, (0.8, 0.95), 1e-8, 0.1)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)


def test_grad_norm_and_clipping():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="poelm", grad_clip=0.01))
    model.loss(*batch())[0].backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    g_fc = model.blocks[0].mlp.c_fc.weight.grad.clone()
    got = opt.step()
    torch.testing.assert_close(got, norm)
    assert norm.item() > 0.01
    buf = opt.state[next(s.index for s in opt.slots if s.name == "blocks.0.mlp.c_fc.weight")]["momentum_buffer"]
    torch.testing.assert_close(buf, 0.15 * g_fc * 0.01 / (norm + 1e-6))


# ----------------------------------------------------------------------------- training
def test_loss_decreases_and_runs_are_bitwise_reproducible():
    idx, tgt = batch()
    runs = []
    for _ in range(2):
        model = tiny_model()
        opt = build_optimizer(model, OptimConfig(optimizer="poelm"))
        losses = train(model, opt, idx, tgt, 6)
        runs.append((losses, params(model)))
    (l1, p1), (l2, p2) = runs
    assert l1 == l2 and all(torch.equal(p1[n], p2[n]) for n in p1)
    assert l1[-1] < l1[0] - 0.5, l1  # ln(300) = 5.70 at init; a fixed batch is memorised fast


def test_full_state_round_trip_is_bitwise(tmp_path):
    idx, tgt = batch()
    ref = tiny_model()
    ropt = build_optimizer(ref, OptimConfig(optimizer="poelm", grad_clip=1.0))
    train(ref, ropt, idx, tgt, 5)

    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="poelm", grad_clip=1.0))
    opt.set_lrm(0.7)
    train(model, opt, idx, tgt, 3)
    opt.set_lrm(1.0)
    tensors, meta = opt.full_state_dict()
    assert "blocks.0.attn.c_q.weight/momentum_buffer" in tensors and "wte.weight/exp_avg" in tensors
    assert tensors["wte.weight/exp_avg_sq"].shape == (300, 32)
    save_file(tensors, str(tmp_path / "optim.safetensors"))
    (tmp_path / "optim.json").write_text(json.dumps(meta))
    # Resume: a fresh model with the step-3 weights and a fresh optimizer.
    resumed = tiny_model(seed=99)
    resumed.load_state_dict(model.state_dict())
    ropt2 = build_optimizer(resumed, OptimConfig(optimizer="poelm", grad_clip=1.0))
    ropt2.load_full_state_dict(load_file(str(tmp_path / "optim.safetensors")), json.loads((tmp_path / "optim.json").read_text()))
    assert ropt2.step_count == 3 and ropt2.lrm == 1.0
    train(resumed, ropt2, idx, tgt, 2)
    # ... except the lrm: the straight run used 1.0 throughout, the saved one 0.7 for 3 steps.
    straight = tiny_model()
    sopt = build_optimizer(straight, OptimConfig(optimizer="poelm", grad_clip=1.0))
    sopt.set_lrm(0.7)
    train(straight, sopt, idx, tgt, 3)
    sopt.set_lrm(1.0)
    train(straight, sopt, idx, tgt, 2)
    assert all(torch.equal(p, straight.get_parameter(n)) for n, p in resumed.named_parameters())
    assert not torch.equal(ref.wte.weight, straight.wte.weight)  # the lrm really mattered
    # Per-rank state_dict round trip (same world size) as well.
    sd = sopt.state_dict()
    other = build_optimizer(straight, OptimConfig(optimizer="poelm"))
    other.load_state_dict(sd)
    assert other.owned_state_numel() == sopt.owned_state_numel()
    t1, m1 = other.full_state_dict()
    t2, m2 = sopt.full_state_dict()
    assert m1["params"] == m2["params"] and all(torch.equal(t1[k], t2[k]) for k in t2)


def test_owned_state_numel_counts_muon_and_adam():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="poelm"))
    assert opt.owned_state_numel() == 0
    train(model, opt, *batch(), 1)
    groups = {d["name"]: d["group"] for d in opt.layout()}
    muon = sum(p.numel() for n, p in model.named_parameters() if groups[n] == "matrix")
    total = sum(p.numel() for p in model.parameters())
    assert opt.owned_state_numel() == muon + 2 * (total - muon)


def test_load_rejects_mismatched_state():
    a = tiny_model()
    opt = build_optimizer(a, OptimConfig(optimizer="poelm"))
    train(a, opt, *batch(), 1)
    tensors, meta = opt.full_state_dict()
    b = tiny_model(stage_layers=(4,))
    with pytest.raises(CheckpointError, match="stage_heads.1.weight"):
        build_optimizer(b, OptimConfig(optimizer="poelm")).load_full_state_dict(tensors, meta)
    with pytest.raises(CheckpointError, match="missing"):
        build_optimizer(a, OptimConfig(optimizer="poelm")).load_full_state_dict({k: v for k, v in tensors.items() if "wte" not in k}, meta)
    with pytest.raises(CheckpointError, match="format"):
        build_optimizer(a, OptimConfig(optimizer="poelm")).load_full_state_dict(tensors, {"format": "other"})
    with pytest.raises(CheckpointError, match="rank"):
        build_optimizer(a, OptimConfig(optimizer="poelm")).load_state_dict({**opt.state_dict(), "world_size": 2})
