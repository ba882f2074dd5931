"""Padding-free forwards of the offline methods: the same log-probs, losses and gradients as the padded
batch on every family that supports packing (Gemma 3's sliding windows too), and padding where a model does not
(OPT, BLOOM: masks without position_ids; Falcon-RW: ALiBi biases counted along the row)."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, UnpairedCollator, UnpairedDataModule
from lit_rlhf.losses import sequence_logps, unpack_tokens
from lit_rlhf.methods import DPO, KTO, PreferenceMethod, RewardModeling
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.packing import pack_rows
from tests.methods.tiny_families import FAMILIES, PREFERENCE, TOL, UNPAIRED, build_families, move_off_reference

MORE = ["gemma3_text"]  # sliding-window layers
UNPACKED = {"opt": "OPTForCausalLM", "bloom": "BloomForCausalLM"}  # masks built without position_ids
#: The score read from the trunk's hidden state: multipliers (Granite), Falcon's trunk, partial rotary, mixtures of experts.
REWARD_MORE = ["granite", "falcon", "phi", "qwen3_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), [*FAMILIES, *MORE, *UNPACKED, "falcon_alibi", *REWARD_MORE])


def twins(cls, model: str, train_mode: str = "lora", **kwargs):
    """The same method and weights twice: padding-free (auto) and padded. LoRA B moved off zero, so
    the policy differs from the reference."""
    def make(padding_free):
        method = cls(bank=BankSpec(model=model, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8)),
                     padding_free=padding_free, **kwargs)
        method.configure_model()
        return method

    packed, padded = make(None), make(False)
    move_off_reference(packed.bank, train_mode)
    padded.bank.load_state_dict(packed.bank.state_dict())
    assert packed.uses_packing() and not padded.uses_packing()
    return packed, padded


def long_tailed(examples: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The first example's completions three times over: one long row, so short ones share packed rows."""
    first = {**examples[0], **{field: examples[0][field] * 3 for field in fields}}
    return [first, *examples[1:]]


def preference_batch(method, batch_size: int = 4) -> dict:
    data = PreferenceDataModule(train=PREFERENCE, max_length=64).prepare(method.tokenizer)
    return data.collator(long_tailed(data.train_examples[:batch_size], ("chosen_ids", "rejected_ids")))


def unpaired_batch(method, batch_size: int = 4) -> dict:
    data = UnpairedDataModule(train=UNPAIRED, max_length=64).prepare(method.tokenizer)
    # The long-tailed row is none of the data's, whose longest row bounds the data module's KL rows: cut at
    # max_length only, the KL rows keep a long tail too.
    collator = UnpairedCollator(data.collator.pad_token_id, data.max_length)
    return collator(long_tailed(data.train_examples[:batch_size], ("completion_ids",)))


def packs_several_per_row(method, batch: dict, prefix: str = "") -> bool:
    packed = method.packed(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
    return packed.input_ids.shape[0] < batch[f"{prefix}input_ids"].shape[0]


def test_pack_rows_and_back_on_hand_made_rows():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    one_row = pack_rows(ids, mask)  # flash-attention's layout
    assert one_row.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert one_row.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert one_row.last_tokens.tolist() == [2, 4, 8]
    values = torch.arange(9.0)[None]
    assert unpack_tokens(values, one_row.layout).tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]]
    # Rows no wider than the padded batch (sdpa, eager): 3 + 2 tokens fill one, 4 the next; the first
    # row's tail is a sequence of its own (positions restart) that no loss reads.
    rows = pack_rows(ids, mask, row_width=4 + 1)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert rows.last_tokens.tolist() == [2, 4, 8]
    values = torch.arange(10.0).view(2, 5)
    assert unpack_tokens(values, rows.layout).tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]]


def test_one_row_layout_gives_the_padded_log_probs(models):
    """flash-attention's layout (the whole batch in one row) read back through the same functions."""
    method = DPO(bank=BankSpec(model=models["llama"], lora=LoraSpec(r=4)))
    method.configure_model()
    batch = preference_batch(method)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    packed = pack_rows(ids, mask)
    with torch.no_grad():
        logits = method.bank(packed.input_ids, None, packed.position_ids).logits
        expected = sequence_logps(method.bank(ids, mask).logits, ids, completion)
    ours = sequence_logps(logits, ids, completion, packed.layout)
    torch.testing.assert_close(ours.logps, expected.logps, **TOL)
    assert torch.equal(ours.num_tokens, expected.num_tokens)


