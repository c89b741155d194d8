"""Tiny checkpoints in the reference implementation's format, and its forward, written here from
the facts page (../shared/reference/nanochat-poe.md) so the import is checked against something
other than itself: tensor names and padded shapes of ``GPT.state_dict()``, ``meta_XXXXXX.json``,
DistMuonAdamW's per-rank optimizer state dicts (``torch.optim.Optimizer.state_dict`` layout:
``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``) and a
``tokenizer.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

V, VPAD = 300, 320  # ceil(300 / 64) * 64: 20 padding rows
CFG = dict(sequence_len=1024, vocab_size=V, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL", dual_head=False,
           frozen_layers=0, per_stage_head=True, poe_every=2, intermediate_size=0)


def ref_names(cfg=CFG) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of ``GPT.state_dict()`` in module order (padded rows)."""
    n, d, hkv = cfg["n_layer"], cfg["n_embd"], cfg["n_kv_head"]
    hd = d // cfg["n_head"]
    inner = cfg["intermediate_size"] or 4 * d
    vpad = -(-cfg["vocab_size"] // 64) * 64
    stages = sum(1 for i in range(n) if (i + 1) % cfg["poe_every"] == 0 or i == n - 1)
    out = [("transformer.wte.weight", [vpad, d])]
    for i in range(n):
        out += [(f"transformer.h.{i}.attn.c_q.weight", [d, d]), (f"transformer.h.{i}.attn.c_k.weight", [hkv * hd, d]),
                (f"transformer.h.{i}.attn.c_v.weight", [hkv * hd, d]), (f"transformer.h.{i}.attn.c_proj.weight", [d, d])]
        if i % 2 == (n - 1) % 2:
            out.append((f"transformer.h.{i}.attn.ve_gate.weight", [hkv, 12]))
        out += [(f"transformer.h.{i}.mlp.c_fc.weight", [inner, d]), (f"transformer.h.{i}.mlp.c_proj.weight", [d, inner])]
    out.append(("lm_head.weight", [vpad, d]))
    out += [(f"lm_head_stages.{k}.weight", [vpad, d]) for k in range(stages)]
    out += [("resid_lambdas", [n]), ("x0_lambdas", [n]), ("smear_gate.weight", [1, 24]), ("smear_lambda", [1]), ("backout_lambda", [1])]
    out += [(f"value_embeds.{i}.weight", [vpad, hkv * hd]) for i in range(n) if i % 2 == (n - 1) % 2]
    return out


def make_weights(seed=0, cfg=CFG) -> dict:
    """Random weights with every op non-trivial (smear, gates, c_proj, stage heads, lambdas);
    ``wte`` and value embeddings in bf16 as a GPU run saves them."""
    g = torch.Generator().manual_seed(seed)
    d = cfg["n_embd"]
    s = 3 ** 0.5 * d ** -0.5
    sd = {}
    for name, shape in ref_names(cfg):
        if name == "transformer.wte.weight":
            t = (torch.randn(shape, generator=g) * 0.8).bfloat16()
        elif name.startswith("value_embeds"):
            t = ((torch.rand(shape, generator=g) * 2 - 1) * s).bfloat16()
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=g) * 0.3
        elif name.startswith("lm_head_stages"):
            t = torch.randn(shape, generator=g) * 0.1
        elif name == "resid_lambdas":
            t = 1.1 + 0.1 * torch.randn(shape, generator=g)
        elif name == "x0_lambdas":
            t = 0.2 + 0.1 * torch.randn(shape, generator=g)
        elif name == "smear_lambda":
            t = torch.tensor([0.7])
        elif name == "backout_lambda":
            t = torch.tensor([0.2])
        elif name.endswith("ve_gate.weight") or name == "smear_gate.weight":
            t = torch.randn(shape, generator=g) * 0.5
        else:
            t = (torch.rand(shape, generator=g) * 2 - 1) * s
        sd[name] = t.contiguous()
    return sd


