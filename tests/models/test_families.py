"""The bank on tiny random models of the transformers families users bring (mixtures
of experts among them): heads, roles, LoRA targets,
modes, dropout and gradient checkpointing behave the same whatever the architecture."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec, load_tokenizer
from lit_rlhf.toy.families import FAMILIES, MOE_FAMILIES, build_tiny

TEXTS = ["the movie was good and fun .", "i think the car is"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: str(build_tiny(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def batch():
    enc = load_tokenizer(BankSpec()).__call__(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def make_bank(model: str, **spec) -> AdapterBank:
    torch.manual_seed(0)
    bank = AdapterBank(
        BankSpec(model=model, lora=LoraSpec(r=4, alpha=8), **spec),
        require=[AdapterSpec("policy", head="value"), AdapterSpec("value", head="value"),
                 AdapterSpec("reward", head="score", trainable=False)],
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fresh LoRA B is zero: move every adapter off the base so roles differ
        for name, p in bank.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bank


def first_layer_linear_calls(bank: AdapterBank) -> list[int]:
    """A counter of forward calls of the first decoder layer's sub-layers (inside the checkpointed
    region, so a recomputation counts; the layer's own hooks run once either way)."""
    layer = next(m for m in bank.model.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = [0]
    for sub in layer.children():
        sub.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def policy_and_critic_grads(bank: AdapterBank, batch) -> dict[str, torch.Tensor]:
    """One backward of a policy term and a value-adapter term, the way PPO combines them (with the same
    dropout draws each time: the RNG is seeded)."""
    torch.manual_seed(2)
    values = bank.values(*batch, adapter="value")  # the role is switched back before backward
    with bank.role("policy"):
        logits = bank(*batch).logits
    loss = logits.float().logsumexp(-1).mean() + values.pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in bank.named_parameters() if p.grad is not None}


def adapted_layers(bank: AdapterBank) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in bank.model.named_modules()
            if isinstance(module, BaseTunerLayer)}


def linear_layers_but_the_lm_head(model: str) -> set[str]:
    plain = AutoModelForCausalLM.from_pretrained(model)
    head = plain.get_output_embeddings()
    return {name for name, module in plain.named_modules() if isinstance(module, (nn.Linear, Conv1D)) and module is not head}


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_read_the_trunk_and_roles_differ(family, family_dirs, batch):
    bank = make_bank(family_dirs[family])
    # "all-linear" (the default targets): LoRA on every linear layer of the trunk (fused QKV, Conv1D), not the LM head.
    layers = adapted_layers(bank)
    if family in MOE_FAMILIES:  # and peft's LoRA on expert and router parameters (tests/models/test_moe.py)
        layers = {name for name in layers if ".mlp.experts" not in name and not name.endswith(".mlp.gate")}
    expected = linear_layers_but_the_lm_head(family_dirs[family])
    if family == "llama4":  # its router returns (scores, logits): no LoRA there (tests/models/test_llama4.py)
        expected = {name for name in expected if not name.endswith(".feed_forward.router")}
    assert layers == expected
    with torch.no_grad():
        scores = bank.score(*batch, adapter="reward")
        values = bank.values(*batch, adapter="policy")
        logits, shared_values = bank.logits_and_values(*batch, adapter="policy")
        with bank.role("policy"):
            plain_logits = bank(*batch).logits
        with bank.reference():
            ref_logits = bank(*batch).logits
    assert scores.shape == (2,) and values.shape == batch[0].shape
    # The shared-trunk pass reads the same hidden state as the trunk alone, and the LM output unchanged.
    torch.testing.assert_close(shared_values, values)
    torch.testing.assert_close(logits, plain_logits)
    assert (plain_logits - ref_logits).abs().max() > 1e-3
    assert bank.active == "policy"


#: Families whose linear layers bitsandbytes does not quantize (Falcon's are a subclass of nn.Linear).
UNQUANTIZABLE = ("falcon", "falcon_alibi")


@pytest.mark.parametrize(("family", "train_mode"), [
    *((family, "lora") for family in FAMILIES),
    *(pytest.param(family, "qlora", marks=pytest.mark.slow) for family in FAMILIES if family not in UNQUANTIZABLE)])
