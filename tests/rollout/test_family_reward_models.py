"""Reward models of the families ``lit_rlhf.toy.families`` builds (ALiBi, partial rotary, multipliers, mixtures
of experts, Gemma 3's multimodal checkpoint): a saved reward adapter scores after reload as in memory, and a
transformers sequence classifier of the family, batched by ``RewardScorer``, scores each row as transformers
does on the row alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer
from lit_rlhf.rollout import RewardScorer
from lit_rlhf.toy.families import MOE_FAMILIES, build_tiny, build_tiny_multimodal

TEXTS = ["the movie was great fun .", ("hello there", "i think the car is awful and sad ."), "a"]
NEW = ["bloom", "falcon", "falcon_alibi", "gemma3_text", "cohere", "granite", "phi", "gptj", "stablelm", "olmo2",
       *MOE_FAMILIES]
#: Families transformers has a sequence classifier for (none for Cohere, Granite, OLMoE, Llama 4's text model).
CLASSIFIED = ["bloom", "falcon_alibi", "gemma3_text", "phi", "gptj", "stablelm", "olmo2", "mixtral", "qwen3_moe",
              "gemma3"]


def build(family: str, out) -> str:
    return str(build_tiny_multimodal(family, out) if family == "gemma3" else build_tiny(family, out))


@pytest.mark.parametrize("family", [*NEW, "gemma3"])
def test_a_saved_reward_adapter_scores_after_reload_as_in_memory(family, tmp_path):
    model = build(family, tmp_path / "base")
    torch.manual_seed(2)
    bank = AdapterBank(BankSpec(model=model), require=[AdapterSpec("reward", head="score")]).eval()
    with torch.no_grad():  # LoRA and head off their initial values: a reload that dropped either would show
        for name, param in bank.named_parameters():
            if "lora_B" in name or "heads" in name:
                param.normal_(0, 0.5)
    tokenizer = load_tokenizer(BankSpec(model=model))
    scorer = RewardScorer(bank, tokenizer)
    in_memory = scorer.scores(TEXTS)  # right-padded rows
    alone = torch.cat([scorer.scores([text]) for text in TEXTS])
    torch.testing.assert_close(in_memory, alone, atol=1e-5, rtol=1e-5)
    tokenizer.padding_side = "left"  # as generation batches are

    def score(texts: list[str]) -> torch.Tensor:
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return bank.score(encoded["input_ids"], encoded["attention_mask"], adapter="reward")

    scores = score([str(text) for text in TEXTS])
    singles = torch.cat([score([str(text)]) for text in TEXTS])
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=1e-5)
    bank.save_adapter("reward", tmp_path / "adapter")
    torch.testing.assert_close(RewardScorer.load(tmp_path / "adapter").scores(TEXTS), in_memory, atol=0, rtol=0)


@pytest.mark.parametrize("family", CLASSIFIED)
def test_a_sequence_classifier_scores_each_row_as_transformers_does_alone(family, tmp_path):
    """The classifier's config names another pad id than the tokenizer's: transformers reads the score at the last
    token that is not the (text) config's pad id, so batches must be padded with it. Gemma 3's multimodal
    classifier keeps that id in its text config (its top level has none): it failed to load, and padded with
    the tokenizer's id it read shorter rows on their padding."""
    model = build(family, tmp_path / "base")
    tokenizer = load_tokenizer(BankSpec(model=model))
    config = AutoConfig.from_pretrained(model, num_labels=1)
    config.get_text_config().pad_token_id = len(tokenizer) - 1  # a special token the texts never hold
    assert tokenizer.pad_token_id != len(tokenizer) - 1
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        classifier.score.weight.normal_(0, 10.0)  # scores far apart wherever they are read
    classifier.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    scorer = RewardScorer.load(tmp_path / "classifier")
    with torch.no_grad():
        alone = torch.stack([scorer.model(input_ids=torch.tensor([example["prompt_ids"] + example["completion_ids"]]))
                             .logits[0, 0] for example in scorer.encode(TEXTS)])
    torch.testing.assert_close(scorer.scores(TEXTS), alone, atol=1e-4, rtol=1e-5)
    # Wrapped in memory (as ModelReward's callers may): padded with the same id.
    torch.testing.assert_close(RewardScorer(classifier.eval(), tokenizer).scores(TEXTS), alone, atol=1e-4, rtol=1e-5)
