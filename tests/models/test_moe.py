"""LoRA on mixtures of experts: ``all-linear`` as peft resolves it on transformers 5 (experts and router on the
families it remaps from transformers 4, a warning where it leaves the experts frozen), ``target_parameters``, and
the bank's roles, checkpointing, saving and merged export with LoRA on the experts."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lit_rlhf.errors import InvalidArgument
from lit_rlhf.losses import load_balancing_loss
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec, load_tokenizer
from lit_rlhf.toy.families import build_tiny

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TEXTS = ["the movie was good and fun .", "i think the car is"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    return {family: str(build_tiny(family, root / family)) for family in ("mixtral", "qwen2_moe")}


@pytest.fixture(scope="module")
def batch():
    enc = load_tokenizer(BankSpec())(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def adapted_modules(bank: AdapterBank, adapter: str = "policy") -> set[str]:
    """The module paths (past the layer index) holding ``adapter``'s LoRA."""
    names = {n.split(".layers.")[-1].split(".", 1)[-1] for n in bank.trainable_names() if f".{adapter}." in n}
    return {n.split(".lora_")[0].removesuffix(".base_layer") for n in names}


def peft_all_linear(model: str) -> dict[str, tuple]:
    """The LoRA tensors (module path, shape) peft's own ``get_peft_model`` makes with ``all-linear``, as TRL gets them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notes on its transformers-4 remapping
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, lora_alpha=8,
                                                                                         target_modules="all-linear"))
    return {n.removeprefix("base_model.model.").replace(".default.", "."): tuple(p.shape)
            for n, p in peft.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_all_linear_is_peft_s_own_and_says_when_it_leaves_the_experts_frozen(family, models, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        bank = AdapterBank(BankSpec(model=models[family], lora=LoraSpec(r=4, alpha=8)),
                           require=[AdapterSpec("policy"), AdapterSpec("value", head="value")])
    for adapter in ("policy", "value"):
        ours = {n.removeprefix("model.base_model.model.").replace(f".{adapter}.", "."): tuple(p.shape)
                for n, p in bank.named_parameters() if "lora_" in n and f".{adapter}." in n}
        assert ours == peft_all_linear(models[family]), adapter
    warned = [r.getMessage() for r in caplog.records if "stay frozen" in r.getMessage()]
    if family == "mixtral":
        # peft remaps Mixtral from transformers 4, where experts and router were linear layers: LoRA on the experts
        # (gate_up_proj: twice the rank, for the two layers it fuses) and on the router's weight; nothing frozen.
        assert {"mlp.experts", "mlp.gate"} <= adapted_modules(bank) and not warned
    else:
        # Not Qwen2-MoE: its experts stay frozen (its shared expert and that expert's gate are linear layers).
        assert "mlp.experts" not in adapted_modules(bank) and "mlp.shared_expert_gate" in adapted_modules(bank)
        assert len(warned) == 1 and "mlp.experts.down_proj, mlp.experts.gate_up_proj" in warned[0], warned
        assert "['policy', 'value']" in warned[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):  # frozen on purpose: no warning
            AdapterBank(BankSpec(model=models[family], lora=LoraSpec(r=4, target_parameters=[])),
                        require=[AdapterSpec("policy")])
        assert not [r for r in caplog.records if "stay frozen" in r.getMessage()]


def expert_bank(model: str, **spec) -> AdapterBank:
    """LoRA on every expert: peft's all-linear on Mixtral, ``target_parameters`` added on Qwen2-MoE."""
    experts = EXPERTS if "qwen2_moe" in model else None
    bank = AdapterBank(BankSpec(model=model, lora=LoraSpec(r=4, alpha=8, target_parameters=experts), **spec),
                       require=[AdapterSpec("policy"), AdapterSpec("value", head="value")], reference_of="policy")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every adapter off the base
        for name, p in bank.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return bank


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_lora_trains_each_routed_expert_and_the_reference_is_the_base(family, models, batch):
    bank = expert_bank(models[family])
    assert {"mlp.experts", "self_attn.q_proj"} <= adapted_modules(bank)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(models[family])(*batch).logits
        with bank.reference():
            torch.testing.assert_close(bank(*batch).logits, base, atol=0, rtol=0)
    out = bank(*batch, output_router_logits=True)
    out.logits.logsumexp(-1).mean().backward()
    expert_grads = {n: p.grad for n, p in bank.named_parameters() if "experts" in n and ".policy." in n}
    assert len(expert_grads) == 2 * 2 * 2  # lora_A and lora_B of two expert parameters in two layers
    # One LoRA per expert: lora_A stacks the experts' blocks; an expert's block gets a gradient exactly when the
    # router sends it a token.
    routed = [torch.bincount(layer.topk(2).indices.flatten(), minlength=4) > 0 for layer in out.router_logits]
    for name, grad in expert_grads.items():
        assert grad is not None, name
        if "lora_A" in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert (grad.reshape(4, -1).abs().sum(dim=1) > 0).tolist() == routed[layer].tolist(), name
    assert not [n for n, p in bank.named_parameters() if ".value." in n and p.grad is not None]