def test_checkpointing_recomputes_in_the_forward_s_role(family, train_mode, family_dirs, batch):
    # With the configs' own dropout live (GPT-2, GPT-NeoX, OPT, Phi-3): the recomputation must replay the
    # forward's dropout masks (torch's checkpoint restores the RNG state) or the gradients differ.
    plain = make_bank(family_dirs[family], train_mode=train_mode, disable_dropout=False)
    plain_calls = first_layer_linear_calls(plain)
    expected = policy_and_critic_grads(plain, batch)

    checkpointed = make_bank(family_dirs[family], train_mode=train_mode, disable_dropout=False, gradient_checkpointing=True)
    checkpointed_calls = first_layer_linear_calls(checkpointed)
    grads = policy_and_critic_grads(checkpointed, batch)

    # Backward recomputed the layer (as far as autograd needs it: non-reentrant checkpointing stops early).
    assert checkpointed_calls[0] > plain_calls[0] > 0
    assert grads.keys() == expected.keys() and any(".value." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


# Dropout as modules, float rates read at call time (OPT, BLOOM's hidden_dropout), rates read from the config (Falcon).
@pytest.mark.parametrize("family", ["gpt2", "opt", "phi3", "bloom", "falcon", "phi", "gptj", "stablelm", "granite",
                                    "olmo2", "mixtral"])
def test_dropout_is_off_by_default_and_the_reference_never_drops(family, family_dirs, batch):
    bank = make_bank(family_dirs[family])
    assert bank.model.training  # the trainable path trains (so checkpointing can run)...
    with bank.role("policy"), torch.no_grad():
        torch.testing.assert_close(bank(*batch).logits, bank(*batch).logits, atol=0, rtol=0)  # ...deterministically

    noisy = make_bank(family_dirs[family], disable_dropout=False)
    with torch.no_grad():
        with noisy.role("policy"):
            assert (noisy(*batch).logits - noisy(*batch).logits).abs().max() > 0  # the config's dropout is live
        with noisy.reference():
            torch.testing.assert_close(noisy(*batch).logits, noisy(*batch).logits, atol=0, rtol=0)


def test_full_mode_reference_copy_stays_in_eval_mode(family_dirs, batch):
    bank = AdapterBank(BankSpec(model=family_dirs["gpt2"], train_mode="full", disable_dropout=False),
                       require=[AdapterSpec("policy")], reference_of="policy")
    bank.eval()
    bank.train()
    assert bank.model.training and not any(m.training for m in bank.reference_model.modules())
    with bank.reference():
        torch.testing.assert_close(bank(*batch).logits, bank(*batch).logits, atol=0, rtol=0)


def test_dropout_rates_read_from_the_config_are_off_and_exported_as_loaded(family_dirs, tmp_path, batch):
    # Falcon reads hidden_dropout and attention_dropout from its config in every forward, not from a module.
    bank = AdapterBank(BankSpec(model=family_dirs["falcon"], train_mode="full"), require=[AdapterSpec("policy")])
    assert bank.model.training
    with torch.no_grad():
        torch.testing.assert_close(bank(*batch).logits, bank(*batch).logits, atol=0, rtol=0)
    bank.export_merged(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["hidden_dropout"] == saved["attention_dropout"] == 0.1 and saved["use_cache"] is True
    assert bank.model.config.hidden_dropout == 0.0  # and training goes on without it


@pytest.mark.parametrize("spec", [dict(train_mode="qlora"), dict(quantization="8bit")])
def test_quantizing_a_model_bitsandbytes_cannot_quantize_is_refused(spec, family_dirs):
    # transformers quantizes exactly nn.Linear: Falcon's FalconLinear layers loaded in full precision, and the
    # run trained a float32 base while its adapters recorded a 4-bit one.
    with pytest.raises(ValueError, match=r"quantized none of its layers.*FalconLinear.*bank.train_mode: lora"):
        AdapterBank(BankSpec(model=family_dirs["falcon"], **spec), require=[AdapterSpec("policy")])
