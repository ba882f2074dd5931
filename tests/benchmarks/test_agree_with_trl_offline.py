"""benchmarks/agree_with_trl_offline.py's verdicts, without TRL: a difference passes only when it is within
tolerance, or named by a note and (where the convention can be applied) agreeing once it is."""

from __future__ import annotations

import sys

import pytest

from tests.paths import REPO, import_file

@pytest.fixture(scope="module")
def agree():
    yield import_file(REPO / "benchmarks/agree_with_trl_offline.py", "agree_under_test")
    del sys.modules["agree_under_test"]


def test_a_cell_passes_within_tolerance_or_by_a_note_that_aligns(agree):
    table = agree.Table()
    table.add("m", "loss", 3e-6)
    assert table.cell("m", "loss") == ("agree (3e-06)", True)
    table.add("m", "metrics", 0.2, "rewards_norm")
    assert table.cell("m", "metrics") == ("by design [2]", True)
    table.add("m", "gradients", 0.2, "nll_mean", aligned=4e-7)
    assert table.cell("m", "gradients") == ("by design [3], aligned 4e-07", True)
    assert table.cell("m", "logps") == ("-", True)


def test_a_cell_fails_on_an_unnamed_difference_or_a_convention_that_does_not_align(agree):
    table = agree.Table()
    table.add("m", "loss", 1e-7)
    table.add("m", "loss", 2e-3)
    assert table.cell("m", "loss") == ("DIFFERS (2.0e-03)", False)
    table.add("n", "loss", 2e-3, "nll_mean", aligned=1e-3)  # the note does not explain all of it
    assert table.cell("n", "loss") == ("DIFFERS (2.0e-03)", False)
    assert not table.print()


def test_a_column_can_carry_its_own_tolerance(agree):
    table = agree.Table(agree.LORA_COLUMNS, agree.LORA_NOTES, {"weights": 1e-2})
    table.add("m", "weights", 3e-3)
    table.add("m", "loss", 3e-3)
    assert table.cell("m", "weights") == ("agree (3e-03)", True)
    assert table.cell("m", "loss") == ("DIFFERS (3.0e-03)", False)


def test_lora_tensors_of_both_sides_meet_under_one_name(agree):
    """Ours (bank-relative, adapter ``policy``/``reward``) and TRL's (adapter ``default``, the score module saved
    whole) name the same tensor alike; another adapter's copy of a saved module does not."""
    pairs = [("model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.policy.weight", "policy",
              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
             ("model.base_model.model.lm_head.modules_to_save.policy.weight", "policy",
              "base_model.model.lm_head.modules_to_save.default.weight"),
             ("heads.reward.linear.weight", "reward", "base_model.model.score.modules_to_save.default.weight")]
    for ours, adapter, theirs in pairs:
        assert agree.canonical(ours, adapter) == agree.canonical(theirs, "default")
    assert (agree.canonical("model.base_model.model.lm_head.modules_to_save.reference.weight", "policy")
            != agree.canonical("base_model.model.lm_head.modules_to_save.default.weight", "default"))
