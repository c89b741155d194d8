"""Shared by the reliability tests: the tiny reference runs and trajectory repo of
``poelm.selftest.prepare`` (trained once per session, ~5 s)."""

import os

import pytest

# Subprocesses (the real CLI) inherit this: one intra-op thread, or torch's OpenMP workers
# spin-wait on every tiny matmul when the 2 cores are busy (a 4-step run then takes a minute).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    from poelm.ops import selftest

    return selftest.prepare(tmp_path_factory.mktemp("selftest-fixture"))


@pytest.fixture
def run_copy(fx, tmp_path):
    """A run directory holding only the seed checkpoint (step 2 of a 4-step phase)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fx.seed_run, run)
    return run
