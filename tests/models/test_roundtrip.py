"""What lit_rlhf writes reloads to the same function, on the families users bring (GPT-2: Conv1D,
tied embeddings, absolute positions; Qwen2: tied; Gemma 2: scaled and tied embeddings, soft-capped
logits; GPT-NeoX; Cohere: tied, logits scaled after the head) and in every train mode: the PEFT adapter (plain peft, and as a starting policy
whose reference is the loaded adapter), the merged export (plain transformers), the reward export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lit_rlhf.methods import DPO
from lit_rlhf.methods.export import write_model_card
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.loading import load_base
from lit_rlhf.models.saving import META_FILE
from tests.methods.tiny_families import build_families, move_off_reference

FAMILIES = ["gpt2", "qwen2", "gemma2", "gpt_neox", "cohere"]
TOL = dict(atol=1e-5, rtol=1e-5)
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [1, 1, 13, 14, 15, 16, 17, 18]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_families(tmp_path_factory.mktemp("families"), FAMILIES)


def bank_of(model: str, train_mode: str, **policy) -> AdapterBank:
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=model, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8)),
                       require=[AdapterSpec("policy", **policy)], reference_of="policy")
    return bank.eval()


def trained_bank(model: str, train_mode: str) -> AdapterBank:
    """A bank whose policy has moved off its start: LoRA B off zero, or (``full``) every base weight,
    the tied embedding and LM head included."""
    bank = bank_of(model, train_mode)
    move_off_reference(bank, train_mode)
    return bank


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(input_ids=IDS, attention_mask=MASK).logits.float()


@torch.no_grad()
def policy_logits(bank: AdapterBank) -> torch.Tensor:
    with bank.role("policy"):
        return logits_of(bank)


def plain_base(model: str, train_mode: str):
    """The base as plain transformers loads it (4-bit as the bank loads it for ``qlora``)."""
    if train_mode == "lora":
        return AutoModelForCausalLM.from_pretrained(model)
    base = load_base(BankSpec(model=model, train_mode=train_mode))
    for module in base.modules():  # the bank's guard against bitsandbytes' CPU inference repacking
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return base


@pytest.mark.parametrize("train_mode", ["lora", "qlora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_policy_adapter_is_the_trained_policy_and_the_reference_of_a_run_started_from_it(
        models, family, train_mode, tmp_path):
    bank = trained_bank(models[family], train_mode)
    trained = policy_logits(bank)
    bank.save_adapter("policy", tmp_path / "policy")

    peft_model = PeftModel.from_pretrained(plain_base(models[family], train_mode), tmp_path / "policy")
    torch.testing.assert_close(logits_of(peft_model.eval()), trained, **TOL)

    started = bank_of(models[family], train_mode, path=str(tmp_path / "policy"))
    torch.testing.assert_close(policy_logits(started), trained, **TOL)
    with started.reference():
        torch.testing.assert_close(logits_of(started), trained, **TOL)  # KL 0 at step 0: the loaded adapter...
    with started._as_loaded():
        assert not torch.allclose(logits_of(started), trained, **TOL)  # ... not the bare base


@pytest.mark.parametrize("train_mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_merged_export_is_the_trained_policy_in_plain_transformers(models, family, train_mode, tmp_path):
    bank = trained_bank(models[family], train_mode)
    trained = policy_logits(bank)
    bank.export_merged(tmp_path / "merged", adapter="policy")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a QLoRA run exports plain full-precision weights
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    original = json.loads((Path(models[family]) / "config.json").read_text())
    # The bank trains with the KV cache off; the export generates with it as the base did.
    assert config["use_cache"] == original["use_cache"] is True
    assert bank.model.config.use_cache is False
    tied = merged.config.tie_word_embeddings
    assert tied == original["tie_word_embeddings"]
    if tied:  # a trained, tied embedding survives as one tensor, not as a stale copy on either side
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    # QLoRA: the adapter was trained on the 4-bit weights; merged into the dequantized ones it computes the
    # trained function (into the original weights it was off by up to a third of the logits' size here).
    torch.testing.assert_close(logits_of(merged), trained, **TOL)


def test_a_qlora_adapter_records_its_quantization_its_card_loads_it_so_and_another_base_warns(
        models, tmp_path, caplog):
    model = models["qwen2"]
    bank = trained_bank(model, "qlora")
    trained = policy_logits(bank)
    method = DPO(bank=BankSpec(model=model, train_mode="qlora"))
    write_model_card(bank.save_adapter("policy", tmp_path / "policy"), method)
    recorded = json.loads((tmp_path / "policy" / META_FILE).read_text())["quantization"]
    assert recorded == {"mode": "4bit", "quant_type": "nf4", "double_quant": True}

    # The card's "Load it" lines give the trained policy: on the 4-bit base, not the original one.
    card = (tmp_path / "policy" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)
    for module in scope["model"].modules():  # the bank's guard against bitsandbytes' CPU inference repacking
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(logits_of(scope["model"].eval()), trained, **TOL)

    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        on_original = bank_of(model, "lora", path=str(tmp_path / "policy"))
    assert "trained on a base quantized as {'mode': '4bit'" in caplog.text
    assert "loaded onto one quantized as None" in caplog.text
    assert not torch.allclose(policy_logits(on_original), trained, **TOL)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        bank_of(model, "qlora", path=str(tmp_path / "policy"))
    assert "trained on a base quantized" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        AdapterBank(BankSpec(model=model, train_mode="qlora", quant_type="fp4"),
                    require=[AdapterSpec("policy", path=str(tmp_path / "policy"))])
    assert "'quant_type': 'fp4'" in caplog.text


# peft warns, when a LoRA wraps a tied LM head, that merging it can go wrong (it did), that GPT-2's
# LM head is a Linear among Conv1D layers, and that it saves the head's base weight with the adapter.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True but the target module is `torch.nn.Linear`")
@pytest.mark.parametrize(("family", "targets"), [
    ("qwen2", ["q_proj", "lm_head"]), ("gpt2", ["c_attn", "lm_head"]), ("qwen2", ["q_proj", "embed_tokens"])])
def test_a_lora_on_a_tied_lm_head_or_embedding_merges_into_an_untied_copy(models, family, targets, tmp_path):
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=models[family], lora=LoraSpec(r=4, alpha=8, target_modules=targets)),
                       require=[AdapterSpec("policy")]).eval()
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # peft starts an embedding's LoRA A at zero
                param.normal_(0, 0.05)
    trained = policy_logits(bank)
    bank.export_merged(tmp_path / "merged", adapter="policy")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # Merged into the shared weight, the head's LoRA moved the input embedding too (or the other way
    # round): logits off by 0.85.
    torch.testing.assert_close(logits_of(merged), trained, **TOL)
    assert merged.config.tie_word_embeddings is False
    # Rollouts sample from the trained policy too: generation merges LoRA deltas only into untied weights
    # (the head's delta in its tied weight gave generation-time logits off by 0.85), and restores them.
    with bank.generating("policy") as model:
        torch.testing.assert_close(logits_of(model), trained, **TOL)
    torch.testing.assert_close(policy_logits(bank), trained, rtol=0, atol=0)
