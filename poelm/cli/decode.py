"""``poelm generate``: PoE decoding modes from the command line, streamed as text."""

from __future__ import annotations

import sys

from poelm.cli.common import float_list as _float_list

# ----------------------------------------------------------------------------- generate
# ----------------------------------------------------------------------------- generate helpers
class TextStream:
    """``on_token`` callback that writes decoded text as it is produced (one row).

    Byte-level BPE tokens can end inside a UTF-8 character, so the whole continuation is decoded
    each time and only a suffix that does not end in U+FFFD (an incomplete character) is written."""

    def __init__(self, tokenizer, write, skip=()):
        self.tokenizer, self.write, self.skip = tokenizer, write, set(skip)
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        if token in self.skip:  # a stop token ends the text; it is not part of it
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.shown :])
        self.shown = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)


def format_stats(stats: dict) -> str:
    """One line of the per-call statistics."""
    parts = [f"{stats['new_tokens']} tokens in {stats['elapsed_s']:.2f}s ({stats['tokens_per_s']:.1f} tok/s)",
             f"mean depth {stats['mean_depth']:.2f}"]
    if stats.get("acceptance") is not None:
        parts.append(f"acceptance {stats['acceptance']:.3f}, mean accepted {stats['mean_accepted']:.2f} over {stats['rounds']} rounds")
    return ", ".join(parts)


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text: full, stage=K, prefix=K, wand, route or speculative")
    p.add_argument("target", metavar="TARGET", help="checkpoint dir, run dir (newest save), exported folder, REPO, REPO@main, REPO@step-XXXXX or hf://org/name[@rev]")
    p.add_argument("--prompt", required=True, help="prompt text (BOS is prepended)")
    p.add_argument("--mode", default="full", help="full | stage=K | prefix=K | wand | route | speculative (default full)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--m", type=int, default=4, help="speculative draft length (default 4)")
    p.add_argument("--tau", type=float, help="route: stage-0 max-probability threshold")
    p.add_argument("--bounds", type=_float_list, help="wand: K-1 comma-separated bounds (default: the checkpoint's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at BOS (the next document)")
    p.add_argument("--device", default="cpu")
    return p


def _run_generate(args):
    import tempfile

    from poelm import targets
    from poelm.infer.engine import Engine
    from poelm.infer.options import DecodeOptions, parse_mode
    from poelm.train import checkpoint

    opts = DecodeOptions(max_new_tokens=args.max_new_tokens, mode=args.mode, bounds=args.bounds, tau=args.tau, m=args.m,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    parse_mode(opts.mode)  # a mistyped mode fails before the checkpoint loads
    with tempfile.TemporaryDirectory(prefix="poelm-generate-") as work:
        model, tok, meta = checkpoint.load_model(targets.resolve(args.target, work).path, device=args.device)
    stop = () if args.no_stop else (tok.bos_id,)
    opts = DecodeOptions.of(opts.calibrated(meta), stop_tokens=stop)
    out = TextStream(tok, lambda s: (sys.stdout.write(s), sys.stdout.flush()), skip=stop)
    res = Engine(model).generate(tok.encode_doc(args.prompt), options=opts, on_token=out)
    out.flush()
    print()
    print(format_stats(res.stats), file=sys.stderr)
    return 0
