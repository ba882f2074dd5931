"""The online loop on tiny models of real families, speaking their tokenizers and chat templates
(tests/data/real_tokenizers.py): the log-probs a rollout was sampled with are the ones the loop
recomputes for it, token by token, whatever the family does on the way (sliding-window layers longer
rollouts outrun, soft-capped logits, tied heads, a LoRA on the tied LM head and input embedding)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lit_rlhf.rollout.engine as engine_module
from lit_rlhf.data import PromptDataModule
from lit_rlhf.methods import GRPO
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig
from lit_rlhf.toy.families import FAMILIES as ARCHITECTURES
from tests.data.real_tokenizers import build_family

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 24  # past the tiny Gemma 2 / Mistral sliding window (16) with every prompt
REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]
QUESTIONS = ["what is the capital of france ?", "hello there , how are you today ? please write a short poem .", "hi"]


def tiny_model(architecture: str, family: str, root) -> str:
    """A random tiny ``architecture`` model over tokenizer ``family``'s vocabulary, saved with it."""
    tok = build_family(family, root / "tokenizers")
    config = AutoConfig.for_model(architecture, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **ARCHITECTURES[architecture])
    torch.manual_seed(0)
    out = root / f"{architecture}-{family}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def chat_prompts(path, family: str) -> str:
    """Conversational prompts of three lengths, one with a system turn where the template takes one."""
    rows = []
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        if i == 1 and family not in ("gemma2", "mistral"):  # their templates refuse a system turn
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant ."})
        rows.append({"prompt": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sampled_logits(monkeypatch) -> list[torch.Tensor]:
    """The ``(batch, vocab)`` logits each decode step of the ``hf_static`` engine sampled from, in order."""
    steps = []
    choose = engine_module.choose_tokens

    def recording(logits, sampling):
        steps.append(logits.clone())
        return choose(logits, sampling)

    monkeypatch.setattr(engine_module, "choose_tokens", recording)
    return steps


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
@pytest.mark.parametrize(("architecture", "family", "targets"), [
    ("gemma2", "gemma2", "all-linear"),      # sliding window, soft-capped logits, no system turn
    ("mistral", "mistral", "all-linear"),    # sliding window, pad == EOS
    ("llama", "llama3", "all-linear"),       # EOS <|end_of_text|> == pad, turns end with <|eot_id|>
    # A LoRA on Qwen2's tied LM head and its input embedding: peft wraps the embedding (no
    # num_embeddings), which the forward probes read, and merging either for generation would move both.
    ("qwen2", "qwen2.5", ["q_proj", "v_proj", "lm_head", "embed_tokens"]),
])
def test_behaviour_log_probs_are_the_sampling_distributions(tmp_path, sampled_logits, architecture, family, targets):
    pl.seed_everything(0)
    method = GRPO(bank=BankSpec(model=tiny_model(architecture, family, tmp_path),
                                lora=LoraSpec(r=4, alpha=8, target_modules=targets)),
                  rewards=REWARD, engine="hf_static", beta=0.1, num_samples_per_prompt=2, update_epochs=2,
                  sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE))
    method.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in method.bank.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    data = PromptDataModule(train=chat_prompts(tmp_path / "prompts.jsonl", family), batch_size=3, max_length=128)
    batch = next(iter(data.prepare(method.tokenizer).train_dataloader()))

    scored = method.rollout_and_score(batch)

    rollout = scored.rollout
    assert rollout.prompt_mask.sum(1).min() + MAX_NEW_TOKENS > ARCHITECTURES["mistral"]["sliding_window"]
    logits = torch.stack(sampled_logits[: rollout.response_ids.shape[1]], dim=1)
    sampled = (logits / TEMPERATURE).log_softmax(-1).gather(-1, rollout.response_ids[..., None])[..., 0]
    torch.testing.assert_close(scored.old_logprobs, sampled * rollout.response_mask, atol=1e-5, rtol=0)
    assert (scored.old_logprobs - scored.ref_logprobs).abs().max() > 0.1  # the policy is off its reference


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
def test_the_forward_probes_run_with_a_lora_on_the_input_embedding(tmp_path):
    """Head selection, the fused head and padding-free packing are probed on a tiny batch of vocabulary
    ids (DPO's forwards); peft's LoRA embedding has no ``num_embeddings`` to size it with."""
    from lit_rlhf.methods import DPO
    from lit_rlhf.models.packing import bank_supports_packing

    method = DPO(bank=BankSpec(model=tiny_model("qwen2", "qwen2.5", tmp_path),
                               lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"])))
    method.configure_model()
    assert method.uses_head_selection() and method.uses_fused_head()
    with method.bank.role("policy"):
        assert bank_supports_packing(method.bank)
