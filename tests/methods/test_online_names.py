"""Renamed online options keep their old names as deprecated aliases, and the allowed values have one source."""

from __future__ import annotations

from typing import get_args, get_type_hints

import pytest

from lit_rlhf.losses import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS
from lit_rlhf.methods import GRPO, RLOO, UpdateArgs
from lit_rlhf.models import AdapterSpec, BankSpec
from lit_rlhf.models.bank import merge_adapter_specs
from lit_rlhf.rollout import RewardSpec

REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]


def test_ppo_epochs_is_a_deprecated_alias_of_update_epochs():
    with pytest.warns(FutureWarning, match="ppo_epochs is deprecated, renamed update_epochs"):
        method = GRPO(bank=BankSpec(), rewards=REWARD, ppo_epochs=3)
    assert method.update_args.update_epochs == 3
    assert GRPO(bank=BankSpec(), rewards=REWARD, update_epochs=2).update_args.update_epochs == 2
    with pytest.raises(ValueError, match="ppo_epochs=3 and update_epochs=2 disagree"):
        GRPO(bank=BankSpec(), rewards=REWARD, ppo_epochs=3, update_epochs=2)


def test_the_signatures_allow_exactly_the_values_the_checks_allow():
    # GRPO's Literal once lacked "token", which the loss accepts as bnpo.
    hints = get_type_hints(GRPO.__init__)
    assert get_args(hints["loss_type"]) == GRPO_LOSS_TYPES
    assert get_args(hints["importance_sampling_level"]) == IMPORTANCE_SAMPLING_LEVELS
    assert get_args(get_type_hints(RLOO.__init__)["importance_sampling_level"]) == IMPORTANCE_SAMPLING_LEVELS
    GRPO(bank=BankSpec(), rewards=REWARD, loss_type="token")


def test_a_required_frozen_adapter_stays_frozen_whatever_the_config_says():
    declared = [AdapterSpec("reward", path="somewhere", trainable=True)]
    merged = merge_adapter_specs(declared, [AdapterSpec("policy"), AdapterSpec("reward", trainable=False, head="score")])
    assert [(a.name, a.trainable, a.head, a.path) for a in merged] == [
        ("policy", True, None, None), ("reward", False, "score", "somewhere")]


def test_the_update_settings_are_checked_in_one_place_and_read_where_the_strategies_look():
    method = GRPO(bank=BankSpec(), rewards=REWARD, num_mini_batches=2, gradient_accumulation_steps=4, max_grad_norm=0.5)
    assert method.update_args == UpdateArgs(update_epochs=1, num_mini_batches=2, gradient_accumulation_steps=4,
                                            max_grad_norm=0.5)
    assert (method.gradient_accumulation_steps, method.max_grad_norm) == (4, 0.5)  # lit_rlhf.strategies reads these
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1, got 0"):
        UpdateArgs(gradient_accumulation_steps=0)
