import torch

from lit_rlhf.data import (
    PackingCollator,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    SFTDataModule,
    UnpairedCollator,
)

PAD = 3  # the pad id equals the eos id on purpose: masks must come from lengths

PAIRS = [
    {"prompt_ids": [2, 10, 11], "chosen_ids": [20, 3], "rejected_ids": [30, 31, 32, 3]},
    {"prompt_ids": [2, 12], "chosen_ids": [21, 22, 3], "rejected_ids": [33, 3]},
]


def test_preference_collator_stacks_chosen_then_rejected():
    batch = PreferenceCollator(PAD)(PAIRS)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].shape == (4, 7)
    assert batch["input_ids"].tolist() == [
        [2, 10, 11, 20, 3, PAD, PAD],
        [2, 12, 21, 22, 3, PAD, PAD],
        [2, 10, 11, 30, 31, 32, 3],
        [2, 12, 33, 3, PAD, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]


SFT = [{"prompt_ids": [2, 10], "completion_ids": [20, 3]}, {"prompt_ids": [], "completion_ids": [2, 11, 21, 3]}]


def test_sft_collator_masks():
    batch = SFTCollator(PAD)(SFT)
    assert batch["input_ids"].tolist() == [[2, 10, 20, 3], [2, 11, 21, 3]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]  # a text row is all completion
    full = SFTCollator(PAD, completion_only_loss=False)(SFT[:1] + [{"prompt_ids": [2], "completion_ids": [3]}])
    assert full["completion_mask"].tolist() == full["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_unpaired_collator_with_mismatched_kl_batch():
    examples = [
        {"prompt_ids": [2, 10], "completion_ids": [20, 3], "label": True},
        {"prompt_ids": [2, 11, 12], "completion_ids": [21, 22, 23, 3], "label": False},
        {"prompt_ids": [2, 13], "completion_ids": [24, 3], "label": True},
    ]
    batch = UnpairedCollator(PAD)(examples)
    assert batch["labels"].tolist() == [True, False, True] and batch["labels"].dtype == torch.bool
    assert batch["input_ids"].shape == (3, 7)
    assert batch["kl_input_ids"].tolist() == [[2, 10, 21, 22, 23, 3], [2, 11, 12, 24, 3, PAD], [2, 13, 20, 3, PAD, PAD]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert batch["kl_attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0], [1] * 4 + [0, 0]]


def test_unpaired_kl_rows_are_cut_to_the_data_modules_max_length(toy_tokenizer, toy_data):
    """Every row fits max_length = 5, but prompt 2 (3 tokens) with completion 3 (3 tokens) would not: its
    KL row keeps that completion's first 2 tokens, as TRL's collator does."""
    from lit_rlhf.data import UnpairedDataModule

    examples = [
        {"prompt_ids": [2, 10], "completion_ids": [20, 3], "label": True},
        {"prompt_ids": [2, 11, 12], "completion_ids": [21, 3], "label": False},
        {"prompt_ids": [2, 13], "completion_ids": [24, 25, 3], "label": True},
    ]
    data = UnpairedDataModule(train=str(toy_data / "unpaired_train.jsonl"), max_length=5)
    collator = data.make_collator(toy_tokenizer)
    batch = collator(examples)
    pad = toy_tokenizer.pad_token_id
    assert batch["kl_input_ids"].tolist() == [[2, 10, 21, 3, pad], [2, 11, 12, 24, 25], [2, 13, 20, 3, pad]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]
    assert batch["input_ids"].shape == (3, 5)  # the rows themselves are untouched


def test_unpaired_kl_rows_without_max_length_are_cut_to_the_longest_row_of_the_data(toy_tokenizer, tmp_path):
    """With max_length: null a long prompt with another row's long completion made a KL row longer than any
    row of the data, which the setup's check against the model's positions never saw (GPT-2: an IndexError
    mid-run). It keeps the head of that completion, up to the longest row."""
    import json

    from lit_rlhf.data import UnpairedDataModule

    words = "the movie was great fun but boring . "
    rows = [{"prompt": words * 4, "completion": "fun .", "label": True},
            {"prompt": "the book was", "completion": words * 4, "label": False}]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = UnpairedDataModule(train=str(path), batch_size=2, max_length=None).prepare(toy_tokenizer)
    long_prompt, long_completion = data.train_examples
    longest = max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in data.train_examples)
    assert len(long_prompt["prompt_ids"]) + len(long_completion["completion_ids"]) > longest
    batch = data.collator(data.train_examples)
    assert batch["kl_input_ids"].shape[1] == longest
    kept = longest - len(long_prompt["prompt_ids"])
    assert batch["kl_input_ids"][0].tolist() == long_prompt["prompt_ids"] + long_completion["completion_ids"][:kept]
    assert batch["input_ids"].shape[1] == longest  # the rows themselves are untouched


def test_unpaired_collator_keeps_kl_pairs_fixed_in_the_data():
    """Examples carrying their own KL pair (KTO's precomputed reference) keep it whatever the batch,
    one row included, and bring their reference log-probs."""
    examples = [
        {"prompt_ids": [2, 10], "completion_ids": [20, 3], "label": True, "kl_completion_ids": [24, 3],
         "ref_logps": -1.5, "ref_kl_logps": -4.0},
        {"prompt_ids": [2, 13], "completion_ids": [24, 3], "label": False, "kl_completion_ids": [20, 3],
         "ref_logps": -2.5, "ref_kl_logps": -3.0},
    ]
    batch = UnpairedCollator(PAD)(examples[::-1])
    assert batch["kl_input_ids"].tolist() == [[2, 13, 20, 3], [2, 10, 24, 3]]
    assert batch["ref_logps"].tolist() == [-2.5, -1.5] and batch["ref_kl_logps"].tolist() == [-3.0, -4.0]
    assert UnpairedCollator(PAD)(examples[:1])["kl_input_ids"].tolist() == [[2, 10, 24, 3]]


def test_prompt_collator_left_pads():
    examples = [{"prompt_ids": [2, 10, 11], "prompt_text": "a b", "prompt": "a b"},
                {"prompt_ids": [2, 12], "prompt_text": "<|user|> c", "prompt": [{"role": "user", "content": "c"}]}]
    batch = PromptCollator(PAD)(examples)
    assert batch["prompt_input_ids"].tolist() == [[2, 10, 11], [PAD, 2, 12]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["prompts"] == ["a b", "<|user|> c"]
    assert batch["raw_prompts"] == ["a b", [{"role": "user", "content": "c"}]]


def test_packing_collator_layout():
    batch = PackingCollator(PAD)(SFT)
    assert set(batch) == {"input_ids", "position_ids", "completion_mask"}  # no attention mask
    assert batch["input_ids"].tolist() == [[2, 10, 20, 3, 2, 11, 21, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    # Each example's first token is out of the mask: nothing in its own sequence predicts it.
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1]]


def test_packing_collator_bins_to_max_length():
    examples = SFT + [{"prompt_ids": [2], "completion_ids": [22, 3]}]
    batch = PackingCollator(PAD, max_length=7)(examples)
    assert batch["input_ids"].tolist() == [[2, 10, 20, 3, PAD, PAD, PAD], [2, 11, 21, 3, 2, 22, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 1, 1]]


def _token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, (seq - 1,)."""
    return logits[:-1].log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)


def test_packed_log_probs_equal_padded(toy_tokenizer, toy_data):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(toy_data.parent / "base")).eval()
    module = SFTDataModule(train=str(toy_data / "sft_val.jsonl"), tokenizer=toy_tokenizer).prepare()
    examples = module.train_examples[:5]
    padded, packed = SFTCollator(toy_tokenizer.pad_token_id)(examples), PackingCollator(toy_tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    start = 0
    for i, example in enumerate(examples):
        n = len(example["prompt_ids"]) + len(example["completion_ids"])
        ids = packed["input_ids"][0, start : start + n]
        assert torch.equal(ids, padded["input_ids"][i, :n])
        torch.testing.assert_close(_token_logps(packed_logits[0, start : start + n], ids),
                                   _token_logps(padded_logits[i, :n], ids), atol=1e-5, rtol=0)
        # Targets are tokens 1..n-1 of each example (token 0 is never predicted): same in both.
        assert torch.equal(packed["completion_mask"][0, start + 1 : start + n], padded["completion_mask"][i, 1:n])
        start += n
    assert start == packed["input_ids"].shape[1]
