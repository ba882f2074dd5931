"""AdapterBank: roles, reference, trainable state, heads, saving and export."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer
from lit_rlhf.models.saving import atomic_directory
from lit_rlhf.toy.build import build_tokenizer, tiny_config

TEXTS = ["the movie was good and fun .", "i think the car is"]


@pytest.fixture
def batch():
    tok = load_tokenizer(BankSpec())
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def perturb(bank: AdapterBank, adapter: str, seed: int = 0) -> None:
    """Give ``adapter`` non-zero LoRA B matrices (fresh LoRA is an exact no-op) and head weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if f".{adapter}." in name and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def three_role_bank(**spec_kwargs) -> AdapterBank:
    torch.manual_seed(0)  # fresh LoRA A matrices are drawn from the global RNG: same bank whatever ran before
    spec = BankSpec(adapters=[AdapterSpec("reward", head="score", trainable=False)], **spec_kwargs)
    return AdapterBank(spec, require=[AdapterSpec("policy"), AdapterSpec("value", head="value")])


def test_roles_restore_previous_adapter_even_on_error(batch):
    bank = three_role_bank()
    assert bank.active == "policy"
    with bank.role("reward"):
        assert bank.active == "reward"
        with bank.role("value"):
            assert bank.active == "value"
        assert bank.active == "reward"
    with pytest.raises(RuntimeError, match="boom"):
        with bank.role("value"):
            raise RuntimeError("boom")
    assert bank.active == "policy"
    bank.score(*batch, adapter="reward")
    assert bank.active == "policy"
    with pytest.raises(KeyError, match="no adapter named 'critic'"):
        with bank.role("critic"):
            pass


def test_reference_is_the_base_with_adapters_off(batch):
    bank = three_role_bank()
    perturb(bank, "policy")
    plain = AutoModelForCausalLM.from_pretrained("assets/toy/base")
    with torch.no_grad():
        base_logits = plain(input_ids=batch[0], attention_mask=batch[1]).logits
    with bank.role("policy"):
        policy_logits = bank(*batch).logits
    with bank.reference():
        ref_logits = bank(*batch).logits
        assert not torch.is_grad_enabled()
    assert bank.active == "policy"
    torch.testing.assert_close(ref_logits, base_logits)
    assert (policy_logits - base_logits).abs().max() > 1e-2


def test_reference_inside_a_frozen_role_leaves_adapters_and_trainability_as_they_were(batch):
    bank = three_role_bank()
    perturb(bank, "reward")
    trainable = {n for n, p in bank.named_parameters() if p.requires_grad}
    with bank.role("reward"):
        before = bank(*batch).logits
        with bank.reference():
            bank(*batch)
        # peft's disable_adapter() re-enables through set_adapter, which makes the active adapter trainable
        assert {n for n, p in bank.named_parameters() if p.requires_grad} == trainable
        torch.testing.assert_close(bank(*batch).logits, before)  # the frozen adapter is on again
    assert {n for n, p in bank.named_parameters() if p.requires_grad} == trainable


def test_trainable_set_is_ours_not_peft_s(batch):
    bank = three_role_bank()
    trainable = set(bank.trainable_names())
    assert trainable and all(".reward." not in n and not n.startswith("heads.reward") for n in trainable)
    assert any(".policy." in n for n in trainable) and any(".value." in n for n in trainable)
    assert "heads.value.linear.weight" in trainable
    # peft's set_adapter would make the reward adapter trainable; the bank must undo that.
    with bank.role("reward"):
        pass
    assert {n for n, p in bank.named_parameters() if p.requires_grad} == trainable
    assert all("lora_" in n or n.startswith("heads.") for n in trainable)


def test_the_active_role_switches_nothing_and_the_reference_keeps_trainability_ours(monkeypatch):
    bank = three_role_bank()
    trainable = set(bank.trainable_names())
    switches = []
    set_adapter = bank.model.set_adapter
    monkeypatch.setattr(bank.model, "set_adapter", lambda name: switches.append(name) or set_adapter(name))
    with bank.role("value"):
        with bank.role("value"):  # already active: no peft walk over every module
            pass
    assert switches == ["value", "policy"]  # in, and back to the policy (active since the bank was built)
    # Switching the adapters back on after the reference, peft makes the active adapter trainable (here the
    # frozen reward adapter); the bank undoes it at once, not only when a role switch happens to follow.
    with bank.role("reward"):
        with bank.reference():
            pass
        assert {n for n, p in bank.named_parameters() if p.requires_grad} == trainable


def test_score_and_value_heads_shapes(batch):
    bank = three_role_bank()
    scores = bank.score(*batch, adapter="reward")
    values = bank.values(*batch, adapter="value")
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert values.shape == batch[0].shape
    # The score is the head at the last attended token: equal to the value-style read there.
    with bank.role("reward"):
        hidden = bank._hidden(*batch)
    last = batch[1].sum(1) - 1
    torch.testing.assert_close(scores, bank.heads["reward"](hidden)[torch.arange(2), last])
    with pytest.raises(KeyError, match="no value head"):
        bank.values(*batch, adapter="reward")


def test_saved_adapter_loads_with_peft_and_matches(batch, tmp_path):
    bank = three_role_bank()
    perturb(bank, "policy")
    with torch.no_grad():
        bank.heads["reward"].linear.weight.normal_()
    with bank.role("policy"), torch.no_grad():
        expected = bank(*batch).logits
    bank.save_adapter("policy", tmp_path / "policy")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("assets/toy/base"), tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=batch[0], attention_mask=batch[1]).logits, expected)

    expected_scores = bank.score(*batch, adapter="reward")
    bank.save_adapter("reward", tmp_path / "reward")
    reloaded = AdapterBank(BankSpec(adapters=[AdapterSpec("reward", path=str(tmp_path / "reward"), head="score", trainable=False)]))
    torch.testing.assert_close(reloaded.score(*batch, adapter="reward"), expected_scores)
    assert reloaded.trainable_names() == []