def test_expert_lora_saves_reloads_and_merges_into_the_same_function(models, batch, tmp_path):
    bank = expert_bank(models["mixtral"]).eval()
    with torch.no_grad():
        policy = bank(*batch).logits
    bank.save_adapter("policy", tmp_path / "adapter")
    bank.export_merged(tmp_path / "merged", adapter="policy")
    reloaded = AdapterBank(BankSpec(model=models["mixtral"]),
                           require=[AdapterSpec("policy", path=str(tmp_path / "adapter"))], reference_of="policy").eval()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(*batch).logits
        torch.testing.assert_close(reloaded(*batch).logits, policy, atol=0, rtol=0)
        with reloaded.reference():  # the frozen copy of the loaded policy
            torch.testing.assert_close(reloaded(*batch).logits, policy, atol=0, rtol=0)
    torch.testing.assert_close(merged, policy, atol=1e-5, rtol=1e-5)
    assert (policy - AutoModelForCausalLM.from_pretrained(models["mixtral"])(*batch).logits).abs().max() > 0.1


def loss_and_grads(bank: AdapterBank, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """An LM term plus the router load-balancing loss, as SFT weighs them, and the gradients they give."""
    out = bank(*batch, output_router_logits=True)
    loss = out.logits.logsumexp(-1).mean() + 0.5 * load_balancing_loss(out.router_logits, 2, batch[1])
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in bank.named_parameters() if p.grad is not None}


def test_checkpointing_recomputes_the_experts_lora_and_the_router_loss_exactly(models, batch):
    torch.manual_seed(0)
    plain = loss_and_grads(expert_bank(models["mixtral"]), batch)
    torch.manual_seed(0)
    checkpointed_bank = expert_bank(models["mixtral"], gradient_checkpointing=True)
    checkpointed = loss_and_grads(checkpointed_bank, batch)
    assert plain[0] == checkpointed[0]
    assert plain[1].keys() == checkpointed[1].keys() and any("experts" in n for n in plain[1])
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_expert_lora_on_a_quantized_base(quantization, models, batch):
    # bitsandbytes quantizes the linear layers (attention, the shared expert); the fused experts stay in full
    # precision and their LoRA works as on the unquantized base.
    bank = expert_bank(models["qwen2_moe"], quantization=quantization)
    with torch.no_grad(), bank.reference():
        reference = bank(*batch).logits
    with torch.no_grad():
        assert (bank(*batch).logits - reference).abs().max() > 1e-2
    bank(*batch).logits.logsumexp(-1).mean().backward()
    policy = [n for n in bank.trainable_names() if ".policy." in n]
    assert all(dict(bank.named_parameters())[n].grad is not None for n in policy)
    assert any("experts" in n for n in policy)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_lora_dropout_on_expert_lora_is_off_with_disable_dropout_and_refused_without(family, models):
    # peft's LoRA on parameters raises on any dropout; all-linear brings it in on Mixtral, target_parameters here.
    lora = LoraSpec(r=4, dropout=0.1, target_parameters=EXPERTS if family == "qwen2_moe" else None)
    bank = AdapterBank(BankSpec(model=models[family], lora=lora), require=[AdapterSpec("policy")])
    assert "mlp.experts" in adapted_modules(bank)
    with pytest.raises(InvalidArgument, match=r"bank.lora.dropout is 0.1, but LoRA on parameters .*has no dropout"):
        AdapterBank(BankSpec(model=models[family], lora=lora, disable_dropout=False), require=[AdapterSpec("policy")])
