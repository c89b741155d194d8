"""poelm: Product-of-Experts per-stage-head language models.

Pipeline (one module per concept): config -> model/poe -> tokenizer/data -> optim/schedule ->
train -> checkpoint -> publish -> measure -> infer -> hf (export) -> report; ``cli`` is the thin
command-line front.
"""

__version__ = "0.1.0"