def test_export_merged_is_plain_transformers(batch, tmp_path):
    bank = three_role_bank()
    perturb(bank, "policy")
    with bank.role("policy"), torch.no_grad():
        expected = bank(*batch).logits
    bank.export_merged(tmp_path / "merged", adapter="policy")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token == "<pad>"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch[0], attention_mask=batch[1]).logits, expected, atol=1e-5, rtol=1e-4)


def test_adapter_from_another_base_fails_clearly(tmp_path):
    other = tmp_path / "other-base"
    tokenizer = build_tokenizer()
    AutoModelForCausalLM.from_config(tiny_config(tokenizer, hidden_size=32)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    small = AdapterBank(BankSpec(model=str(other)), require=[AdapterSpec("reward", head="score")])
    small.save_adapter("reward", tmp_path / "reward")
    with pytest.raises(ValueError, match=r"adapter 'reward' .* different base model .*hidden_size"):
        AdapterBank(BankSpec(adapters=[AdapterSpec("reward", path=str(tmp_path / "reward"), head="score")]))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_an_adapter_with_lora_biases_is_refused_before_it_overwrites_the_base(bias, tmp_path):
    """peft writes such an adapter's biases into the base's own tensors (read by the reference and every role)
    and trains them; the bank would have frozen them silently."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained("assets/toy/base"),
                           LoraConfig(r=2, target_modules=["q_proj"], bias=bias))
    model.save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match=rf"adapter 'policy' at .*sft was saved with LoRA bias '{bias}'"):
        AdapterBank(BankSpec(adapters=[AdapterSpec("policy", path=str(tmp_path / "sft"))]))


def test_all_linear_targets_the_same_layers_after_an_adapter_that_saved_the_lm_head_whole(tmp_path):
    """PPO's bank from an SFT adapter that trained the LM head whole (``modules_to_save``, as TRL's SFT does for
    added tokens): peft resolved the value adapter's ``all-linear`` on the wrapped model, put LoRA on the LM head
    (both copies), and the policy's reference copy then failed to load."""
    from peft import LoraConfig, get_peft_model

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained("assets/toy/base"),
                         LoraConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    sft.save_pretrained(tmp_path / "sft")
    spec = BankSpec(adapters=[AdapterSpec("policy", path=str(tmp_path / "sft"))])
    bank = AdapterBank(spec, require=[AdapterSpec("policy"), AdapterSpec("value", head="value")], reference_of="policy")
    alone = AdapterBank(BankSpec(), require=[AdapterSpec("value", head="value")])

    def lora_layers(b):
        return sorted(n.split(".lora_A.")[0].replace("base_model.model.", "")
                      for n, _ in b.named_parameters() if ".lora_A.value." in n)

    assert lora_layers(bank) == lora_layers(alone)
    assert not any("lm_head" in n for n in lora_layers(bank))
    assert bank.reference_adapter is not None


def test_pad_token_rule_is_stated_and_logged(tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained("assets/toy/base")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        loaded = load_tokenizer(BankSpec(tokenizer=str(tmp_path / "nopad")))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert "has no pad token: using its eos_token" in caplog.text


def test_qlora_base_is_4bit_and_trains(batch):
    import bitsandbytes as bnb

    bank = AdapterBank(BankSpec(train_mode="qlora", dtype="float32"), require=[AdapterSpec("policy")])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in bank.modules())
    with bank.role("policy"):
        loss = bank(*batch).logits.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in bank.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_full_mode_reference_is_a_frozen_copy(batch):
    bank = AdapterBank(BankSpec(train_mode="full"), require=[AdapterSpec("policy")], reference_of="policy")
    assert len(bank.trainable_names()) == len(list(bank.model.parameters()))
    with torch.no_grad():
        for p in bank.model.parameters():
            p.add_(0.01)
    with bank.reference():
        ref = bank(*batch).logits
    plain = AutoModelForCausalLM.from_pretrained("assets/toy/base")
    with torch.no_grad():
        torch.testing.assert_close(ref, plain(input_ids=batch[0], attention_mask=batch[1]).logits)
    with pytest.raises(ValueError, match="one trainable role"):
        AdapterBank(BankSpec(train_mode="full"), require=[AdapterSpec("policy"), AdapterSpec("value", head="value")])


def test_atomic_directory_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(OSError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("half")
            raise OSError("disk full")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    import os

    from lit_rlhf.models import saving

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(saving.os, "fsync", fsync)
    monkeypatch.setattr(saving.os, "replace", replace)
    with atomic_directory(tmp_path / "out") as d:
        (d / "weights.safetensors").write_bytes(b"w")
        (d / "config.json").write_text("{}")
    rename = events.index(("rename", "out"))
    synced_before = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"weights.safetensors", "config.json"} <= synced_before
    assert ("fsync", tmp_path.name) in events[rename:], "the rename itself was not made durable"


def test_adapter_loaded_onto_another_model_of_the_same_shape_warns(tmp_path, caplog):
    import shutil

    bank = three_role_bank()
    bank.save_adapter("reward", tmp_path / "reward")
    shutil.copytree("assets/toy/base", tmp_path / "sft-merged")  # same shapes, another model
    spec = BankSpec(model=str(tmp_path / "sft-merged"),
                    adapters=[AdapterSpec("reward", path=str(tmp_path / "reward"), head="score", trainable=False)])
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.models"):
        AdapterBank(spec)
    assert "adapter 'reward' was trained on" in caplog.text and "sft-merged" in caplog.text
