"""Generation engine: every mode against the cache-free model, cache exactness, sampling law, errors."""

import math

import pytest
import torch
from scipy.stats import chisquare

from poelm.core import poe
from poelm.core.errors import PoelmError
from poelm.cli import TextStream
from poelm.infer.engine import DecodeOptions, Engine, Sampler, parse_mode, wand_bounds_from
from poelm.core.model import POELM_OPS, REFERENCE_OPS, KVCache, ModelConfig, PoEGPT

# The reference's ops with a 5-key short window, so every generation runs past the window.
REF = {**REFERENCE_OPS, "short_window": 5}
OPS = pytest.mark.parametrize("ops", [POELM_OPS, REF], ids=["poelm-ops", "reference-ops"])


def make(seed=0, V=64, stage_layers=(2, 1, 1), head_noise=0.3, d=32, max_seq_len=48, scale=3.0, late=1.0, ops=POELM_OPS):
    """A tiny model with every weight random (init_weights zeroes c_proj and the stage heads, which
    would make every stage predict alike). ``head_noise`` scales the per-stage heads relative to
    the shared head: the larger, the more the stages disagree (lower speculative acceptance);
    ``late`` scales the output projections of the blocks after stage 0 (small: later stages
    barely change the stream, so stages agree and WAND exits early). ``ops``: poelm's earlier
    model unless given (the seeds below were chosen on it; ``OPS`` runs both)."""
    cfg = ModelConfig(vocab_size=V, depth=sum(stage_layers), n_embd=d, n_head=4, n_kv_head=2, intermediate=2 * d,
                      max_seq_len=max_seq_len, stage_layers=stage_layers, **ops)
    m = PoEGPT(cfg)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "value_embeds")):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        if cfg.smear:
            m.smear_lambda.fill_(0.7)  # init's 0 would make the smear a no-op
        m.lm_head.weight.mul_(scale)
        for h in m.stage_heads:
            h.weight.mul_(scale * head_noise)
        for b in m.blocks[stage_layers[0]:]:
            b.attn.c_proj.weight.mul_(late)
            b.mlp.c_proj.weight.mul_(late)
    return m.eval()


