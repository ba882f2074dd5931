"""An adapter generates with its LoRA deltas merged into the base weights (``models.lora_merge``): the
same logits as its LoRA branches, and afterwards the base weights bit for bit as they were, in float32
and bfloat16 (where peft's own ``unmerge``, a subtraction, would not give them back)."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.lora_merge import lora_merged, mergeable_layers
from lit_rlhf.toy.families import build_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {family: str(build_tiny(family, root / family)) for family in ("llama", "gpt2")}


def make_bank(model: str, dtype: str = "float32") -> AdapterBank:
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=model, dtype=dtype, lora=LoraSpec(r=4, alpha=8)),
                       require=[AdapterSpec("policy")]).eval()
    with torch.no_grad():  # a trained-looking adapter: its delta is not zero
        for name, p in bank.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return bank


def base_weights(bank: AdapterBank) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in bank.model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed
def test_merged_generation_gives_the_lora_logits_and_puts_the_base_back_exactly(models, family):
    bank = make_bank(models[family])
    ids = torch.randint(4, bank.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    before = base_weights(bank)
    with torch.no_grad(), bank.role("policy"):
        lora = bank(ids).logits
    layers = mergeable_layers(bank.model, "policy")
    assert layers and all(not layer.merged for layer in layers)
    with bank.generating("policy") as model:
        assert all(layer.merged for layer in layers)  # every LoRA linear runs its base only
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, lora, atol=1e-5, rtol=1e-5)
    after = base_weights(bank)
    assert all(torch.equal(after[n], w) for n, w in before.items()), "the base must come back bit for bit"
    assert not any(layer.merged for layer in layers)
    with torch.no_grad(), bank.role("policy"):
        assert torch.equal(bank(ids).logits, lora)


def test_repeated_bf16_generation_leaves_the_base_and_reference_unchanged(models):
    bank = make_bank(models["llama"], dtype="bfloat16")
    ids = torch.randint(4, bank.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    before = base_weights(bank)
    with torch.no_grad(), bank.reference():
        reference = bank(ids).logits
    for _ in range(3):
        bank.generate(ids, torch.ones_like(ids), adapter="policy", max_new_tokens=2, do_sample=False)
    assert all(torch.equal(base_weights(bank)[n], w) for n, w in before.items())
    with torch.no_grad(), bank.reference():
        assert torch.equal(bank(ids).logits, reference)


def test_layers_that_cannot_merge_keep_their_lora_branch(models):
    bank = make_bank(models["llama"])
    layers = mergeable_layers(bank.model, "policy")
    layers[0].lora_bias["policy"] = True  # a LoRA bias (like DoRA, quantized or sharded bases) is not merged
    assert mergeable_layers(bank.model, "policy") == layers[1:]
    with lora_merged(bank.model, "policy") as count:
        assert count == len(layers) - 1 and not layers[0].merged
