import pytest

from lit_rlhf.data import DataError, Where, build_examples, tokenize_record

WHERE = Where("x.jsonl", 7)
USER = {"role": "user", "content": "the class was"}


def _ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_plain_boundary_on_token_ids(toy_tokenizer):
    example, cut = tokenize_record("sft", {"prompt": "the class was", "completion": "good ."}, toy_tokenizer, WHERE,
                                   conversational=False)
    assert not cut
    assert example["prompt_ids"] == _ids(toy_tokenizer, "the class was", special=True)
    assert example["prompt_ids"][0] == toy_tokenizer.bos_token_id
    assert toy_tokenizer.decode(example["completion_ids"]) == "good . </s>"
    assert example["prompt_text"] == "the class was"


def test_plain_completion_keeps_its_own_eos(toy_tokenizer):
    example, _ = tokenize_record("sft", {"prompt": "the class was", "completion": "good . </s>"}, toy_tokenizer, WHERE,
                                 conversational=False)
    assert example["completion_ids"].count(toy_tokenizer.eos_token_id) == 1


def test_text_row_is_all_completion(toy_tokenizer):
    example, _ = tokenize_record("sft", {"prompt": None, "completion": "the class was good ."}, toy_tokenizer, WHERE,
                                 conversational=False)
    assert example["prompt_ids"] == []
    assert example["completion_ids"] == _ids(toy_tokenizer, "the class was good . </s>", special=True)


def test_conversational_rendering_via_chat_template(toy_tokenizer):
    record = {"prompt": [USER], "completion": [{"role": "assistant", "content": "good ."}], "label": True}
    example, _ = tokenize_record("unpaired", record, toy_tokenizer, WHERE, conversational=True)
    assert example["prompt_text"] == "<|user|> the class was <|assistant|> "
    assert example["prompt_ids"] == _ids(toy_tokenizer, example["prompt_text"])  # no bos added on top of the template
    assert toy_tokenizer.decode(example["completion_ids"]) == "good . </s>"
    full = toy_tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
    assert example["prompt_ids"] + example["completion_ids"] == _ids(toy_tokenizer, full)
    assert example["prompt"] == [USER] and example["label"] is True


def test_sft_messages_split_before_last_assistant_turn(toy_tokenizer):
    rows = [(WHERE, {"messages": [{"role": "system", "content": "be kind"}, USER,
                                  {"role": "assistant", "content": "good ."}]})]
    (example,), errors = build_examples("sft", rows, toy_tokenizer)
    assert not errors
    assert example["prompt_text"] == "<|system|> be kind <|user|> the class was <|assistant|> "
    assert toy_tokenizer.decode(example["completion_ids"]) == "good . </s>"


def test_implicit_prompt_plain_is_common_token_prefix(toy_tokenizer):
    record = {"prompt": None, "chosen": "the class was good .", "rejected": "the class was bad ."}
    example, _ = tokenize_record("preference", record, toy_tokenizer, WHERE, conversational=False)
    assert example["prompt_ids"] == _ids(toy_tokenizer, "the class was", special=True)
    assert example["prompt_text"] == "the class was"
    assert toy_tokenizer.decode(example["chosen_ids"]) == "good . </s>"
    assert toy_tokenizer.decode(example["rejected_ids"]) == "bad . </s>"


def test_implicit_prompt_conversational_is_common_leading_messages(toy_tokenizer):
    record = {"prompt": None, "chosen": [USER, {"role": "assistant", "content": "good ."}],
              "rejected": [USER, {"role": "assistant", "content": "bad ."}]}
    example, _ = tokenize_record("preference", record, toy_tokenizer, WHERE, conversational=True)
    assert example["prompt"] == [USER]
    assert example["prompt_text"] == "<|user|> the class was <|assistant|> "
    assert toy_tokenizer.decode(example["chosen_ids"]) == "good . </s>"
    assert toy_tokenizer.decode(example["rejected_ids"]) == "bad . </s>"


def test_implicit_prompt_needs_a_difference_after_the_prefix(toy_tokenizer):
    rows = [(WHERE, {"chosen": "the class was", "rejected": "the class was good ."})]
    examples, (error,) = build_examples("preference", rows, toy_tokenizer)
    assert not examples and "x.jsonl:7: field 'chosen'" in str(error)


def test_truncate_keeps_prompt_end_and_cuts_completion(toy_tokenizer):
    record = {"prompt": "honestly the class was", "chosen": "really good and fun .", "rejected": "bad ."}
    example, cut = tokenize_record("preference", record, toy_tokenizer, WHERE, conversational=False, max_length=5,
                                   max_prompt_length=2, truncation="truncate")
    assert cut
    assert example["prompt_ids"] == _ids(toy_tokenizer, "<s> was")  # the end of the prompt, behind its BOS
    assert example["chosen_ids"] == _ids(toy_tokenizer, "really good and")  # cut on the right
    assert example["rejected_ids"] == _ids(toy_tokenizer, "bad . </s>")


def test_truncate_leaves_every_completion_a_token(toy_tokenizer):
    record = {"prompt": "honestly the class was", "completion": "good ."}
    example, _ = tokenize_record("sft", record, toy_tokenizer, WHERE, conversational=False, max_length=3,
                                 truncation="truncate")
    assert example["prompt_ids"] == _ids(toy_tokenizer, "<s> was") and len(example["completion_ids"]) == 1


def test_prompt_format_bounded_by_max_length(toy_tokenizer):
    rows = [(WHERE, {"prompt": "honestly the class was"})]
    (example,), _ = build_examples("prompt", rows, toy_tokenizer, max_length=3, truncation="truncate")
    assert example["prompt_ids"] == _ids(toy_tokenizer, "<s> class was")


class MergingTokenizer:
    """Merges "a" and "b" into one token even across a space, like a BPE merge across the boundary."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __call__(self, text, add_special_tokens=True):
        ids = [3 if w == "ab" else 2 for w in text.replace("a b", "ab").split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_boundary_merge_is_an_error_naming_the_row():
    with pytest.raises(DataError, match=r"x.jsonl:7: field 'completion': the tokenizer merged tokens across"):
        tokenize_record("sft", {"prompt": "a", "completion": "b"}, MergingTokenizer(), WHERE, conversational=False)


def test_chat_template_rendering_the_prompt_alone_differently_is_an_error_naming_the_row(toy_tokenizer):
    import copy

    # The generation prompt ends with a token the rendered conversation does not have there (as Gemma 4's
    # empty thought block): the completion boundary is not where the prompt ends.
    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.chat_template = toy_tokenizer.chat_template.replace("<|assistant|> {% endif %}",
                                                                  "<|assistant|> <|system|> {% endif %}")
    row = {"prompt": [USER], "completion": [{"role": "assistant", "content": "good ."}]}
    with pytest.raises(DataError, match=r"x.jsonl:7: field 'completion': the chat template renders the prompt alone"):
        tokenize_record("sft", row, tokenizer, WHERE, conversational=True)


def test_conversational_without_chat_template_is_refused(toy_tokenizer):
    import copy

    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_examples("prompt", [(WHERE, {"prompt": [USER]})], tokenizer)
