"""A user reward function that fails: each fault is one error naming ``module:function`` and the
problem; a non-finite score is an error, or with ``nonfinite: skip`` a marked, counted row
(``tests/methods/test_reward_skip.py``: the online methods drop those prompts' rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_rlhf.rollout import RewardError, RewardRequest, Rewards, RewardSpec

from tests.rollout._rollout_helpers import make_rollout

COMPLETIONS = ["good great .", "bad and sad .", "it was fun but boring", "very happy ."]


# -- the faulty functions, named by "tests.rollout.test_reward_faults:<name>" as a config would --------


def raises(prompts, completions):
    return [1.0 / 0 for _ in completions]


def one_short(prompts, completions):
    return [0.0] * (len(completions) - 1)


def a_string(prompts, completions):
    return ["0.5"] * len(completions)


def a_none(prompts, completions):
    return [0.5, None] + [0.5] * (len(completions) - 2)


def nested(prompts, completions):
    return [[0.5] for _ in completions]


def column_tensor(prompts, completions):
    return torch.zeros(len(completions), 1)


def a_scalar(prompts, completions):
    return 0.5


def a_nan(prompts, completions):
    return [math.nan if i == 2 else 0.5 for i in range(len(completions))]


def an_inf(prompts, completions):
    return np.array([0.5, -np.inf] + [0.5] * (len(completions) - 2))


def accepted(prompts, completions):
    """The return types that are fine: numpy floats, bools, ints, 0-d tensors."""
    return [np.float32(0.5), True, 2, torch.tensor(-1.5)][: len(completions)]


def request(tokenizer):
    prompts = ["the book was", "i think the park is", "the food was", "honestly the car felt"]
    return RewardRequest(prompts, COMPLETIONS, make_rollout(tokenizer, prompts, COMPLETIONS))


FAULTS = [
    ("raises", r"reward function 'tests\.rollout\.test_reward_faults:raises' raised ZeroDivisionError: "
               r"float division by zero"),
    ("one_short", r"'tests\.rollout\.test_reward_faults:one_short' returned 3 values for 4 completions"),
    ("a_string", r"'tests\.rollout\.test_reward_faults:a_string' returned a str \('0.5'\) at index 0 "
                 r"\(and 3 more non-numbers\)"),
    ("a_none", r"'tests\.rollout\.test_reward_faults:a_none' returned None at index 1; "
               r"every value must be a real number"),
    ("nested", r"'tests\.rollout\.test_reward_faults:nested' returned a list \(\[0.5\]\) at index 0"),
    ("column_tensor", r"'tests\.rollout\.test_reward_faults:column_tensor' returned a tensor of shape \(4, 1\) "
                      r"for 4 completions"),
    ("a_scalar", r"'tests\.rollout\.test_reward_faults:a_scalar' returned a float \(0.5\); return a list of 4 numbers"),
    ("a_nan", r"'tests\.rollout\.test_reward_faults:a_nan' returned a non-finite score for 1 of 4 completions, "
              r"first at row 2 \(nan for completion 'it was fun but boring'\).*nonfinite: skip"),
    ("an_inf", r"'tests\.rollout\.test_reward_faults:an_inf' returned a non-finite score for 1 of 4 completions, "
               r"first at row 1 \(-inf"),
]


@pytest.mark.parametrize("name, message", FAULTS, ids=[name for name, _ in FAULTS])
def test_each_fault_is_one_error_naming_the_function_and_the_problem(tokenizer, name, message):
    rewards = Rewards([RewardSpec("function", function=f"tests.rollout.test_reward_faults:{name}")])
    with pytest.raises(RewardError, match=message) as info:
        rewards(request(tokenizer))
    if name == "raises":
        assert isinstance(info.value.__cause__, ZeroDivisionError)  # the user's traceback is kept


def test_numbers_of_every_kind_are_accepted(tokenizer):
    out = Rewards([RewardSpec("function", function="tests.rollout.test_reward_faults:accepted")])(request(tokenizer))
    assert out.scores.tolist() == [0.5, 1.0, 2.0, -1.5] and out.valid.all()


def test_skip_marks_the_rows_counts_them_and_keeps_them_out_of_the_statistics(tokenizer):
    spec = RewardSpec("function", function="tests.rollout.test_reward_faults:a_nan", nonfinite="skip",
                      normalize="running")
    rewards = Rewards([spec], missing_eos_score=-1.0)
    out = rewards(request(tokenizer))
    assert out.valid.tolist() == [True, True, False, True]
    # Row 2 is NaN although the EOS rule would replace its score: a skipped row has no reward.
    assert math.isnan(out.scores[2]) and torch.isfinite(out.scores[[0, 1, 3]]).all()
    assert rewards.normalizers[0].count == 3 and rewards.normalizers[0].mean == 0.5
    assert rewards.skipped_nonfinite == 1 and rewards.state_dict()["skipped_nonfinite"] == 1
    with pytest.raises(ValueError, match="nonfinite must be 'error' or 'skip'"):
        RewardSpec("function", function="tests.rollout.test_reward_faults:a_nan", nonfinite="zero")


