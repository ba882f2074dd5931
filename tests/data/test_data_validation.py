"""One test per bad-data case: the error names the file, the line and the field."""

import logging

import pytest

from lit_rlhf.data import DataError, PreferenceDataModule, SFTDataModule, UnpairedDataModule

GOOD = {"prompt": "the class was", "chosen": "good .", "rejected": "bad ."}
GOOD_UNPAIRED = {"prompt": "the class was", "completion": "good .", "label": True}


def _error(module_cls, path, tokenizer, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        module_cls(train=str(path), tokenizer=tokenizer, **kwargs).prepare()
    return str(info.value)


def _assert_names(message: str, path, line: int, field: str | None) -> None:
    assert f"{path}:{line}" in message, message
    if field is not None:
        assert f"field '{field}" in message, message


def test_missing_field(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "the car was", "chosen": "good ."}])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "rejected")
    assert "missing" in message and "1 problem(s)" in message


def test_wrong_type(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, GOOD, {**GOOD, "chosen": 5}])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 3, "chosen")
    assert "must be a string" in message


def test_empty_completion(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "u.jsonl", [{**GOOD_UNPAIRED, "completion": "  "}, GOOD_UNPAIRED])
    message = _error(UnpairedDataModule, path, toy_tokenizer)
    _assert_names(message, path, 1, "completion")
    assert "empty" in message


def test_unknown_role(tmp_path, toy_tokenizer, write_jsonl):
    user = {"role": "user", "content": "the class was"}
    row = {"prompt": [user], "chosen": [{"role": "assistant", "content": "good ."}],
           "rejected": [{"role": "bot", "content": "bad ."}]}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 1, "rejected[0].role")
    assert "'bot'" in message and "assistant" in message


def test_chosen_identical_to_rejected(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "chosen")
    assert "identical to 'rejected'" in message


def test_undecodable_bytes(tmp_path, toy_tokenizer, write_jsonl):
    bad = b'{"prompt": "the class was", "chosen": "good \xff\xfe .", "rejected": "bad ."}'
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, bad])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "chosen")
    assert "UTF-8" in message


def test_undecodable_bytes_in_csv(tmp_path, toy_tokenizer):
    path = tmp_path / "u.csv"
    path.write_bytes(b"prompt,completion,label\nthe class was,good .,true\nthe car was,bad \xc3(.,false\n")
    message = _error(UnpairedDataModule, path, toy_tokenizer)
    _assert_names(message, path, 3, "completion")
    assert "UTF-8" in message


def test_malformed_json(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, "", '{"prompt": "the class was", "chosen": '])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 3, None)  # blank line 2 is skipped but still counted
    assert "not valid JSON" in message


def test_overlong_row_with_truncation_error(tmp_path, toy_tokenizer, write_jsonl):
    long = {**GOOD, "rejected": "bad bad bad bad bad bad ."}
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, long])
    message = _error(PreferenceDataModule, path, toy_tokenizer, max_length=8)
    _assert_names(message, path, 2, "rejected")
    assert "12 tokens" in message and "max_length=8" in message  # <s> + 3 prompt + 7 completion + </s>


def test_overlong_prompt_with_truncation_error(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    message = _error(PreferenceDataModule, path, toy_tokenizer, max_prompt_length=2)
    _assert_names(message, path, 1, "prompt")
    assert "max_prompt_length=2" in message


def test_missing_label(tmp_path, toy_tokenizer, write_jsonl):
    row = {k: v for k, v in GOOD_UNPAIRED.items() if k != "label"}
    path = write_jsonl(tmp_path / "u.jsonl", [GOOD_UNPAIRED, row])
    message = _error(UnpairedDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "label")


def test_non_boolean_label(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "u.jsonl", [{**GOOD_UNPAIRED, "label": "yes"}])
    message = _error(UnpairedDataModule, path, toy_tokenizer)
    _assert_names(message, path, 1, "label")
    assert "boolean" in message


def test_csv_label_strings(tmp_path, toy_tokenizer):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nthe class was,good .,TRUE\nthe car was,bad .,0\n"
                    "the car was,bad .,yes\n")
    message = _error(UnpairedDataModule, path, toy_tokenizer)
    _assert_names(message, path, 4, "label")  # the header is line 1
    assert "1 problem(s)" in message
    module = UnpairedDataModule(train=str(path), tokenizer=toy_tokenizer, on_invalid="skip").prepare()
    assert [e["label"] for e in module.train_examples] == [True, False]


def test_sft_empty_completion(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "the class was", "completion": "good ."},
                                              {"prompt": "the class was", "completion": ""}])
    message = _error(SFTDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "completion")


def test_sft_messages_must_end_with_assistant(tmp_path, toy_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    message = _error(SFTDataModule, path, toy_tokenizer)
    _assert_names(message, path, 1, "messages")


def test_all_errors_reported_together(tmp_path, toy_tokenizer, write_jsonl):
    rows = [GOOD] + [{"prompt": "the class was", "chosen": 5}] * 30
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as info:
        PreferenceDataModule(train=str(path), tokenizer=toy_tokenizer).prepare()
    assert len(info.value.errors) == 60  # chosen not a string and rejected missing on 30 rows
    assert "... and 40 more" in str(info.value) and "on_invalid='skip'" in str(info.value)


def test_val_errors_reported_with_train_errors(tmp_path, toy_tokenizer, write_jsonl):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, {**GOOD, "chosen": ""}])
    val = write_jsonl(tmp_path / "val.jsonl", [{**GOOD, "prompt": 3}])
    with pytest.raises(DataError) as info:
        PreferenceDataModule(train=str(train), val=str(val), tokenizer=toy_tokenizer).prepare()
    _assert_names(str(info.value), train, 2, "chosen")
    _assert_names(str(info.value), val, 1, "prompt")


def test_skip_drops_exactly_the_bad_rows(tmp_path, toy_tokenizer, write_jsonl, caplog):
    rows = [
        GOOD,
        {"prompt": "the car was", "chosen": "good ."},  # missing rejected
        {**GOOD, "prompt": "the car was"},
        "{not json",
        {**GOOD, "rejected": GOOD["chosen"]},
        {**GOOD, "prompt": "the team was"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data"):
        module = PreferenceDataModule(train=str(path), tokenizer=toy_tokenizer, on_invalid="skip").prepare()
    assert [e["prompt"] for e in module.train_examples] == ["the class was", "the car was", "the team was"]
    assert "skipped 3 invalid row(s)" in caplog.text and f"{path}:2" in caplog.text


@pytest.mark.parametrize("bad", ["big", True, float("inf")])
def test_preference_margin_must_be_a_finite_number(tmp_path, toy_tokenizer, write_jsonl, bad):
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "margin": 1.5}, {**GOOD, "margin": bad}])
    message = _error(PreferenceDataModule, path, toy_tokenizer)
    _assert_names(message, path, 2, "margin")
    assert "finite number" in message