def prompts_for(V, n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def filled_cache_matches_plain_forward(model, st, seq):
    """Every filled position of every layer equals a plain cache-free full forward's K/V."""
    ref = KVCache(model.config, seq.size(0), st.cache.max_len)
    n = max(st.cache.lengths)
    with torch.no_grad():
        model.hiddens(seq[:, :n], cache=ref, detach=False)
    for layer, L in enumerate(st.cache.lengths):
        assert torch.allclose(st.cache.k[layer, :, :, :L], ref.k[layer, :, :, :L], atol=1e-5), layer
        assert torch.allclose(st.cache.v[layer, :, :, :L], ref.v[layer, :, :, :L], atol=1e-5), layer


# ----------------------------------------------------------------------------- greedy equalities
@OPS
def test_speculative_greedy_equals_full_at_every_acceptance_count_with_exact_rollback(ops):
    hist = [0] * 5
    for seed, noise in ((0, 0.15), (1, 0.4), (2, 0.8)):
        model = make(seed=seed, head_noise=noise, ops=ops)
        eng = Engine(model)
        for i, p in enumerate(prompts_for(64, 6, [1, 3, 7, 12], seed=seed)):
            n = 5 + 4 * i
            full = eng.generate(p, n, mode="full")
            spec = eng.generate(p, n, mode="speculative", m=4)
            assert spec.tokens == full.tokens
            assert spec.stats["mean_depth"] == 3.0
            hist = [a + b for a, b in zip(hist, spec.stats["accept_hist"])]
            s = spec.stats
            assert s["accepted"] == sum(k * c for k, c in enumerate(s["accept_hist"]))
            assert math.isclose(s["acceptance"], s["accepted"] / s["proposed"])
            # roll-back left exactly the fed positions, equal to a plain forward's
            (rows, st), = eng.last_states
            fed = len(p) + n - 1
            assert st.cache.lengths == [fed] * model.config.depth
            seq = torch.tensor([p + spec.tokens[0]])
            filled_cache_matches_plain_forward(model, st, seq)
    assert all(c > 0 for c in hist), hist  # every acceptance count 0..4 was exercised


@OPS
def test_speculative_batch_equals_full_batch_and_single_rows(ops):
    model = make(seed=3, head_noise=0.3, ops=ops)
    eng = Engine(model)
    ps = prompts_for(64, 5, [4, 4, 6, 4, 9], seed=3)  # ragged: three length groups
    full = eng.generate(ps, 17, mode="full")
    for m in (1, 2, 4, 7):
        assert eng.generate(ps, 17, mode="speculative", m=m).tokens == full.tokens
    assert [eng.generate(p, 17).tokens[0] for p in ps] == full.tokens


@pytest.mark.parametrize("kw", [dict(draft=2), dict(draft=3), dict(m="auto"), dict(m="auto", draft=2)], ids=str)
def test_speculative_prefix_drafts_and_auto_m_equal_full(kw):
    """Drafting with the PoE of stages 0..J-1 (verify with J..K-1) and a draft length chosen each
    round from the measured acceptance: greedy output is still full's, batch included."""
    model = make(seed=3, head_noise=0.3)
    eng = Engine(model)
    ps = prompts_for(64, 4, [4, 1, 7, 3], seed=5)
    full = eng.generate(ps, 25, mode="full").tokens
    res = eng.generate(ps, 25, mode="speculative", **kw)
    assert res.tokens == full
    assert [eng.generate(p, 25, mode="speculative", **kw).tokens[0] for p in ps] == full
    s = res.stats
    assert s["accepted"] == sum(k * c for k, c in enumerate(s["accept_hist"])) and sum(s["m_hist"]) == s["rounds"]
    if kw.get("draft") == 3:
        assert s["acceptance"] == 1.0  # the full model drafting for itself
    if kw.get("m") == "auto":
        assert len(s["m_hist"]) == 9 and sum(s["m_hist"][1:]) > 0


def test_choose_m_by_hand():
    from poelm.infer.speculative import choose_m

    assert choose_m(0, 100, 8, 0.5) == 1  # drafts almost never accepted: the shortest round
    assert choose_m(1000, 0, 8, 0.1) == 8  # always accepted, cheap drafts: the longest
    # a = 8/10 = 0.8, cd = 0.5: tokens/cost 1.8/1.5 = 1.2, 2.44/2 = 1.22, 2.952/2.5 = 1.18 -> m = 2
    assert choose_m(7, 1, 8, 0.5) == 2


def test_wand_with_infinite_bounds_is_full():
    model = make(seed=4, stage_layers=(1, 1, 1, 1))
    eng = Engine(model)
    ps = prompts_for(64, 4, [2, 5], seed=4)
    full = eng.generate(ps, 20, mode="full")
    wand = eng.generate(ps, 20, mode="wand", bounds=[math.inf] * 3)
    assert wand.tokens == full.tokens
    assert wand.stats["mean_depth"] == 4.0


def test_single_stage_model_every_mode_is_the_plain_gpt():
    model = make(seed=15, stage_layers=(3,))
    eng = Engine(model)
    ps = prompts_for(64, 2, [3], seed=15)
    full = eng.generate(ps, 10).tokens
    assert eng.generate(ps, 10, mode="speculative", m=3).tokens == full
    assert eng.generate(ps, 10, mode="wand", bounds=[]).tokens == full
    assert eng.generate(ps, 10, mode="stage=0").tokens == full


def test_route_tau_extremes_are_stage0_and_full():
    model = make(seed=5)
    eng = Engine(model)
    ps = prompts_for(64, 3, [3], seed=5)
    assert eng.generate(ps, 12, mode="route", tau=0.0).tokens == eng.generate(ps, 12, mode="stage=0").tokens
    r = eng.generate(ps, 12, mode="route", tau=1.0)
    assert r.tokens == eng.generate(ps, 12, mode="full").tokens and r.stats["mean_depth"] == 3.0


def test_wand_with_certified_bounds_exits_early_and_still_equals_full():
    """Bounds >= the true range(delta_s) at every decoded position certify each exit (SPEC WAND):
    the tokens must equal full's while some positions stop before the last stage."""
    model = make(seed=6, head_noise=0.05, stage_layers=(1, 1, 1), late=0.1)
    eng = Engine(model)
    p = prompts_for(64, 1, [4], seed=6)[0]
    full = eng.generate(p, 24, mode="full")
    seq = torch.tensor([p + full.tokens[0]])
    with torch.no_grad():
        z = model.stage_log_probs(seq)[:, 0, len(p) - 1 : -1]  # [K, T, V] at the decoded positions
    bounds = (poe.wand_ranges(z).amax(dim=1) * 1.001).tolist()
    wand = eng.generate(p, 24, mode="wand", bounds=bounds)
    assert wand.tokens == full.tokens
    assert wand.stats["mean_depth"] < 3.0


# ----------------------------------------------------------------------------- padded batches
MODES = [dict(mode="full"), dict(mode="stage=0"), dict(mode="stage=1"), dict(mode="prefix=2"), dict(mode="wand", bounds=[1.0, 0.5]),
         dict(mode="route", tau=0.5), dict(mode="speculative", m=1), dict(mode="speculative", m=3), dict(mode="speculative", m=6)]


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@OPS
def test_left_padded_batch_equals_each_prompt_alone(kw, ops):
    """Five prompts of lengths 1..9 in one batch (no regrouping by length): each row's tokens,
    exit depths and per-round accepted counts are those it gets alone."""
    model = make(seed=3, head_noise=0.3, ops=ops)
    eng = Engine(model)
    ps = prompts_for(64, 5, [4, 1, 9, 6, 2], seed=3)
    batch = eng.generate(ps, 20, **kw)
    (rows, st), = eng.last_states
    assert rows == list(range(5)) and st.ragged  # one padded batch
    alone = [eng.generate(p, 20, **kw) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.depths == [a.depths[0] for a in alone]
    assert batch.accepted == [a.accepted[0] for a in alone]
    if kw["mode"] in ("wand", "route"):
        assert len({d for row in batch.depths for d in row}) > 1  # rows exit at different depths in one batch
    if kw["mode"] == "speculative" and kw["m"] > 1:
        assert len({tuple(r) for r in batch.accepted}) > 1  # rows keep their own accepted counts


@OPS
def test_speculative_holes_and_repacking_keep_every_row_exact(monkeypatch, ops):
    """No slack for holes: the cache is repacked again and again; tokens and accepted counts stay
    each row's own, and right after every repack each live row's valid slots hold exactly the
    positions 0.. and the K/V of that row alone."""
    import poelm.infer.engine as engine_mod

    monkeypatch.setattr(engine_mod, "SPEC_SLACK_ROUNDS", 0)
    snaps = []
    compact = engine_mod.DecodeState.compact

    def recording(self, live):
        n = compact(self, live)
        for b in live.nonzero().flatten().tolist():
            slots = self.valid[b, :n].nonzero().flatten()
            snaps.append((b, self.tok[b, slots].tolist(), self.posid[b, slots].tolist(), self.cache.k[:, b][:, :, slots].clone(),
                          self.cache.v[:, b][:, :, slots].clone()))
        return n

    monkeypatch.setattr(engine_mod.DecodeState, "compact", recording)
    model = make(seed=3 if ops is POELM_OPS else 4, head_noise=0.3, ops=ops)  # seed 4: enough rejections to repack twice
    eng = Engine(model)
    ps = prompts_for(64, 4, [3, 8, 1, 5], seed=4)
    res = eng.generate(ps, 30, mode="speculative", m=3)
    assert res.stats["compactions"] > 1 and len({b for b, *_ in snaps}) == 4
    alone = [eng.generate(p, 30, mode="speculative", m=3) for p in ps]
    assert res.tokens == [a.tokens[0] for a in alone] and res.accepted == [a.accepted[0] for a in alone]
    for b, toks, pos, k, v in snaps:
        assert toks == (ps[b] + res.tokens[b])[: len(toks)] and pos == list(range(len(toks)))
        ref = KVCache(model.config, 1, 64)
        with torch.no_grad():
            model.hiddens(torch.tensor([toks]), cache=ref, detach=False)
        assert torch.allclose(k, ref.k[:, 0, :, : len(toks)], atol=1e-5)
        assert torch.allclose(v, ref.v[:, 0, :, : len(toks)], atol=1e-5)


@pytest.mark.parametrize("kw", [dict(mode="full"), dict(mode="speculative", m=3), dict(mode="wand", bounds=[math.inf] * 2), dict(mode="stage=0")],
                         ids=lambda kw: kw["mode"])
def test_min_new_tokens_bans_stop_tokens_until_reached(kw):
    model = make(seed=12)
    eng = Engine(model)
    ps = prompts_for(64, 3, [4, 2, 6], seed=12)
    free = eng.generate(ps, 12, **kw)
    stop = free.tokens[0][1]  # row 0 would stop at its second token
    short = eng.generate(ps, 12, stop_tokens=[stop], **kw)
    assert short.tokens[0] == free.tokens[0][:2]
    res = eng.generate(ps, 12, stop_tokens=[stop], min_new_tokens=6, **kw)
    for row in res.tokens:
        assert stop not in row[:6] and (stop not in row or row.index(stop) == len(row) - 1)
    # the banned decoding is greedy decoding of the PoE with the stop token's log-prob at -inf
    stages = {"full": None, "speculative": None, "wand": None, "stage=0": 0}[kw["mode"]]
    for p, row in zip(ps, res.tokens):
        with torch.no_grad():
            logp = model(torch.tensor([p + row]), stages=stages)[0, len(p) - 1 : -1]
        logp[:6, stop] = -math.inf
        assert row == logp.argmax(-1).tolist()
    assert len(res.tokens[0]) > 2


def test_global_seed_follows_torch_manual_seed():
    model = make(seed=9)
    eng = Engine(model)
    ps = prompts_for(64, 2, [3, 5], seed=9)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(eng.generate(ps, 10, temperature=1.0, seed="global").tokens)
    assert runs[0] == runs[1]
    torch.manual_seed(6)
    assert eng.generate(ps, 10, temperature=1.0, seed="global").tokens != runs[0]


# ----------------------------------------------------------------------------- step logits vs cache-free model
@pytest.mark.parametrize("mode,stages", [("stage=0", 0), ("stage=1", 1), ("stage=2", 2), ("prefix=1", range(1)), ("prefix=2", range(2)), ("full", None)])
@OPS
def test_step_log_probs_equal_cache_free_model(mode, stages, ops):
    model = make(seed=7, ops=ops)
    ps = prompts_for(64, 2, [5], seed=7)
    res = Engine(model).generate(ps, 9, mode=mode, return_logprobs=True)
    for r in range(2):
        seq = torch.tensor([ps[r] + res.tokens[r]])
        with torch.no_grad():
            ref = model(seq, stages=stages)[0, len(ps[r]) - 1 : -1]
        got = torch.stack(res.logprobs[r])
        assert torch.allclose(got, ref, atol=1e-5)
        assert res.tokens[r] == ref.argmax(-1).tolist()  # greedy picks each step's argmax
    deepest = {"stage=0": 0, "stage=1": 1, "stage=2": 2, "prefix=1": 0, "prefix=2": 1, "full": 2}[mode]
    st = Engine(model)
    st.generate(ps, 3, mode=mode)
    lengths = [st.last_states[0][1].filled(s) for s in range(3)]
    assert all(n > 0 for n in lengths[: deepest + 1]) and all(n == 0 for n in lengths[deepest + 1 :])  # later stages never run


# ----------------------------------------------------------------------------- WAND catch-up
@OPS
def test_wand_catch_up_fills_skipped_stages_exactly(ops):
    model = make(seed=8, head_noise=0.2, stage_layers=(1, 1, 1, 1), ops=ops)
    eng = Engine(model)
    ps = prompts_for(64, 3, [6], seed=8)
    res = eng.generate(ps, 30, mode="wand", bounds=[1.0, 0.5, 0.25])
    hist = res.stats["depth_hist"]
    assert hist[0] > 0 and hist[-1] > 0, hist  # early exits, and deeper positions after them
    (rows, st), = eng.last_states
    seq = torch.tensor([p + t for p, t in zip(ps, res.tokens)])
    filled_cache_matches_plain_forward(model, st, seq)
    # each position went through each stage at most once (catch-up in chunks, nothing recomputed)
    assert res.stats["stage_positions"] == [st.filled(s) for s in range(4)]
    assert st.filled(3) > 6  # the last stage caught up past the prompt


# ----------------------------------------------------------------------------- sampling
def test_sampler_top_k_top_p_temperature_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(1.0, None, None, torch.Generator())
    assert torch.allclose(s.probs(logp), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(Sampler(1.0, 2, None, None).probs(logp), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p 0.8: 0.5 (before: 0) and 0.3 (before: 0.5) stay; 0.15 has 0.8 before it and goes
    assert torch.allclose(Sampler(1.0, None, 0.8, None).probs(logp), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(Sampler(1.0, None, 0.81, None).probs(logp), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    t2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 0.5
    assert torch.allclose(Sampler(2.0, None, None, None).probs(logp), (t2 / t2.sum())[None])


def test_seeded_sampling_is_reproducible_and_streams_in_order():
    model = make(seed=9)
    eng = Engine(model)
    ps = prompts_for(64, 2, [3], seed=9)
    seen = []
    a = eng.generate(ps, 15, temperature=1.0, top_k=20, seed=11, on_token=lambda r, t: seen.append((r, t)))
    b = eng.generate(ps, 15, temperature=1.0, top_k=20, seed=11)
    assert a.tokens == b.tokens and a.tokens != eng.generate(ps, 15, temperature=1.0, top_k=20, seed=12).tokens
    assert [t for r, t in seen if r == 0] == a.tokens[0] and [t for r, t in seen if r == 1] == a.tokens[1]
    assert list(eng.stream(ps, 15, temperature=1.0, top_k=20, seed=11)) == seen
    c = eng.generate(ps, 15, mode="speculative", temperature=1.0, seed=3)
    assert c.tokens == eng.generate(ps, 15, mode="speculative", temperature=1.0, seed=3).tokens


def _exact_joint(model, prompt, T, top_k=None):
    """P(x1, x2, x3 | prompt) of full sampling, [V, V, V], from cache-free forwards."""
    V = model.config.vocab_size
    s = Sampler(T, top_k, None, None)
    with torch.no_grad():
        p1 = s.probs(model(torch.tensor([prompt]))[0, -1])
        seq2 = torch.tensor([prompt + [a] for a in range(V)])
        p2 = s.probs(model(seq2)[:, -1])  # [x1, x2]
        seq3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = s.probs(model(seq3)[:, -1]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _stage0_joint(model, prompt, T):
    """The same law if stage 0 alone generated x2 and x3 (the speculative draft's law)."""
    V = model.config.vocab_size
    s = Sampler(T, None, None, None)
    with torch.no_grad():
        p1 = s.probs(model(torch.tensor([prompt]))[0, -1])
        p2 = s.probs(model(torch.tensor([prompt + [a] for a in range(V)]), stages=0)[:, -1])
        seq3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = s.probs(model(seq3, stages=0)[:, -1]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_p(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    obs = counts[keep].double().numpy()
    exp = probs[keep].double().numpy()
    exp = exp / exp.sum() * obs.sum()
    return chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue


def test_speculative_sampling_preserves_the_full_distribution():
    """(x2, x3) come from one speculative round (m=1: a draft, then a bonus or a correction).
    Their empirical law matches the full model's exactly computed law (chi-square), and the test
    has power: the stage-0 draft law is rejected by the same samples."""
    model = make(seed=10, V=6, head_noise=1.0, scale=1.5, stage_layers=(1, 1, 1))
    V, prompt, T = 6, [1, 2], 1.0
    eng = Engine(model)
    # one big lockstep batch (rows cut short by others' rejections keep their accepted draft) ...
    res = eng.generate([prompt] * 6000, 3, mode="speculative", m=1, temperature=T, seed=0)
    x = torch.tensor(res.tokens)
    counts = torch.bincount(x[:, 1] * V + x[:, 2], minlength=V * V).view(V, V)
    full = _exact_joint(model, prompt, T).sum(0)
    assert _chi2_p(counts.flatten(), full.flatten()) > 1e-3
    assert _chi2_p(counts.flatten(), _stage0_joint(model, prompt, T).sum(0).flatten()) < 1e-6
    # ... and single rows, where a round also ends in a bonus token after an accepted draft
    hist = [0, 0]
    xs = []
    for seed in range(600):
        r = eng.generate(prompt, 3, mode="speculative", m=1, temperature=T, seed=seed, top_k=4)
        hist = [a + b for a, b in zip(hist, r.stats["accept_hist"])]
        xs.append(r.tokens[0])
    assert hist[0] > 50 and hist[1] > 50, hist
    x = torch.tensor(xs)
    counts = torch.bincount(x[:, 1] * V + x[:, 2], minlength=V * V)
    full_k = _exact_joint(model, prompt, T, top_k=4).sum(0).flatten()
    assert _chi2_p(counts, full_k) > 1e-3


def test_stop_tokens_end_a_row_and_are_kept():
    model = make(seed=12)
    eng = Engine(model)
    ps = prompts_for(64, 2, [4], seed=12)
    free = eng.generate(ps, 20)
    stop = free.tokens[0][5]
    for mode in ("full", "speculative", "wand"):
        kw = {"bounds": [1.0, 1.0]} if mode == "wand" else {}
        r = eng.generate(ps, 20, mode=mode, stop_tokens=[stop], **kw)
        ref = eng.generate(ps, 20, mode=mode, **kw)
        for row in range(2):
            full_row = ref.tokens[row]
            cut = full_row.index(stop) + 1 if stop in full_row else len(full_row)
            assert r.tokens[row] == full_row[:cut]
            assert r.stopped[row] == (stop in full_row)
    assert eng.generate(ps, 0).tokens == [[], []]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(mode="beam"), "unknown mode"),
        (dict(mode="stage=3"), "stage 3 out of range"),
        (dict(mode="stage", stage=-1), "out of range"),
        (dict(mode="prefix=0"), "prefix 0 out of range"),
        (dict(mode="prefix=4"), "prefix 4 out of range"),
        (dict(mode="wand"), "wand needs bounds"),
        (dict(mode="wand", bounds=[1.0]), "needs 2 bounds"),
        (dict(mode="route"), "route needs tau"),
        (dict(mode="speculative", m=0), "m \\(draft length\\)"),
        (dict(mode="speculative", m="x"), "or 'auto'"),
        (dict(mode="speculative", draft=4), "draft \\(stages that draft\\) must be an integer in 1..3"),
        (dict(prompt=[]), "empty prompt"),
        (dict(prompt=[[1, 2], []]), "empty prompt in batch row 1"),
        (dict(prompt=[1, 64]), "outside the vocabulary"),
        (dict(n=47), "exceeds the model's max_seq_len 48"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_requests_raise_one_line(kw, msg):
    model = make(seed=13)
    prompt = kw.pop("prompt", [1, 2])
    n = kw.pop("n", 4)
    with pytest.raises(PoelmError, match=msg) as e:
        Engine(model).generate(prompt, n, **kw)
    assert "\n" not in str(e.value)


def test_mode_parsing_and_bounds_lookup():
    assert parse_mode("stage=2") == {"mode": "stage", "stage": 2}
    assert parse_mode("prefix=3") == {"mode": "prefix", "prefix": 3}
    with pytest.raises(PoelmError, match="integer"):
        parse_mode("stage=x")
    with pytest.raises(PoelmError, match="takes no value"):
        parse_mode("wand=1")
    key = "poe_wand_p99_bounds_per_stage_head"
    assert wand_bounds_from({key: [1, 2]}) == [1, 2]
    assert wand_bounds_from({"config": {key: [3.0]}}) == [3.0]
    assert wand_bounds_from({"step": 1}) is None
    assert DecodeOptions(mode="wand").calibrated({key: [1.0, 2.0]}) == DecodeOptions(mode="wand", bounds=[1.0, 2.0])
    with pytest.raises(PoelmError, match="lacks"):
        DecodeOptions(mode="wand").calibrated({})


# ----------------------------------------------------------------------------- CLI
class _Tok:
    bos_id = 0

    def encode_doc(self, text):
        return [0] + [ord(c) % 60 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_text_stream_holds_back_incomplete_characters():
    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = []
    ts = TextStream(Bytes(), out.append)
    for b in "é!".encode():
        ts(0, b)
    assert out == ["é", "!"]


def test_cli_generate_streams_text_and_stats(monkeypatch, capsys, tmp_path):
    from poelm.train import checkpoint
    from poelm import cli

    ck = tmp_path / "ck"  # a folder the TARGET grammar accepts; load_model is replaced below
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"")

    model = make(seed=14)
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device="cpu": (model, _Tok(), {"poe_wand_p99_bounds_per_stage_head": [2.0, 1.0]}))
    ids = _Tok().encode_doc("hi")
    want = Engine(model).generate(ids, 8, mode="speculative").tokens[0]
    assert cli.main(["generate", str(ck), "--prompt", "hi", "--mode", "speculative", "--max-new-tokens", "8", "--no-stop"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == _Tok().decode(want)
    assert "tok/s" in err and "acceptance" in err
    assert cli.main(["generate", str(ck), "--prompt", "hi", "--mode", "wand", "--max-new-tokens", "4"]) == 0
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device="cpu": (model, _Tok(), {}))
    assert cli.main(["generate", str(ck), "--prompt", "hi", "--mode", "wand"]) == 2
    assert "lacks" in capsys.readouterr().err
