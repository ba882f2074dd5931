"""The online forwards run the LM head on the response columns only (``logits_to_keep``): the
log-probs, entropies and shared-critic values are those of the whole-sequence logits, on families
with rotary and absolute positions, OPT's decoder wrapping and Gemma 2's soft-capping; a model
whose forward has no ``logits_to_keep`` falls back to the whole sequence."""

import pytest
import torch

from lit_rlhf.methods import PPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.rollout import Rollout, SamplingConfig
from lit_rlhf.toy.families import build_tiny

from tests.methods.online_helpers import TOY_REWARD, lora_off_zero

FAMILIES = ("llama", "gpt2", "opt", "gemma2")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: str(build_tiny(family, root / family)) for family in FAMILIES}


def shared_critic_ppo(model: str) -> PPO:
    """A PPO with a value head on the policy's trunk, its LoRA moved off zero (so policy and reference differ)."""
    method = PPO(bank=BankSpec(model=model, lora=LoraSpec(r=4, alpha=8)), critic="shared", rewards=[TOY_REWARD],
                 engine="hf", sampling=SamplingConfig(max_new_tokens=5, temperature=0.7))
    method.configure_model()
    lora_off_zero(method.bank, 0.3)
    return method


def a_rollout(tokenizer) -> Rollout:
    """Left-padded prompts of different lengths and right-padded responses of different lengths."""
    tokenizer.padding_side = "left"
    prompts = tokenizer(["the movie was good and", "i think"], return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(0)
    response_ids = torch.randint(5, 40, (2, 5), generator=g)
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(prompts["input_ids"], prompts["attention_mask"], response_ids, response_mask,
                   ended=torch.tensor([False, True]))


def lm_head_widths(method) -> list[int]:
    """The sequence width of every call of the LM head, in order."""
    widths: list[int] = []
    method.bank.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    return widths


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_logits_give_the_whole_sequence_s_log_probs_entropies_and_values(family, family_dirs):
    method = shared_critic_ppo(family_dirs[family])
    rollout = a_rollout(method.tokenizer)
    method.uses_fused_head()  # the one-off probe of the LM head runs before the count (the reference's is fused)
    widths = lm_head_widths(method)
    with torch.no_grad():
        kept = method.policy_forward(rollout, with_entropy=True)
        kept_reference = method.reference_logprobs(rollout)
        method.logits_to_keep = lambda rollout: None  # the whole sequence
        whole = method.policy_forward(rollout, with_entropy=True)
        whole_reference = method.reference_logprobs(rollout)
    T, width = rollout.response_ids.shape[1], rollout.input_ids.shape[1]
    assert widths == [T + 1, T + 1, width, width]  # the head really ran on the response columns only
    for got, expected in ((kept.logprobs, whole.logprobs), (kept.entropy, whole.entropy),
                          (kept.values, whole.values), (kept_reference, whole_reference)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (kept.logprobs - kept_reference).abs().max() > 1e-3  # policy and reference differ: both were checked


def test_a_forward_without_logits_to_keep_falls_back_to_the_whole_sequence(family_dirs):
    method = shared_critic_ppo(family_dirs["llama"])
    rollout = a_rollout(method.tokenizer)
    with torch.no_grad():
        kept = method.policy_forward(rollout).logprobs
    base = method.bank.model.get_base_model()
    forward = base.forward

    def forward_without_logits_to_keep(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        assert "logits_to_keep" not in kwargs
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    base.forward = forward_without_logits_to_keep
    assert method.logits_to_keep(rollout) is None
    with torch.no_grad():
        torch.testing.assert_close(method.policy_forward(rollout).logprobs, kept, rtol=1e-5, atol=1e-5)
