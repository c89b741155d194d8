"""Fixtures shared by the training tests."""

import pytest

from poelm import config
from poelm.ops.selftest import TINY


@pytest.fixture(scope="session")
def tiny_seed(tmp_path_factory):
    """A 2-step TINY run's save ``step-00002`` (with optimizer state and loader position)."""
    from poelm.train import loop

    run = tmp_path_factory.mktemp("tiny-seed") / "run"
    loop.train(config.load("embedded", TINY + ["schedule.steps=2", "train.save_every=2"]), run, progress=False)
    return run / "step-00002"
