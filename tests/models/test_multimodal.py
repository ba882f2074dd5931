"""Multimodal checkpoints trained on text: Gemma 3 as released from 4B up (``Gemma3ForConditionalGeneration``, its
text decoder under a vision tower) runs text-only through the bank as transformers' own class runs it, trains, and
exports as the model the user started from; layouts AutoModelForCausalLM does not load are refused at setup."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, Gemma3ForConditionalGeneration

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods import DPO
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec, load_tokenizer
from lit_rlhf.rollout import build_engine
from lit_rlhf.toy.families import build_tiny_multimodal
from tests.methods.online_helpers import lora_off_zero
from tests.paths import TOY_DATA
from tests.rollout.test_static_engine import PROMPTS, encode, fast_engine, greedy

PREFERENCE = str(TOY_DATA / "preference_train.jsonl")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> str:
    return str(build_tiny_multimodal("gemma3", tmp_path_factory.mktemp("gemma3")))


def dpo(model: str) -> DPO:
    torch.manual_seed(0)
    method = DPO(bank=BankSpec(model=model, lora=LoraSpec(r=4, alpha=8)), beta=1.0, learning_rate=1e-2)
    method.configure_model()
    return method


def preference_batch(method: DPO, rows: int = 4, train: str = PREFERENCE) -> dict:
    data = PreferenceDataModule(train=train, max_length=64).prepare(method.tokenizer)
    return data.collator(data.train_examples[:rows])


@torch.no_grad()
def completion_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed completion log-probs of each row, from the plain transformers model's full float32 logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def assert_vision_as_loaded(model: Gemma3ForConditionalGeneration, original: str) -> None:
    """The vision tower and projector of ``model`` are those saved at ``original``, bit for bit."""
    loaded = Gemma3ForConditionalGeneration.from_pretrained(original)
    for part in ("vision_tower", "multi_modal_projector"):
        for name, weight in getattr(loaded.model, part).state_dict().items():
            assert torch.equal(getattr(model.model, part).state_dict()[name], weight), f"{part}.{name}"


def test_gemma3_log_probs_are_those_of_gemma3_for_conditional_generation(gemma3):
    method = dpo(gemma3)
    batch = preference_batch(method)
    with method.bank.reference():
        reference = method.pair_logps(batch)
    assert method.uses_packing() and method.uses_fused_head()  # the padding-free, fused-head path ran
    plain = Gemma3ForConditionalGeneration.from_pretrained(gemma3).eval()
    torch.testing.assert_close(torch.cat([reference.chosen, reference.rejected]), completion_logps(plain, batch), **TOL)


def test_all_linear_lora_adapts_the_text_decoder_only(gemma3):
    bank = AdapterBank(BankSpec(model=gemma3, adapters=[]), require=[])
    adapted = {name.removeprefix("base_model.model.") for name, module in dpo(gemma3).bank.model.named_modules()
               if isinstance(module, BaseTunerLayer)}
    text_linears = {name for name, module in bank.model.named_modules()
                    if isinstance(module, nn.Linear) and name.startswith("model.language_model.")}
    assert len(text_linears) == 14 and adapted == text_linears  # 7 projections in each of 2 layers
    assert any(isinstance(m, nn.Linear) for m in bank.model.model.vision_tower.modules())  # there to be left out


def test_gemma3_dpo_fit_lowers_its_loss_and_exports_as_gemma3_for_conditional_generation(gemma3, tmp_path):
    pl.seed_everything(0)
    method = dpo(gemma3)
    train = tmp_path / "pairs.jsonl"  # one batch of 8 pairs, every step the one measured
    train.write_text("".join(open(PREFERENCE).readlines()[:8]))
    batch = preference_batch(method, rows=8, train=str(train))
    with torch.no_grad():
        before, _ = method.compute_loss(batch)
    pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(
        method, PreferenceDataModule(train=str(train), batch_size=8, max_length=64))
    method.bank.eval()
    with torch.no_grad():
        after, _ = method.compute_loss(batch)
        trained = method.policy_pair_logps(batch)
    assert after < before - 0.1, (before, after)  # measured: 0.6931 -> 0.0284

    merged = method.bank.export_merged(tmp_path / "merged", adapter="policy")
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    reloaded = AutoModelForImageTextToText.from_pretrained(merged).eval()
    assert isinstance(reloaded, Gemma3ForConditionalGeneration)
    torch.testing.assert_close(completion_logps(reloaded, batch), torch.cat([trained.chosen, trained.rejected]), **TOL)
    assert_vision_as_loaded(reloaded, gemma3)

    encoded = method.tokenizer("the movie was", return_tensors="pt")
    prompt = encoded["input_ids"], encoded["attention_mask"]
    sampled = method.bank.generate(*prompt, adapter="policy", max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(sampled, reloaded.generate(input_ids=prompt[0], attention_mask=prompt[1], max_new_tokens=6,
                                                      do_sample=False))


@pytest.mark.parametrize(("model_type", "text_type"), [("mistral3", "mistral"), ("llava", "llama")])
def test_a_multimodal_layout_automodelforcausallm_does_not_load_is_refused_at_setup(tmp_path, model_type, text_type):
    architecture = {"mistral3": "Mistral3ForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}[model_type]
    AutoConfig.for_model(model_type, architectures=[architecture]).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match=rf"bank.model '{tmp_path}' is a '{model_type}' checkpoint \({architecture}\) "
                       rf"that transformers' AutoModelForCausalLM does not load: .*a '{text_type}' causal LM.*set bank.model"):
        AdapterBank(BankSpec(model=str(tmp_path)))


def test_a_qlora_export_merges_into_the_dequantized_text_decoder_and_keeps_the_vision_tower(gemma3, tmp_path):
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=gemma3, train_mode="qlora", lora=LoraSpec(r=4, alpha=8)),
                       require=[AdapterSpec("policy")]).eval()
    lora_off_zero(bank, 0.05)
    ids = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        trained = bank(ids, torch.ones_like(ids)).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(bank.export_merged(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, **TOL)
    assert_vision_as_loaded(reloaded, gemma3)  # not rounded to 4 bits: no adapter trained against it


def test_the_static_cache_engine_samples_gemma3_as_generate_does(gemma3):
    tokenizer = load_tokenizer(BankSpec(model=gemma3))
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=gemma3), require=[AdapterSpec("policy")]).eval()
    lora_off_zero(bank, 0.5)
    ids, mask = encode(tokenizer, PROMPTS)
    sampling = greedy(tokenizer, max_new_tokens=20, stop_token_ids=[tokenizer.eos_token_id])  # past the window
    for adapter in ("policy", None):
        expected = build_engine("hf").generate(bank, adapter, ids, mask, sampling).response_ids
        assert torch.equal(fast_engine().generate(bank, adapter, ids, mask, sampling).response_ids, expected)


def test_score_and_value_heads_read_the_hidden_state_gemma3_s_lm_head_reads(gemma3):
    bank = AdapterBank(BankSpec(model=gemma3), require=[AdapterSpec("reward", head="score"),
                                                        AdapterSpec("value", head="value")]).eval()
    lora_off_zero(bank, 0.5)
    ids = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    read = []
    hook = bank.output_embeddings().register_forward_pre_hook(lambda module, args: read.append(args[0]))
    with torch.no_grad():
        try:
            for adapter in ("reward", "value"):
                with bank.role(adapter):
                    bank(ids, mask)
        finally:
            hook.remove()
        torch.testing.assert_close(bank.score(ids, mask, adapter="reward"), bank.heads["reward"](read[0])[[0, 1], [5, 3]])
        torch.testing.assert_close(bank.values(ids, mask, adapter="value"), bank.heads["value"](read[1]))
