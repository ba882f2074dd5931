"""GRPO and RLOO add a mixture of experts' router load-balancing loss to the update as TRL 1.16 does: transformers'
own ``aux_loss`` of the update forward's whole rows (TRL's ``outputs.aux_loss``, its prompt and response tokens,
padding left out), weighted by ``router_aux_loss_coef`` and averaged over an optimizer step's micro-batches."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods import GRPO, PPO, RLOO, OnlineDPO
from lit_rlhf.methods.online import MiniBatch, ScoredRollout
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.rollout import RewardSpec
from lit_rlhf.toy.families import build_tiny
from tests.methods.online_helpers import perturbed
from tests.methods.test_prompt_sharing import rollout

REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]
COEF = 0.05


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    return str(build_tiny("mixtral", tmp_path_factory.mktemp("mixtral") / "mixtral"))


def make(cls, model: str, **kwargs):
    return perturbed(cls(bank=BankSpec(model=model, lora=LoraSpec(r=4, alpha=8)), rewards=REWARD,
                         num_samples_per_prompt=3, router_aux_loss_coef=COEF, **kwargs))


def model_aux(method, r) -> float:
    """transformers' load-balancing loss of the policy over the whole rows, the value TRL adds."""
    with torch.no_grad(), method.bank.role(method.policy_adapter):
        out = method.bank.model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=r.position_ids,
                                output_router_logits=True, use_cache=False)
    return float(out.aux_loss)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "whole-rows"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_the_update_forward_gives_the_whole_rows_load_balancing_loss(mixtral, shared, fused):
    method = make(GRPO, mixtral)
    r = rollout(method.bank.model.config.vocab_size)
    assert method.shares_prompts()  # Mixtral's cache gives the whole rows' logits
    method._prompt_sharing = shared
    method.fuses_policy_head = lambda: fused
    taken = method.policy_pass(r)
    assert taken.router_aux.requires_grad
    assert float(taken.router_aux.detach()) == pytest.approx(model_aux(method, r), rel=1e-5)
    with torch.no_grad():  # the behaviour and reference forwards keep none
        assert method.policy_pass(r).router_aux is None


@pytest.mark.parametrize("cls, kwargs, micro_share", [
    (GRPO, {}, 1.0),  # loss of the micro-batch's rows, scaled by their share of the step before backward
    (GRPO, {"loss_type": "dapo"}, 0.5),  # loss already divided by the step's tokens: the aux by the micro-batches
    (RLOO, {}, 0.5),
])
def test_the_loss_adds_the_weighted_aux_loss_of_its_micro_batch(mixtral, cls, kwargs, micro_share):
    method = make(cls, mixtral, **kwargs)
    r = rollout(method.bank.model.config.vocab_size)
    rows = r.response_ids.shape[0]
    with torch.no_grad():
        old = method.policy_pass(r).logprobs
    scored = ScoredRollout(r, [""] * rows, [""] * rows, torch.arange(rows, dtype=torch.float32), {},
                           old_logprobs=old, ref_logprobs=old)
    targets = method.compute_advantages(scored)
    # One of the two equal micro-batches of a step: the step's backward sees the mean of their aux losses.
    batch = MiniBatch(r, old, old, targets, step_rows=2 * rows, step_tokens=2 * r.response_mask.sum().float())
    loss, metrics = method.policy_loss(batch)
    method._router_aux_weight = 0.0
    plain, _ = method.policy_loss(batch)
    assert "aux_loss" not in _
    assert float(metrics["aux_loss"]) == pytest.approx(model_aux(method, r), rel=1e-5)
    assert float((loss - plain).detach()) == pytest.approx(COEF * micro_share * float(metrics["aux_loss"]), rel=1e-4)
    assert method.accumulation_weight(batch) * micro_share == pytest.approx(0.5)


@pytest.mark.parametrize("cls", [PPO, OnlineDPO])
def test_the_online_methods_trl_adds_none_to_refuse_a_router_aux_loss_coef(cls):
    with pytest.raises(InvalidArgument, match=f"{cls.__name__} adds no router load-balancing loss"):
        cls(bank=BankSpec(model="unused"), rewards=REWARD, router_aux_loss_coef=0.01)
