"""Test-wide settings: one intra-op thread. The tests use tiny models, for which thread
hand-offs cost more than they save, and CI has 2 cores that pytest shares with subprocesses."""

import torch

torch.set_num_threads(1)
