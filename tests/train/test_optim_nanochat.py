"""The reference optimizer (poelm/train/optim_nanochat.py): one step of every group against the
formula written out here, group membership and options, schedules, exact resume, world size 2 ==
world size 1 (gloo), and the reference checkpoint layout (gather / scatter) with its bad inputs."""

import io
import json
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from poelm.config import OptimConfig
from poelm.core.errors import CheckpointError, PoelmError
from poelm.core.model import POELM_OPS, ModelConfig, PoEGPT
from poelm.schedule import Phase
from poelm.train.optim import build_optimizer
from poelm.train.optim_nanochat import gather_reference_state, reference_param_groups, scatter_reference_state
from poelm.train.plan import optimizer_state_numel
from test_optim_dist import free_port, warm_model  # the same warm tiny model as poelm's ZeRO-2 test (same folder)

# A fake model with the reference's parameter set under poelm names (smear / backout included).
E = 16  # n_embd: s = (16 / 768) ** -0.5 = sqrt(48)
SHAPES = {
    "resid_lambdas": (2,), "x0_lambdas": (2,), "wte.weight": (72, E),
    "blocks.0.attn.c_q.weight": (E, E), "blocks.0.attn.c_k.weight": (8, E), "blocks.0.attn.c_v.weight": (8, E),
    "blocks.0.attn.c_proj.weight": (E, E), "blocks.0.mlp.c_fc.weight": (48, E), "blocks.0.mlp.c_proj.weight": (E, 48),
    "blocks.1.attn.c_q.weight": (E, E), "blocks.1.attn.c_k.weight": (8, E), "blocks.1.attn.c_v.weight": (8, E),
    "blocks.1.attn.c_proj.weight": (E, E), "blocks.1.attn.ve_gate.weight": (1, 12),
    "blocks.1.mlp.c_fc.weight": (48, E), "blocks.1.mlp.c_proj.weight": (E, 48),
    "value_embeds.1.weight": (72, 8), "lm_head.weight": (72, E), "stage_heads.0.weight": (72, E), "stage_heads.1.weight": (72, E),
    "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,),
}
CFG = dict(optimizer="nanochat", unembedding_lr=0.5, embedding_lr=3.0, scalar_lr=5.0, matrix_lr=0.5, weight_decay=0.4)
S = (E / 768) ** -0.5
# The reference's AdamW groups, written out: lr, betas, eps, weight decay (setup_optimizer, gpt.py 276c2ac).
ADAMW = {
    "unembedding": (["lm_head.weight", "stage_heads.0.weight", "stage_heads.1.weight"], 0.5 * S, (0.8, 0.96), 1e-10, 0.01),
    "embedding": (["wte.weight"], 3.0 * S, (0.8, 0.995), 1e-10, 0.001),
    "value_embedding": (["value_embeds.1.weight"], 3.0 * S * 0.5, (0.8, 0.995), 1e-10, 0.01),
    "resid": (["resid_lambdas"], 5.0 * 0.01, (0.8, 0.95), 1e-10, 0.05),
    "x0": (["x0_lambdas"], 5.0, (0.96, 0.95), 1e-10, 0.0),
    "smear": (["smear_gate.weight", "smear_lambda", "backout_lambda"], 0.2, (0.8, 0.95), 1e-10, 0.0),
}
MUON = {  # sorted by shape; reference module order inside each
    "matrix_1x12": ["blocks.1.attn.ve_gate.weight"],
    "matrix_8x16": ["blocks.0.attn.c_k.weight", "blocks.0.attn.c_v.weight", "blocks.1.attn.c_k.weight", "blocks.1.attn.c_v.weight"],
    "matrix_16x16": ["blocks.0.attn.c_q.weight", "blocks.0.attn.c_proj.weight", "blocks.1.attn.c_q.weight", "blocks.1.attn.c_proj.weight"],
    "matrix_16x48": ["blocks.0.mlp.c_proj.weight", "blocks.1.mlp.c_proj.weight"],
    "matrix_48x16": ["blocks.0.mlp.c_fc.weight", "blocks.1.mlp.c_fc.weight"],
}
POLAR = [(8.156554524902461, -22.48329292557795, 15.878769915207462), (4.042929935166739, -2.808917465908714, 0.5000178451051316),
         (3.8916678022926607, -2.772484153217685, 0.5060648178503393), (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
         (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


class Fake(torch.nn.Module):
    def __init__(self, shapes=SHAPES, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=g) * 0.5))

    def set_grads(self, seed):
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.grad = torch.randn(p.shape, generator=g)


def fake_state(model, step, seed=3):
    """A known optimizer state after ``step`` steps: random moments (positive second moments)."""
    g = torch.Generator().manual_seed(seed)
    groups = reference_param_groups({n: tuple(p.shape) for n, p in model.named_parameters()}, OptimConfig(**CFG))
    tensors, params, opts = {}, {}, {}
    for grp in groups:
        for n in grp["params"]:
            shape = tuple(dict(model.named_parameters())[n].shape)
            params[n] = {"group": grp["name"], "step": step, "shape": list(shape)}
            if grp["kind"] == "adamw":
                tensors[f"{n}/exp_avg"] = torch.randn(shape, generator=g) * 0.1
                tensors[f"{n}/exp_avg_sq"] = torch.rand(shape, generator=g) * 0.01 + 1e-4
            else:
                r, c = shape
                tensors[f"{n}/momentum_buffer"] = torch.randn(shape, generator=g) * 0.1
                tensors[f"{n}/second_momentum_buffer"] = torch.rand((r, 1) if r >= c else (1, c), generator=g) * 0.02 + 1e-3
        opts[grp["name"]] = {"params": grp["params"]}
    return tensors, {"format": "poelm-optim-nanochat/1", "step": step, "lrm": 1.0, "groups": opts, "params": params}


def one_step(step=2, lrm=0.5):
    model = Fake()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(**CFG))
    tensors, meta = fake_state(model, step)
    opt.load_full_state_dict(tensors, meta)
    opt.set_lrm(lrm)
    model.set_grads(7)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after_state, after_meta = opt.full_state_dict()
    return model, before, grads, tensors, after_state, after_meta


