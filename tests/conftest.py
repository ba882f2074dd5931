"""Shared test setup: every test runs from the repository root, where configs find assets/toy."""

from __future__ import annotations

import gc
import logging
import sys

import pytest
import torch

from lit_rlhf import quiet

from tests.paths import REPO

# Known library noise (litlogger tip, bitsandbytes' optional kernel note); real warnings still show.
quiet.install()


def pytest_collection_finish(session):
    # Collection imported torch, transformers, Lightning and the rest: half a million objects that live
    # to the end of the session. Out of the garbage collector's sight, each full collection during the
    # tests walks only what the tests made.
    gc.freeze()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The toy models are tiny: one thread is faster than two, and immune to other jobs on the machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def _plot_group_unrendered(title, series, path):
    """``lit_rlhf.report.plot_group`` without matplotlib: the report's reading, grouping and summary
    still run, and no PNG is drawn."""
    assert title and series and all(series.values()), (title, series)
    return path


@pytest.fixture(autouse=True)
def _report_pngs(request, monkeypatch):
    # Drawing a report's PNGs costs 0.5-3.5 s of matplotlib per fit (per panel, not per method); a
    # test that runs a shipped config for its training draws them only when marked `report_pngs`.
    # The marked ones (tests/test_cli_commands.py: a DPO run's report and the report command;
    # tests/methods/test_grpo.py: an online run's, with its samples table) check the PNGs.
    # Only once Lightning is loaded (collection loads it in a full run): importing the report would
    # otherwise cost a pure test seconds; without the patch the PNGs are drawn, which is only slower.
    if request.node.get_closest_marker("report_pngs") is None and "lightning.pytorch" in sys.modules:
        from lit_rlhf import report

        monkeypatch.setattr(report, "plot_group", _plot_group_unrendered)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
