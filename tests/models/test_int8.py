"""LoRA on an 8-bit (bitsandbytes LLM.int8) base: ``bank.quantization: 8bit``, in ``lora`` or ``qlora`` mode.

bitsandbytes runs an 8-bit layer on CPU as its dequantized weights in train mode and as int8-rounded
activations in eval mode; the bank's roles run in both modes, so it keeps its 8-bit layers on one path
(``models.bank.one_int8_path``). Before, on the toy base: a fresh policy's logits were 0.079 off the
reference's (logits of size 9.4; log-probs up to 0.12 a token), DPO's first loss was not log 2, and the
merged export was 0.066 off what the bank computes in eval mode (validation, generation, ``evaluate``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lit_rlhf import inference
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods import DPO
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.saving import META_FILE
from tests.methods.tiny_families import move_off_reference

EXACT = dict(atol=0.0, rtol=0.0)
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [1, 1, 13, 14, 15, 16, 17, 18]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


def int8_spec(**kwargs) -> BankSpec:
    return BankSpec(model="assets/toy/base", quantization="8bit", lora=LoraSpec(r=4, alpha=8), **kwargs)


@torch.no_grad()
def policy_logits(bank: AdapterBank) -> torch.Tensor:
    with bank.role("policy"):
        return bank(IDS, MASK).logits


def test_an_8bit_bank_is_one_function_in_every_role_and_export(tmp_path):
    torch.manual_seed(0)
    bank = AdapterBank(int8_spec(), require=[AdapterSpec("policy")], reference_of="policy").train()
    assert type(bank.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    with bank.reference():
        reference = bank(IDS, MASK).logits
    torch.testing.assert_close(policy_logits(bank), reference, **EXACT)  # a fresh adapter is the reference

    move_off_reference(bank, "lora")
    trained = policy_logits(bank)
    torch.testing.assert_close(policy_logits(bank.eval()), trained, **EXACT)

    adapter = bank.save_adapter("policy", tmp_path / "adapter")
    assert json.loads((adapter / META_FILE).read_text())["quantization"] == {"mode": "8bit"}
    policy = inference.load_policy(adapter)  # generate / chat / evaluate: onto the base 8-bit, as recorded
    assert policy.bank.spec.effective_quantization == "8bit"
    torch.testing.assert_close(policy_logits(policy.bank), trained, **EXACT)

    # Merged into the dequantized int8 weights (into the original ones: 0.031 off).
    merged = AdapterBank(BankSpec(model=str(bank.export_merged(tmp_path / "merged", adapter="policy")))).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS, MASK).logits, trained, atol=1e-5, rtol=1e-5)


def test_8bit_dpo_starts_at_log_2_and_learns():
    torch.manual_seed(0)
    method = DPO(bank=int8_spec(), beta=1.0, learning_rate=3e-3)
    method.configure_model()
    data = PreferenceDataModule(train="assets/toy/data/preference_val.jsonl", batch_size=8, max_length=64)
    data.prepare(method.tokenizer)
    batch = data.collator(data.train_examples[:8])
    lora = {n: p.detach().clone() for n, p in method.bank.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n for n in lora)
    optimizer = torch.optim.AdamW(method.bank.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss, _ = method.compute_loss(batch)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(losses[0] - math.log(2)) < 1e-6, losses  # the fresh policy is the reference: margins 0
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(not torch.equal(p, lora[n]) for n, p in method.bank.named_parameters() if n in lora and "lora_B" in n)


# peft saves the LM head's base weight with an adapter holding a LoRA on it, and says so.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_a_base_saved_in_8bit_trains_only_as_saved_and_merges_with_its_full_precision_modules(tmp_path):
    """A base saved quantized loads quantized whatever ``bank.quantization`` says. Before: trained with it unset,
    the adapter recorded no quantization; set or not, the merged export raised NotImplementedError after training.
    Saved with modules kept in full precision (``llm_int8_skip_modules``; the LM head is never quantized), a LoRA
    on those merges into them as trained."""
    saved = tmp_path / "int8"
    keep = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "o_proj"])
    AutoModelForCausalLM.from_pretrained("assets/toy/base", quantization_config=keep).save_pretrained(saved)
    AutoTokenizer.from_pretrained("assets/toy/base").save_pretrained(saved)
    with pytest.raises(InvalidArgument, match=r"saved quantized \(\{'mode': '8bit'\}.*as quantized None: set "
                                              r"bank.quantization: 8bit"):
        DPO(bank=BankSpec(model=str(saved))).configure_model()

    torch.manual_seed(0)
    spec = BankSpec(model=str(saved), quantization="8bit", lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "o_proj", "lm_head"]))
    bank = AdapterBank(spec, require=[AdapterSpec("policy")])
    attention = bank.model.base_model.model.model.layers[0].self_attn
    assert [type(m.base_layer).__name__ for m in (attention.q_proj, attention.o_proj)] == ["Linear8bitLt", "Linear"]
    move_off_reference(bank, "lora")
    trained = policy_logits(bank.eval())
    merged = AutoModelForCausalLM.from_pretrained(bank.export_merged(tmp_path / "merged", adapter="policy")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS, attention_mask=MASK).logits, trained, atol=1e-5, rtol=1e-5)
    policy = inference.load_policy(bank.save_adapter("policy", tmp_path / "adapter"))
    torch.testing.assert_close(policy_logits(policy.bank), trained, **EXACT)
