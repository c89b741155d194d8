"""poelm's engine as the decoding loop of transformers' ``generate()`` (PoE modes wand / route /
speculative, through ``generate(custom_generate=<callable>)``; ``hf/modeling_poelm.py``).

transformers prepares everything a decoding loop needs (generation-config merging, max / min
length, EOS and pad defaults, the logits-processor and stopping-criteria lists, the streamer's
prompt) and hands it over; this module reads those resolved values and runs ``Engine`` on the
left-padded batch. It imports no transformers: processors and criteria are recognised by class
name (temperature, top-k, top-p, min-length; max-length, EOS), and anything else is refused
before compute, so a generation option is never silently ignored.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .engine import Engine, PoelmError
from .options import DecodeOptions

_SAMPLING = {"TemperatureLogitsWarper": "temperature", "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p"}
_STOPPING = ("MaxLengthCriteria", "EosTokenCriteria")


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, poe: DecodeOptions, streamer, model_kwargs: dict):
    """Run ``Engine(model)`` (``model``: a PoEGPT) as ``generate``'s decoding loop.

    ``poe``: the mode's ``DecodeOptions`` (mode, bounds / tau / m / draft), completed here with the
    length, sampling, stop and min-length values transformers resolved; ``streamer``:
    transformers' streamer or None. Returns
    ``(sequences [B, L + new], GenerationResult, scores)``: scores is a tuple of ``[B, V]`` per step
    (the mode's normalised log-probs, zeros for rows already ended) when the generation config asks
    for scores or logits, else None. Every refusal is a ``PoelmError`` raised before compute."""
    gc = generation_config
    poe_text = poe.mode
    B, L = input_ids.shape
    if (gc.num_beams or 1) > 1 or (gc.num_return_sequences or 1) > 1:
        raise PoelmError(f"poe_mode={poe_text!r} decodes one sequence per prompt: drop num_beams / num_return_sequences (or use poe_mode='full')")
    sampling = {"temperature": 1.0, "top_k": None, "top_p": None}
    min_new = 0
    for proc in logits_processor or []:
        name = type(proc).__name__
        if name in _SAMPLING:
            sampling[_SAMPLING[name]] = getattr(proc, _SAMPLING[name])
        elif name == "MinLengthLogitsProcessor":
            min_new = max(min_new, int(proc.min_length) - L)
        elif name == "MinNewTokensLengthLogitsProcessor":
            min_new = max(min_new, int(proc.min_new_tokens))
        else:
            raise PoelmError(f"{name} (from the generation config or logits_processor) is not supported with poe_mode={poe_text!r}: "
                             "drop it or use poe_mode='full'")
    for crit in stopping_criteria or []:
        if type(crit).__name__ not in _STOPPING:
            raise PoelmError(f"{type(crit).__name__} is not supported with poe_mode={poe_text!r} (only EOS and length stop it): "
                             "drop it or use poe_mode='full'")
    if model_kwargs.get("cache") is not None and model_kwargs["cache"].get_seq_length() > 0:
        raise PoelmError(f"poe_mode={poe_text!r} starts from the prompt: pass no filled cache")
    mask = model_kwargs.get("attention_mask")
    rows = input_ids.tolist()
    if mask is not None:
        m = mask.bool()
        n = m.sum(1)
        if not bool((m == (torch.arange(L, device=m.device)[None, :] >= (L - n)[:, None])).all()):
            raise PoelmError("generation needs left padding (the new tokens follow the last column): load the tokenizer with "
                             "padding_side='left'")
        rows = [r[L - int(k):] for r, k in zip(rows, n.tolist())]
    eos = gc._eos_token_tensor
    stop = [] if eos is None else [int(t) for t in eos.flatten().tolist()]
    pad = gc._pad_token_tensor
    pad = int(pad) if pad is not None else (stop[0] if stop else 0)
    max_new = int(gc.max_length) - L
    greedy = not gc.do_sample
    temperature = 0.0 if greedy else float(sampling["temperature"])
    if not greedy and temperature == 0.0:
        raise PoelmError("temperature must be > 0 when sampling (or use do_sample=False)")
    want_scores = bool(gc.output_scores or gc.output_logits) and gc.return_dict_in_generate
    eng = Engine(model)
    opts = replace(poe, max_new_tokens=max_new, temperature=temperature, top_k=None if greedy else sampling["top_k"],
                   top_p=None if greedy else sampling["top_p"], seed="global", stop_tokens=stop, return_logprobs=want_scores,
                   min_new_tokens=min_new)
    events = eng.stream(rows, options=opts)
    streamer = _Columns(B, pad, streamer, stop, max_new) if streamer is not None else None
    for row, tok in events:
        if streamer is not None:
            streamer.add(row, tok)
    res = eng.last_result
    if streamer is not None:
        streamer.finish()
    width = max((len(t) for t in res.tokens), default=0)
    new = torch.full((B, width), pad, dtype=torch.long)
    for b, toks in enumerate(res.tokens):
        new[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    scores = None
    if want_scores:
        V = model.config.vocab_size
        scores = tuple(torch.stack([lp[j] if j < len(lp) else torch.zeros(V) for lp in res.logprobs]).to(input_ids.device)
                       for j in range(width))
    return sequences, res, scores


class _Columns:
    """transformers' streamer protocol over the engine's ``(row, token)`` events: ``put`` receives
    one ``[B]`` column per step, as ``_sample`` sends it (``pad`` for rows that already ended), as
    soon as every row has produced that step's token or ended; ``end`` once at the end."""

    def __init__(self, B: int, pad: int, streamer, stop, max_new: int):
        self.pad, self.streamer, self.stop, self.max_new = pad, streamer, set(stop), max_new
        self.tokens = [[] for _ in range(B)]
        self.ended = [max_new <= 0] * B
        self.sent = 0

    def add(self, row: int, tok: int):
        self.tokens[row].append(tok)
        if tok in self.stop or len(self.tokens[row]) >= self.max_new:
            self.ended[row] = True
        self._flush()

    def _flush(self):
        while any(self.sent < len(t) for t in self.tokens):
            col = []
            for toks, ended in zip(self.tokens, self.ended):
                if self.sent < len(toks):
                    col.append(toks[self.sent])
                elif ended:
                    col.append(self.pad)
                else:
                    return
            self.streamer.put(torch.tensor(col, dtype=torch.long))
            self.sent += 1

    def finish(self):
        self.ended = [True] * len(self.ended)
        self._flush()
        self.streamer.end()
