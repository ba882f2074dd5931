"""Shared test setup: every test runs from the repository root, where configs find assets/toy."""

from __future__ import annotations

import logging

import pytest
import torch

from lit_rlhf import quiet

from tests.paths import REPO

# Known library noise (litlogger tip, bitsandbytes' optional kernel note); real warnings still show.
quiet.install()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The toy models are tiny: one thread is faster than two, and immune to other jobs on the machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