@pytest.mark.parametrize("family", FAMILIES + MORE)
def test_dpo_log_probs_and_loss_match_the_padded_batch(models, family):
    # LD-DPO's reweighted sums and WPO's weights read per-token log-probs and the logits: both paths.
    packed, padded = twins(DPO, models[family], beta=0.5, ld_alpha=0.5, use_weighting=True)
    batch = preference_batch(packed)
    assert packs_several_per_row(packed, batch)
    with torch.no_grad(), packed.bank.role("policy"), padded.bank.role("policy"):
        for ours, theirs in zip(packed.pair_logps(batch, with_weights=True), padded.pair_logps(batch, with_weights=True)):
            torch.testing.assert_close(ours, theirs, **TOL)
        # The shared path of SimPO, CPO, ORPO and the precomputed reference: summed log-probs only.
        for ours, theirs in zip(PreferenceMethod.pair_logps(packed, batch), PreferenceMethod.pair_logps(padded, batch)):
            torch.testing.assert_close(ours, theirs, **TOL)
    loss, _ = packed.compute_loss(batch)
    expected, _ = padded.compute_loss(batch)
    assert not torch.isclose(expected, torch.tensor(0.6931), atol=1e-3), "policy and reference should differ"
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kto_log_probs_and_loss_match_the_padded_batch(models, family):
    packed, padded = twins(KTO, models[family], beta=0.5)
    batch = unpaired_batch(packed)
    assert packs_several_per_row(packed, batch) and packs_several_per_row(packed, batch, "kl_")
    with torch.no_grad(), packed.bank.role("policy"), padded.bank.role("policy"):
        for prefix in ("", "kl_"):
            ours, theirs = packed.completion_logps(batch, prefix), padded.completion_logps(batch, prefix)
            torch.testing.assert_close(ours.logps, theirs.logps, **TOL)
            assert torch.equal(ours.num_tokens, theirs.num_tokens)
    loss, metrics = packed.compute_loss(batch)
    expected, expected_metrics = padded.compute_loss(batch)
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(metrics["kl"][0], expected_metrics["kl"][0], **TOL)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3_text", *REWARD_MORE])
def test_reward_scores_read_each_sequence_last_token_as_padded(models, family):
    packed, padded = twins(RewardModeling, models[family])
    batch = preference_batch(packed)
    assert packs_several_per_row(packed, batch)
    with torch.no_grad():
        for ours, theirs in zip(packed.pair_scores(batch), padded.pair_scores(batch)):
            torch.testing.assert_close(ours, theirs, **TOL)
    loss, _, metrics = packed.compute_loss(batch)
    expected, _, expected_metrics = padded.compute_loss(batch)
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(metrics["rewards/margins"], expected_metrics["rewards/margins"], **TOL)


def test_full_mode_training_step_gradients_match_the_padded_batch(models):
    """Full fine-tuning (the frozen reference copy runs padding-free too): one step's loss and every
    gradient equal the padded batch's."""
    packed, padded = twins(DPO, models["llama"], train_mode="full", beta=0.5)
    batch = preference_batch(packed)
    for method in (packed, padded):
        method.bank.train()
        method.compute_loss(batch)[0].backward()
    trained = [(name, param) for name, param in packed.bank.named_parameters() if param.requires_grad]
    others = dict(padded.bank.named_parameters())
    assert trained and all(param.grad is not None for _, param in trained)
    for name, param in trained:
        torch.testing.assert_close(param.grad, others[name].grad, **TOL, msg=name)


@pytest.mark.parametrize("family", UNPACKED)
def test_a_model_whose_mask_ignores_position_ids_falls_back_to_padding(models, family, caplog):
    """OPT and BLOOM build their attention mask without position_ids: packed sequences would attend to each
    other (forced packing gives other log-probs), so auto mode pads and padding_free: true is refused."""
    auto = DPO(bank=BankSpec(model=models[family], lora=LoraSpec(r=4)))
    auto.configure_model()
    with caplog.at_level("INFO", logger="lit_rlhf.methods"):
        assert not auto.uses_packing()
    assert "padding-free forward off" in caplog.text and UNPACKED[family] in caplog.text
    batch = preference_batch(auto)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    packed = pack_rows(ids, mask)
    with torch.no_grad():
        forced = sequence_logps(auto.bank(packed.input_ids, None, packed.position_ids).logits, ids, completion,
                                packed.layout)
        padded = sequence_logps(auto.bank(ids, mask).logits, ids, completion)
    assert (forced.logps - padded.logps).abs().max() > 1e-3, "packed sequences should have read each other"

    strict = DPO(bank=BankSpec(model=models[family], lora=LoraSpec(r=4)), padding_free=True)
    strict.configure_model()
    with pytest.raises(ValueError, match=f"padding_free: true, but {UNPACKED[family]}"):
        strict.uses_packing()


def test_alibi_counted_along_the_row_falls_back_to_padding(models, caplog):
    """Falcon-RW adds ALiBi biases from each token's place in the whole row, computed in bfloat16 whatever the
    model's dtype: a sequence packed after 256 tokens of others reads other biases than alone (the short probe row
    passes), so auto mode pads and padding_free: true is refused."""
    auto = DPO(bank=BankSpec(model=models["falcon_alibi"], lora=LoraSpec(r=4)))
    auto.configure_model()
    with caplog.at_level("INFO", logger="lit_rlhf.methods"):
        assert not auto.uses_packing()
    assert "padding-free forward off (its ALiBi biases count positions along the whole packed row" in caplog.text
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 60, (4, 100), generator=g)
    mask = torch.ones_like(ids)
    completion = mask.clone()
    completion[:, :10] = 0
    packed = pack_rows(ids, mask)  # one row of 400 tokens
    with torch.no_grad():
        forced = sequence_logps(auto.bank(packed.input_ids, None, packed.position_ids).logits, ids, completion,
                                packed.layout)
        padded = sequence_logps(auto.bank(ids, mask).logits, ids, completion)
    assert (forced.logps[0] - padded.logps[0]).abs() < 1e-5  # at the start of the row: as alone
    assert (forced.logps[1:] - padded.logps[1:]).abs().max() > 1e-3, "past 256 tokens the biases are others"

    strict = DPO(bank=BankSpec(model=models["falcon_alibi"], lora=LoraSpec(r=4)), padding_free=True)
    strict.configure_model()
    with pytest.raises(ValueError, match="padding_free: true, but FalconForCausalLM .*ALiBi biases"):
        strict.uses_packing()
