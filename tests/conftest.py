"""Test-wide settings: one intra-op thread, in this process and in the CLI / torchrun
subprocesses the tests start. The tests use tiny models, for which thread hand-offs cost far
more than they save (on a busy 2-core machine, tiny matmuls were measured thousands of times
slower with the default thread count)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
