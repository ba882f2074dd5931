"""Popular hub datasets in the shape they are published, as small local JSONL files written here."""

from __future__ import annotations

import json

import pytest

from lit_rlhf.data import DataError, PreferenceDataModule, UnpairedDataModule


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(datamodule, path, rows, tokenizer):
    return datamodule(train=_jsonl(path, rows), val=None, val_fraction=0).prepare(tokenizer)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_hh_rlhf_implicit_prompt_is_the_shared_prefix(tmp_path, toy_tokenizer):
    # Anthropic/hh-rlhf: only `chosen` and `rejected`, whole transcripts sharing the dialogue so far.
    rows = [{"chosen": "the movie was great fun .", "rejected": "the movie was awful ."},
            {"chosen": "i think the food is good .", "rejected": "i think the food is bad ."}]
    data = _prepare(PreferenceDataModule, tmp_path / "hh.jsonl", rows, toy_tokenizer)
    first = data.train_examples[0]
    assert first["prompt_text"].strip() == "the movie was"
    assert _decode(toy_tokenizer, first["chosen_ids"]).split()[:2] == ["great", "fun"]


def test_ultrafeedback_raw_string_prompt_beside_whole_conversations(tmp_path, toy_tokenizer):
    # HuggingFaceH4/ultrafeedback_binarized as published: `prompt` a string that chosen/rejected repeat.
    prompt = "the movie was"
    rows = [{"prompt": prompt, "prompt_id": "x1", "score_chosen": 8.0, "score_rejected": 3.0,
             "chosen": [_user(prompt), _assistant("great fun .")],
             "rejected": [_user(prompt), _assistant("awful .")]}]
    data = _prepare(PreferenceDataModule, tmp_path / "uf.jsonl", rows, toy_tokenizer)
    example = data.train_examples[0]
    # The prompt is the shared user turn rendered with the chat template, not the string twice.
    assert example["prompt"] == [_user(prompt)]
    rendered = toy_tokenizer.apply_chat_template([_user(prompt)], tokenize=False, add_generation_prompt=True)
    assert example["prompt_text"] == rendered
    assert "great fun" in _decode(toy_tokenizer, example["chosen_ids"])
    assert "awful" in _decode(toy_tokenizer, example["rejected_ids"])


def test_ultrafeedback_raw_with_a_prompt_the_conversation_does_not_repeat_is_an_error(tmp_path, toy_tokenizer):
    rows = [{"prompt": "the car was", "chosen": [_user("the movie was"), _assistant("great .")],
             "rejected": [_user("the movie was"), _assistant("awful .")]}]
    path = _jsonl(tmp_path / "uf_bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:1: field 'prompt': is a string while 'chosen' and 'rejected'"):
        PreferenceDataModule(train=path, val=None, val_fraction=0).prepare(toy_tokenizer)


def test_ultrafeedback_binarized_trl_shape_explicit_conversational(tmp_path, toy_tokenizer):
    # trl-lib/ultrafeedback_binarized: prompt messages, chosen/rejected the assistant turn only.
    rows = [{"prompt": [_user("the food was")], "chosen": [_assistant("good .")], "rejected": [_assistant("bad .")]}]
    data = _prepare(PreferenceDataModule, tmp_path / "trl.jsonl", rows, toy_tokenizer)
    example = data.train_examples[0]
    assert example["prompt"] == [_user("the food was")]
    assert "good" in _decode(toy_tokenizer, example["chosen_ids"])


def test_kto_unpaired_conversational(tmp_path, toy_tokenizer):
    # trl-lib/kto-mix-14k: prompt messages, a single completion turn, and a boolean label.
    rows = [{"prompt": [_user("the song was")], "completion": [_assistant("great .")], "label": True},
            {"prompt": [_user("the song was")], "completion": [_assistant("awful .")], "label": False}]
    data = _prepare(UnpairedDataModule, tmp_path / "kto.jsonl", rows, toy_tokenizer)
    assert [e["label"] for e in data.train_examples] == [True, False]
    assert "great" in _decode(toy_tokenizer, data.train_examples[0]["completion_ids"])