@pytest.mark.parametrize("group", list(ADAMW))
def test_adamw_group_one_step_matches_formula(group):
    model, before, grads, st, new, meta = one_step(step=2, lrm=0.5)
    names, base_lr, (b1, b2), eps, wd = ADAMW[group]
    lr, t = base_lr * 0.5, 3
    assert meta["groups"][group]["initial_lr"] == pytest.approx(base_lr, rel=1e-12)
    assert meta["groups"][group]["betas"] == [b1, b2] and meta["groups"][group]["weight_decay"] == wd
    for n in names:
        p, g = before[n].double(), grads[n].double()
        m, v = st[f"{n}/exp_avg"].double(), st[f"{n}/exp_avg_sq"].double()
        m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        want = p * (1 - lr * wd) - lr / (1 - b1**t) * m1 / ((v1 / (1 - b2**t)).sqrt() + eps)
        got = dict(model.named_parameters())[n].detach().double()
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(new[f"{n}/exp_avg"].double(), m1, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(new[f"{n}/exp_avg_sq"].double(), v1, atol=1e-8, rtol=1e-5)
        assert meta["params"][n]["step"] == t
        assert (got - p).abs().max() > 1e-3  # the step is large enough for the check to bite


def polar_express(G):
    X = G / (G.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR:
        if G.shape[0] > G.shape[1]:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


@pytest.mark.parametrize("group", list(MUON))
def test_muon_group_one_step_matches_formula(group):
    model, before, grads, st, new, meta = one_step(step=2, lrm=0.5)
    lr, mu, beta2, wd = 0.5 * 0.5, 0.95, 0.9, 0.4  # matrix_lr x lrm; setup_optimizer's momentum, beta2
    opts = meta["groups"][group]
    assert (opts["kind"], opts["momentum"], opts["ns_steps"], opts["beta2"], opts["weight_decay"]) == ("muon", mu, 5, beta2, wd)
    assert opts["params"] == MUON[group]
    for n in MUON[group]:
        p, g = before[n].double(), grads[n].double()
        R, C = p.shape
        buf = mu * st[f"{n}/momentum_buffer"].double() + (1 - mu) * g
        X = polar_express((1 - mu) * g + mu * buf)  # Nesterov
        v = (X * X).mean(dim=1, keepdim=True) if R >= C else (X * X).mean(dim=0, keepdim=True)
        sec = beta2 * st[f"{n}/second_momentum_buffer"].double() + (1 - beta2) * v
        Y = X / sec.clamp_min(1e-10).sqrt()
        Y = Y * (X.norm() / Y.norm())  # NorMuon keeps the Frobenius norm
        lr_eff = lr * max(1.0, R / C) ** 0.5
        mask = (Y * p >= 0).double()
        assert 0 < mask.mean() < 1  # both branches of the cautious decay are exercised
        want = p - lr_eff * Y - lr_eff * wd * p * mask
        got = dict(model.named_parameters())[n].detach().double()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(new[f"{n}/momentum_buffer"].double(), buf, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(new[f"{n}/second_momentum_buffer"].double(), sec, atol=1e-7, rtol=1e-4)


def test_groups_order_membership_and_options():
    groups = reference_param_groups(SHAPES, OptimConfig(**CFG))
    assert [g["name"] for g in groups] == list(ADAMW) + list(MUON)
    for g in groups[:6]:
        names, lr, betas, eps, wd = ADAMW[g["name"]]
        assert (g["kind"], g["params"], g["betas"], g["eps"], g["weight_decay"]) == ("adamw", names, betas, eps, wd)
        assert g["lr"] == pytest.approx(lr, rel=1e-12)
    for g in groups[6:]:
        assert (g["kind"], g["params"], g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == \
            ("muon", MUON[g["name"]], 0.5, 0.95, 5, 0.9, 0.4)
    # Without a config: setup_optimizer's defaults; a real model without smear params (poelm's old ops).
    d = {g["name"]: g for g in reference_param_groups(SHAPES)}
    assert d["unembedding"]["lr"] == pytest.approx(0.004 * S) and d["matrix_16x16"]["lr"] == 0.02
    assert d["matrix_16x16"]["weight_decay"] == 0.0 and d["resid"]["lr"] == pytest.approx(0.005)
    m = PoEGPT(ModelConfig(vocab_size=300, depth=4, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=32,
                           stage_layers=(2, 1, 1), **POELM_OPS))
    real = {g["name"]: g["params"] for g in reference_param_groups({n: tuple(p.shape) for n, p in m.named_parameters()})}
    assert real["smear"] == [] and "blocks.1.attn.ve_gate.weight" in real[f"matrix_1x{m.blocks[1].attn.ve_gate.weight.shape[1]}"]
    assert sorted(n for ps in real.values() for n in ps) == sorted(n for n, _ in m.named_parameters())
    with pytest.raises(PoelmError, match="no group"):
        reference_param_groups({**SHAPES, "mystery": (3,)})
    with pytest.raises(PoelmError, match="2-D"):
        reference_param_groups({**SHAPES, "blocks.0.attn.norm": (16,)})


def test_schedules_follow_base_train():
    model = Fake()
    opt = build_optimizer(model, OptimConfig(**CFG))
    phase = Phase(steps=1000, warmup=10, warmdown_ratio=0.5, start_step=100)  # warmdown = last 500 steps
    want = {100: (0.85, 0.4), 300: (0.91, 0.4 * 0.5 * (1 + math.cos(math.pi * 0.2))), 500: (0.97, None), 600: (0.97, 0.2),
            850: (0.935, None), 1100: (0.90, 0.0)}
    for step, (mom, wd) in want.items():
        opt.set_lrm(0.25, step=step, phase=phase)
        g = opt.groups["matrix_16x16"]
        assert g.momentum == pytest.approx(mom, abs=1e-12)
        if wd is not None:
            assert g.weight_decay == pytest.approx(wd, abs=1e-12)
        assert all(x.lr == pytest.approx(x.base_lr * 0.25, rel=1e-15) for x in opt.groups.values())
        assert opt.groups["embedding"].weight_decay == 0.001  # AdamW groups keep theirs
    opt.set_lrm(1.0)  # no phase (a cooldown probe): momentum / wd stay
    assert opt.groups["matrix_16x16"].momentum == pytest.approx(0.90)


def run_steps(model, opt, steps, start=0, phase=Phase(steps=8, warmup=2, warmdown_ratio=0.5)):
    from poelm.schedule import lrm
    idx = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
    for step in range(start, start + steps):
        opt.set_lrm(lrm(step, phase), step=step, phase=phase)
        model.loss(idx[:, :-1], idx[:, 1:])[0].backward()
        opt.step()
        opt.zero_grad()


def test_exact_resume_and_state_accounting(tmp_path):
    cfg = OptimConfig(optimizer="nanochat", weight_decay=0.2, grad_clip=1.0)
    a = warm_model()
    oa = build_optimizer(a, cfg)
    run_steps(a, oa, 5)
    b = warm_model()
    ob = build_optimizer(b, cfg)
    run_steps(b, ob, 3)
    t, meta = ob.full_state_dict()
    save_file(t, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(meta))
    torch.save({n: p.detach() for n, p in b.named_parameters()}, tmp_path / "m.pt")
    c = warm_model()
    c.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=False)
    oc = build_optimizer(c, cfg)
    oc.load_full_state_dict(load_file(str(tmp_path / "o.safetensors")), json.loads((tmp_path / "o.json").read_text()))
    assert oc.groups["matrix_32x32"].momentum == ob.groups["matrix_32x32"].momentum
    run_steps(c, oc, 2, start=3)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert [oa.owned_state_numel()] == optimizer_state_numel(a, 1, optimizer="nanochat")
    assert oa.unsharded_state_numel() == oa.owned_state_numel()
    with pytest.raises(CheckpointError, match="format"):
        build_optimizer(warm_model(), OptimConfig(optimizer="poelm")).load_full_state_dict(t, meta)  # poelm's optimizer refuses it


# ----------------------------------------------------------------------------- two ranks
def worker(rank, world, port, d):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        cfg = OptimConfig(optimizer="nanochat", weight_decay=0.2, grad_clip=1.0)
        m = warm_model()
        o = build_optimizer(m, cfg, world_size=world, rank=rank)
        idx = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
        rows = slice(2 * rank, 2 * rank + 2)
        for step in range(3):
            o.set_lrm(1.0, step=step, phase=Phase(steps=8, warmup=0))
            m.loss(idx[rows, :-1], idx[rows, 1:])[0].backward()
            o.step()
            o.zero_grad()
        save_file({n: p.detach().contiguous() for n, p in m.named_parameters()}, f"{d}/p_r{rank}.safetensors")
        t, meta = o.full_state_dict(all_ranks=True)
        save_file(t, f"{d}/o_r{rank}.safetensors")
        (d / f"meta_r{rank}.json").write_text(json.dumps({"meta": meta, "owned": o.owned_state_numel()}))
    finally:
        dist.destroy_process_group()


def one_rank(micro: bool):
    """The 1-process run of ``worker``'s 3 steps, on one thread like each rank. ``micro``: the
    batch as the ranks see it, two half batches with their losses halved (x0.5 is exact, so the
    accumulated gradient is bitwise the ranks' ``(g0 + g1) / 2``); else one whole-batch mean."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = OptimConfig(optimizer="nanochat", weight_decay=0.2, grad_clip=1.0)
        one = warm_model()
        o1 = build_optimizer(one, cfg)
        idx = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
        for step in range(3):
            o1.set_lrm(1.0, step=step, phase=Phase(steps=8, warmup=0))
            for rows in ((slice(0, 2), slice(2, 4)) if micro else (slice(0, 4),)):
                (one.loss(idx[rows, :-1], idx[rows, 1:])[0] * (0.5 if micro else 1.0)).backward()
            o1.step()
            o1.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return one, o1


def test_two_ranks_equal_one(tmp_path):
    """2 gloo ranks == 1 process. Tolerance, measured in the test rather than fixed: the 1-process
    reference takes the ranks' half batches (same gradient bits, see ``one_rank``), so what is left
    is the order of the clip norm's sum over shards and Muon's stack sizes, each ~1 ulp. The bound
    is the drift that one such rounding of the gradient grows into over the 3 steps: the distance
    of the whole-batch run (the same gradient, summed in another order) from the half-batch one,
    per group. Before (a fixed 2e-6 against the whole-batch run on the default thread count) the
    test failed once in a fresh venv at 2.9e-6: the 1-process run's thread count changes its
    matmul rounding. Measured here: ranks vs half-batch 1.0e-7 (matrices) / 4.6e-6 (embeddings);
    the bound 2.0e-6 / 2.0e-5. A sharding bug (a wrong row, a missing reduction) moves weights by
    O(lr) = 1e-2, far past it."""
    one, o1 = one_rank(micro=True)
    whole, _ = one_rank(micro=False)
    t1, m1 = o1.full_state_dict()
    mp.spawn(worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    p0, p1 = (load_file(str(tmp_path / f"p_r{r}.safetensors")) for r in range(2))
    assert all(torch.equal(p0[n], p1[n]) for n in p0)  # replicas agree bitwise
    embedding = ("wte.", "value_embeds.")  # AdamW at lr 1.47 dividing by |g|: the largest drift
    ref, alt = dict(one.named_parameters()), dict(whole.named_parameters())
    for group in (True, False):
        names = [n for n in ref if n.startswith(embedding) == group]
        err = max((p0[n] - ref[n].detach()).abs().max().item() for n in names)
        bound = max((alt[n] - ref[n]).detach().abs().max().item() for n in names)
        assert 0 < bound < 1e-3, f"rounding envelope {bound:.2e} out of its expected range"
        assert err <= bound, f"{'embedding' if group else 'other'} params: 2 ranks vs 1 process {err:.2e} > envelope {bound:.2e}"
    t2 = load_file(str(tmp_path / "o_r0.safetensors"))
    info = [json.loads((tmp_path / f"meta_r{r}.json").read_text()) for r in range(2)]
    assert t2.keys() == t1.keys() and info[0]["meta"]["params"] == m1["params"] and info[0]["meta"]["step"] == 3
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=2e-5, rtol=1e-3)
    assert sum(i["owned"] for i in info) < 1.6 * o1.owned_state_numel()  # sharded, not replicated
    assert [i["owned"] for i in info] == optimizer_state_numel(one, 2, optimizer="nanochat")


# ----------------------------------------------------------------------------- reference checkpoints
RSHAPES = SHAPES  # wte / lm_head / stage heads (1152 elements) are row-sharded, value_embeds (576) replicated


def trained_state():
    model = Fake(RSHAPES)
    opt = build_optimizer(model, OptimConfig(**CFG))
    for seed in (1, 2):
        opt.set_lrm(0.5, step=seed, phase=Phase(steps=10, warmup=0))
        model.set_grads(seed)
        opt.step()
    return opt.full_state_dict()


def weights_only_copy(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_scatter_layout_and_gather_round_trip_bitwise(world):
    tensors, meta = trained_state()
    ranks = [weights_only_copy(sd) for sd in scatter_reference_state(tensors, meta, RSHAPES, world)]
    groups = reference_param_groups(RSHAPES)
    index = {n: i for i, n in enumerate(n for g in groups for n in g["params"])}
    for r, sd in enumerate(ranks):
        assert [pg["params"] for pg in sd["param_groups"]] == [[index[n] for n in g["params"]] for g in groups]
        assert sd["param_groups"][0]["betas"] == (0.8, 0.96) and sd["param_groups"][6]["kind"] == "muon"
        wte = sd["state"][index["wte.weight"]]  # 1152 elements: rows [24 r, 24 (r+1)) of 72 at W = 3
        rows = 72 // world
        assert wte["step"] == 2 and torch.equal(wte["exp_avg"], tensors["wte.weight/exp_avg"][r * rows:(r + 1) * rows])
        ve = sd["state"][index["value_embeds.1.weight"]]  # 576 elements: replicated
        assert torch.equal(ve["exp_avg_sq"], tensors["value_embeds.1.weight/exp_avg_sq"])
        kv = MUON["matrix_8x16"]  # K = 4: chunks of ceil(4 / W), zero-padded past K
        st = sd["state"][index[kv[0]]]
        chunk = -(-4 // world)
        assert st["momentum_buffer"].shape == (chunk, 8, 16) and st["second_momentum_buffer"].shape == (chunk, 1, 16)  # wide: per column
        assert set(st) == {"momentum_buffer", "second_momentum_buffer"} and index[kv[1]] not in sd["state"]
        for j in range(chunk):
            k = r * chunk + j
            want = tensors[f"{kv[k]}/momentum_buffer"] if k < 4 else torch.zeros(8, 16)
            assert torch.equal(st["momentum_buffer"][j], want)
        wide = sd["state"][index[MUON["matrix_16x48"][0]]]["second_momentum_buffer"]
        assert wide.shape == (-(-2 // world), 1, 48)
    t2, m2 = gather_reference_state(ranks, RSHAPES, world)
    assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) and t2[k].dtype == tensors[k].dtype for k in tensors)
    assert {k: v for k, v in m2.items() if k != "grad_clip"} == {k: v for k, v in meta.items() if k != "grad_clip"}
    t3, m3 = gather_reference_state(scatter_reference_state(t2, m2, RSHAPES, world), RSHAPES, world)
    assert m3 == m2 and all(torch.equal(t3[k], t2[k]) for k in t2)
    if world == 1:  # torch's own Optimizer.load_state_dict accepts the layout
        params = dict(Fake(RSHAPES).named_parameters())
        ref = torch.optim.Optimizer([dict(g, params=[params[n] for n in g["params"]]) for g in groups], defaults={})
        ref.load_state_dict(ranks[0])
        assert ref.param_groups[6]["initial_lr"] == 0.5 and len(ref.state) == 10 + 5  # every AdamW param, one per Muon group


def test_gather_into_optimizer_resumes_identically():
    tensors, meta = trained_state()
    t2, m2 = gather_reference_state(scatter_reference_state(tensors, meta, RSHAPES, 3), RSHAPES, 3)
    a, b = Fake(RSHAPES, seed=4), Fake(RSHAPES, seed=4)
    oa, ob = build_optimizer(a, OptimConfig(**CFG)), build_optimizer(b, OptimConfig(**CFG))
    oa.load_full_state_dict(tensors, meta)
    ob.load_full_state_dict(t2, m2)
    for m in (a, b):
        m.set_grads(9)
    oa.step()
    ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_shard_sets_raise():
    tensors, meta = trained_state()
    ranks = scatter_reference_state(tensors, meta, RSHAPES, 2)
    with pytest.raises(CheckpointError, match="missing or extra"):
        gather_reference_state(ranks[:1], RSHAPES, 2)
    wte = 3  # reference index of wte: after lm_head and the two stage heads
    cut = [dict(sd, state=dict(sd["state"])) for sd in ranks]
    del cut[1]["state"][wte]
    with pytest.raises(CheckpointError, match=r"wte.weight is missing on rank\(s\) \[1\]"):
        gather_reference_state(cut, RSHAPES, 2)
    bad = [dict(sd, state=dict(sd["state"])) for sd in ranks]
    bad[0]["state"][wte] = dict(bad[0]["state"][wte], exp_avg=torch.zeros(72, 16))
    with pytest.raises(CheckpointError, match=r"wte.weight/exp_avg on rank 0 is \(72, 16\), expected shape \(36, 16\)"):
        gather_reference_state(bad, RSHAPES, 2)
    odd = [dict(sd, param_groups=sd["param_groups"][:-1]) for sd in ranks]
    with pytest.raises(CheckpointError, match="unknown group layout"):
        gather_reference_state(odd, RSHAPES, 2)
    with pytest.raises(CheckpointError, match="unknown group layout"):
        gather_reference_state(ranks, {**RSHAPES, "smear_lambda": (1,), "blocks.2.attn.c_q.weight": (16, 16)}, 2)
    with pytest.raises(CheckpointError, match="not a torch optimizer state dict"):
        gather_reference_state([ranks[0], {"weights": 1}], RSHAPES, 2)
    with pytest.raises(CheckpointError, match="not divisible by world size 5"):
        scatter_reference_state(tensors, meta, RSHAPES, 5)
    partial = dict(meta, params=dict(meta["params"], **{MUON["matrix_8x16"][1]: dict(meta["params"][MUON["matrix_8x16"][1]], step=0)}))
    part_t = {k: v for k, v in tensors.items() if not k.startswith(MUON["matrix_8x16"][1] + "/")}
    with pytest.raises(CheckpointError, match="state for 3 of its 4 matrices"):
        scatter_reference_state(part_t, partial, RSHAPES, 1)
    with pytest.raises(CheckpointError, match="missing"):
        scatter_reference_state({k: v for k, v in tensors.items() if k != "wte.weight/exp_avg"}, meta, RSHAPES, 1)


# ----------------------------------------------------------------------------- the training loop
def test_training_loop_resumes_nanochat_optimizer_bitwise(tmp_path):
    import shutil

    from poelm import config
    from poelm.train import checkpoint
    from poelm.train import loop as train
    from poelm.train.plan import plan

    tiny = ["model.vocab_size=320", "model.depth=2", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1",
            "model.intermediate=64", "model.max_seq_len=32", "model.stage_layers=[1,1]", "train.seq_len=32",
            "train.device_batch_size=2", "train.eval_every=0", "train.log_every=1", "data.tokenizer_train_chars=100000",
            "schedule.steps=4", "schedule.warmup=1", "schedule.warmdown_ratio=0.5", "train.save_every=2",
            "optim.optimizer=nanochat", "optim.weight_decay=0.1"]
    cfg = config.load("embedded", tiny)
    straight, half = tmp_path / "straight", tmp_path / "half"
    train.train(cfg, straight, progress=False)
    half.mkdir()
    shutil.copytree(straight / "step-00002", half / "step-00002")
    shutil.copy(straight / "tokenizer.json", half / "tokenizer.json")
    train.train(checkpoint.load(half / "step-00002").config, half, resume=half / "step-00002", progress=False)
    for name in ("model.safetensors", "optim.safetensors"):
        a, b = (load_file(str(d / "step-00004" / name)) for d in (straight, half))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((straight / "step-00004" / "optim.json").read_text())
    assert meta["format"] == "poelm-optim-nanochat/1" and meta["step"] == 4
    # momentum at the last update (rel 3): base_train checks its 400-step warmup first
    assert meta["groups"]["matrix_32x32"]["momentum"] == pytest.approx(0.85 * (1 - 3 / 400) + 0.97 * 3 / 400)
    assert meta["groups"]["matrix_32x32"]["weight_decay"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    model = PoEGPT(cfg.model)
    cfg.train.tokens_per_step = 0  # one micro-batch per rank, whatever the world size
    p = plan(cfg, 2)
    assert p["memory"]["optimizer_state"] == 4 * max(optimizer_state_numel(model, 2, optimizer="nanochat"))
    with pytest.raises(Exception, match="optim.optimizer"):
        config.load("embedded", tiny + ["optim.optimizer=adam"])


def test_vocab_padding_rows_cut_and_restored():
    from poelm.train.optim_nanochat import resize_vocab_rows

    tensors, meta = trained_state()  # 72 rows stand for the reference's padded vocabulary
    sd = scatter_reference_state(tensors, meta, SHAPES, 2)  # wte etc.: the model's 72 rows
    padded = {n: (128, *s[1:]) if s[0] == 72 else s for n, s in SHAPES.items()}
    t128, m128 = resize_vocab_rows(tensors, meta, 128)
    assert torch.equal(t128["wte.weight/exp_avg"][72:], torch.zeros(56, 16))
    assert m128["params"]["lm_head.weight"]["shape"] == [128, 16] and m128["params"]["resid_lambdas"] == meta["params"]["resid_lambdas"]
    ranks = scatter_reference_state(t128, m128, padded, 2)
    assert ranks[1]["state"][3]["exp_avg"].shape == (64, 16) and sd[1]["state"][3]["exp_avg"].shape == (36, 16)
    back, bmeta = resize_vocab_rows(*gather_reference_state(ranks, padded, 2), 72)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors) and bmeta["params"] == meta["params"]
    with pytest.raises(CheckpointError, match="non-zero rows past 50"):
        resize_vocab_rows(tensors, meta, 50)


def test_bf16_compute_path_as_on_cuda():
    # On CUDA the reference orthogonalizes in bf16 and casts lr, wd and beta2 to bf16 (0.9 -> 0.8984375).
    from poelm.train.nanochat_rules import muon_update, normuon_scale, polar_express

    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    X = polar_express(grad, dtype=torch.bfloat16)
    sv = torch.linalg.svdvals(X.float())
    assert X.dtype == torch.bfloat16 and sv.min() > 0.8 and sv.max() < 1.2  # orthogonalized, at bf16 accuracy
    q = p.clone()
    muon_update(q, grad, torch.zeros(24, 8), torch.zeros(24, 1), 0.02, 0.95, 0.0, 5, 0.9, dtype=torch.bfloat16)
    assert q.dtype == torch.float32 and 0 < (q - p).abs().max() < 0.2  # fp32 master weights, a bounded step
    for dt, w in ((torch.bfloat16, 0.1015625), (torch.float32, float(1 - torch.tensor(0.9)))):  # 1 - bf16(0.9) = 0.1015625
        sec = torch.zeros(4, 1)
        normuon_scale(torch.full((4, 3), 0.5, dtype=dt), sec, 0.9)
        assert torch.equal(sec, torch.full((4, 1), 0.25 * w, dtype=torch.float32))


def test_lr_scale_multiplies_every_group():
    plain = reference_param_groups(SHAPES, OptimConfig(**CFG))
    scaled = reference_param_groups(SHAPES, OptimConfig(**CFG, lr_scale=0.7))
    assert [g["lr"] for g in reference_param_groups(SHAPES, OptimConfig(**CFG, lr_scale=1.0))] == [g["lr"] for g in plain]
    for a, b in zip(plain, scaled):
        assert b["lr"] == pytest.approx(a["lr"] * 0.7, rel=1e-15), a["name"]  # smear's fixed 0.2 included


@pytest.mark.parametrize("local", [False, True])
def test_backout_lambda_step_count_advances_like_the_reference(local):
    # The reference adds 0 x backout_lambda.sum() to its loss: the scalar gets a zero gradient, so
    # its AdamW step count advances with every other parameter's (and it never moves).
    torch.manual_seed(0)
    m = PoEGPT(ModelConfig(vocab_size=300, depth=4, n_embd=32, n_head=2, n_kv_head=1, intermediate=64, max_seq_len=32,
                           stage_layers=(2, 2), backout=True))
    opt = build_optimizer(m, OptimConfig(optimizer="nanochat"))
    idx = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    before = m.backout_lambda.detach().clone()
    for _ in range(2):
        if local:
            m.backward_local(idx[:, :-1], idx[:, 1:])
        else:
            m.loss(idx[:, :-1], idx[:, 1:])[0].backward()
        opt.step()
        opt.zero_grad()
    steps = {s.name: opt.param_steps[s.index] for s in opt.slots if s.kind == "adamw"}
    assert steps["backout_lambda"] == 2 and set(steps.values()) == {2}
    assert torch.equal(m.backout_lambda.detach(), before)