# ----------------------------------------------------------------------------- the reference forward
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def reference_stage_log_probs(sd: dict, idx: torch.Tensor, layers, cfg=CFG) -> torch.Tensor:
    """Per-stage log-probs ``[S, B, T, V]`` of the reference model, fp32, from the facts page."""
    sd = {k.removeprefix("_orig_mod."): v.float() for k, v in sd.items()}
    n, d, H, Hkv = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    hd, Vv, L = d // H, cfg["vocab_size"], cfg["sequence_len"]
    B, T = idx.shape
    x = norm(sd["transformer.wte.weight"][idx])
    gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)  # x[t-1] before smearing
    x0 = x
    short = math.ceil(L / 4 / 128) * 128
    pat = cfg.get("window_pattern", "L")
    windows = [L if pat[i % len(pat)] == "L" else short for i in range(n)]
    windows[-1] = L
    inv = 1.0 / (100000 ** (torch.arange(0, hd, 2).float() / hd))
    fr = torch.outer(torch.arange(T).float(), inv)
    cos, sin = fr.cos()[None, :, None], fr.sin()[None, :, None]
    ends, acc = set(), 0
    for c in layers:
        acc += c
        ends.add(acc - 1)
    out, k = [], 0
    i_idx = torch.arange(T)
    for i in range(n):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = norm(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        kk = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, hd)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, hd)
        if f"value_embeds.{i}.weight" in sd:
            g = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + g.unsqueeze(-1) * sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, hd)
        q, kk = norm(rope(q, cos, sin)) * 1.2, norm(rope(kk, cos, sin)) * 1.2
        kk, v = kk.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        att = torch.einsum("bthd,bshd->bhts", q, kk) / hd ** 0.5
        lag = i_idx[:, None] - i_idx[None, :]
        att = att.masked_fill(~((lag >= 0) & (lag <= windows[i])), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", att.softmax(-1), v).reshape(B, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        x = x + (F.relu(norm(x) @ sd[p + "mlp.c_fc.weight"].T) ** 2) @ sd[p + "mlp.c_proj.weight"].T
        if i in ends:
            hn = norm(x)
            logits = hn @ sd["lm_head.weight"].T + hn @ sd[f"lm_head_stages.{k}.weight"].T
            logits = 15 * torch.tanh(logits[..., :Vv] / 15)
            out.append(F.log_softmax(logits, -1))
            k += 1
    return torch.stack(out)


# ----------------------------------------------------------------------------- optimizer shards by hand
def reference_groups(cfg=CFG) -> list[tuple[str, list[str]]]:
    """``GPT.setup_optimizer``'s groups in order: (kind, parameter names)."""
    names = [n for n, _ in ref_names(cfg)]
    shapes = dict(ref_names(cfg))
    groups = [("adamw", ["lm_head.weight"] + [n for n in names if n.startswith("lm_head_stages")]),
              ("adamw", ["transformer.wte.weight"]),
              ("adamw", [n for n in names if n.startswith("value_embeds")]),
              ("adamw", ["resid_lambdas"]), ("adamw", ["x0_lambdas"]),
              ("adamw", ["smear_gate.weight", "smear_lambda", "backout_lambda"])]
    blocks = [n for n in names if n.startswith("transformer.h.")]
    for shape in sorted({tuple(shapes[n]) for n in blocks}):
        groups.append(("muon", [n for n in blocks if tuple(shapes[n]) == shape]))
    return groups


def make_full_state(seed=1, cfg=CFG, step=7) -> dict:
    """Full (unsharded) optimizer state per reference name: AdamW ``exp_avg``/``exp_avg_sq``
    (``step`` updates), Muon ``momentum_buffer`` and the factored ``second_momentum_buffer``."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(ref_names(cfg))
    full = {}
    for kind, names in reference_groups(cfg):
        for n in names:
            shp = shapes[n]
            if kind == "adamw":
                full[n] = {"step": step, "exp_avg": torch.randn(shp, generator=g) * 1e-3, "exp_avg_sq": torch.rand(shp, generator=g) * 1e-6}
            else:
                r, c = shp
                second = [r, 1] if r >= c else [1, c]
                full[n] = {"momentum_buffer": torch.randn(shp, generator=g) * 1e-2, "second_momentum_buffer": torch.rand(second, generator=g)}
    return full


# base_train's setup_optimizer call: its CLI lrs (the meta's user_config below), each x batch_lr_scale.
USER_LRS = dict(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.015, scalar_lr=0.5)
BATCH_LR_SCALE = 0.7  # != 1, and not a power of two: user_config's lrs are not the saved ones
LRM = 0.5  # the lr multiplier the saved lrs were last set at


def group_options(cfg=CFG, lr_scale=BATCH_LR_SCALE, lrs=None, muon_wd=0.0) -> list[dict]:
    """setup_optimizer's group options in order (facts page: lr, betas, weight decay per group;
    ``s = (n_embd / 768) ** -0.5``), every lr x ``lr_scale``, as base_train saves them
    (``initial_lr``; ``lr = initial_lr x LRM``; Muon ``weight_decay`` the scheduled ``muon_wd``)."""
    o = {**USER_LRS, **(lrs or {})}
    s = (cfg["n_embd"] / 768) ** -0.5
    adamw = [(o["unembedding_lr"] * s, (0.8, 0.96), 0.01), (o["embedding_lr"] * s, (0.8, 0.995), 0.001),
             (o["embedding_lr"] * s * 0.5, (0.8, 0.995), 0.01), (o["scalar_lr"] * 0.01, (0.8, 0.95), 0.05),
             (o["scalar_lr"], (0.96, 0.95), 0.0), (0.2, (0.8, 0.95), 0.0)]
    out = [dict(kind="adamw", lr=lr * lr_scale * LRM, betas=b, eps=1e-10, weight_decay=wd, initial_lr=lr * lr_scale) for lr, b, wd in adamw]
    muon = dict(kind="muon", lr=o["matrix_lr"] * lr_scale * LRM, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=muon_wd,
                initial_lr=o["matrix_lr"] * lr_scale)
    return out + [dict(muon) for kind, _ in reference_groups(cfg) if kind == "muon"]


def shard_by_hand(full: dict, world: int, cfg=CFG, options=None, dtype=None) -> list[dict]:
    """DistMuonAdamW's per-rank state dicts, written from the sharding rule: AdamW tensors of
    >= 1024 elements split by rows (rank r keeps rows [r n/W, (r+1) n/W)), smaller ones whole on
    every rank; a Muon group's K parameters in chunks of ceil(K/W) (zero padding past K), the
    group's state on its first parameter. ``options``: the groups' options (``group_options()``);
    ``dtype``: the AdamW state tensors of >= 1024 elements in that dtype (a GPU run's bf16)."""
    shapes = dict(ref_names(cfg))
    opts = group_options(cfg) if options is None else options
    out = []
    for r in range(world):
        state, groups, idx = {}, [], 0
        for gi, (kind, names) in enumerate(reference_groups(cfg)):
            ids = list(range(idx, idx + len(names)))
            idx += len(names)
            if kind == "adamw":
                for i, n in zip(ids, names):
                    st = full[n]
                    if math.prod(shapes[n]) >= 1024:
                        rows = shapes[n][0] // world
                        sl = slice(r * rows, (r + 1) * rows)
                        state[i] = {"step": st["step"], **{k: st[k][sl].clone().to(dtype or st[k].dtype) for k in ("exp_avg", "exp_avg_sq")}}
                    else:
                        state[i] = {"step": st["step"], "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
                groups.append({**opts[gi], "params": ids})
            else:
                K = len(names)
                chunk = -(-K // world)
                shp = shapes[names[0]]
                mom = torch.zeros(chunk, *shp)
                sec = torch.zeros(chunk, *full[names[0]]["second_momentum_buffer"].shape)
                for j in range(chunk):
                    if r * chunk + j < K:
                        n = names[r * chunk + j]
                        mom[j] = full[n]["momentum_buffer"]
                        sec[j] = full[n]["second_momentum_buffer"]
                state[ids[0]] = {"momentum_buffer": mom, "second_momentum_buffer": sec}
                groups.append({**opts[gi], "params": ids})
        out.append({"state": state, "param_groups": groups})
    return out


# ----------------------------------------------------------------------------- the folder
def tokenizer_json(path: Path, vocab=V) -> Path:
    from poelm.config import DataConfig
    from poelm.data import corpus
    from poelm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus.tokenizer_texts(DataConfig(), 300_000), vocab)
    assert tok.vocab_size == vocab
    path.mkdir(parents=True, exist_ok=True)
    return tok.save(path)


def write_folder(d: Path, step=1200, world=2, prefixed=False, cfg=CFG, weights=None, shards=None, meta_extra=None) -> dict:
    """A reference checkpoint folder: model, meta and ``world`` optimizer shards (``shards``: the
    per-rank dicts to write; default: ``shard_by_hand`` of a random full state)."""
    d.mkdir(parents=True, exist_ok=True)
    sd = make_weights(cfg=cfg) if weights is None else weights
    torch.save({("_orig_mod." + k if prefixed else k): v for k, v in sd.items()}, d / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.234, "model_config": dict(cfg), "user_config": dict(USER_LRS),
            "device_batch_size": 2, "max_seq_len": cfg["sequence_len"], "total_batch_size": 2 * cfg["sequence_len"],
            "dataloader_state_dict": {"pq_idx": 3, "rg_idx": 5}, "loop_state": {"min_val_bpb": 1.2}}
    meta.update(meta_extra or {})
    (d / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    full = None
    if world:
        full = make_full_state(cfg=cfg)
        for r, sh in enumerate(shards if shards is not None else shard_by_hand(full, world, cfg)):
            torch.save(sh, d / f"optim_{step:06d}_rank{r}.pt")
    return {"weights": sd, "full_state": full, "meta": meta}
