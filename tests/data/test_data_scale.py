"""The data pipeline at scale: the resumed chat encoding gives exactly the examples the per-render
encoding gave, it tokenises each turn once, and a bad row deep in a large file is reported by line
and field before any row is tokenised."""

from __future__ import annotations

import copy
import json

import pytest

from lit_rlhf.data import PreferenceDataModule, tokenize
from lit_rlhf.data.formats import DataError, Where
from lit_rlhf.data.tokenize import build_examples, encode_chat
from tests.data.real_tokenizers import CHAT_FAMILIES, build_family

# -- the per-row code before the resumed encoding, kept as the reference ------------------------------


def _old_encode_chat(tokenizer, text, like=None):
    """Every rendering encoded whole, as ``encode(tokenizer, text, False)`` did."""
    return tokenize.ChatIds(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]), [])


def _old_common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _old_through_turn_end(ids, turn_end, tokenizer):
    ends = [i for i, t in enumerate(ids) if t in turn_end]
    if ends and not tokenizer.decode(ids[ends[-1] + 1:]).strip():
        return ids[: ends[-1] + 1]
    return ids


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a helpful assistant ."}
TEXTS = ["the movie was great fun .", "  what is the capital of france ?", "paris .\n", "héllo wörld ✓ 12 345",
         "a cat sat on the mat while the dog slept in the sun . " * 6, "say <|im_end|> or <end_of_turn> or </s> here",
         "numbers like 6789 !\n\n", "trailing space "]


def _conversation(i: int, exchanges: int) -> list[dict]:
    messages = [SYSTEM] if i % 3 == 0 else []
    for k in range(exchanges):
        messages += [_user(TEXTS[(i + k) % len(TEXTS)]), _assistant(TEXTS[(i + 2 * k + 1) % len(TEXTS)])]
    return messages


def _chat_rows() -> dict[str, list[dict]]:
    rows = {"sft": [], "preference": [], "unpaired": [], "prompt": []}
    for i in range(len(TEXTS)):
        rows["sft"].append({"messages": _conversation(i, 1 + i % 5)})
        rows["sft"].append({"prompt": _conversation(i, 1 + i % 3)[:-1], "completion": [_assistant(TEXTS[i])]})
        prompt = _conversation(i, i % 3)[:-1] or [_user(TEXTS[i])]
        prompt = prompt if prompt[-1]["role"] == "user" else prompt + [_user(TEXTS[i - 1])]
        chosen, rejected = [_assistant(TEXTS[i])], [_assistant(TEXTS[i - 3])]
        rows["preference"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        rows["preference"].append({"chosen": prompt + chosen, "rejected": prompt + rejected})  # implicit prompt
        rows["unpaired"].append({"prompt": prompt, "completion": chosen, "label": bool(i % 2)})
        rows["prompt"].append({"prompt": prompt})
    return rows


def _plain_rows() -> dict[str, list[dict]]:
    rows = {"sft": [], "preference": []}
    for i, text in enumerate(TEXTS):
        other = TEXTS[i - 1]
        rows["preference"].append({"prompt": text.strip() + ":", "chosen": other, "rejected": text})
        rows["preference"].append({"chosen": f"question : {text} answer : {other}",
                                   "rejected": f"question : {text} no"})
        rows["sft"].append({"text": text + other})
    return rows


LIMITS = [dict(max_length=None), dict(max_length=40, truncation="truncate"),
          dict(max_length=48, max_prompt_length=20, truncation="truncate"), dict(max_length=64, truncation="error")]


def _examples(fmt, rows, tokenizer, conversational, limits):
    wheres = [(Where("rows.jsonl", i + 1), row) for i, row in enumerate(rows)]
    examples, errors = build_examples(fmt, wheres, tokenizer, conversational=conversational, **limits)
    return examples, [str(e) for e in errors]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root) for name in [*CHAT_FAMILIES, "gpt2"]}


def test_resumed_encoding_gives_the_examples_of_the_per_render_encoding(families, monkeypatch, caplog):
    """Every format, chat and plain, every truncation mode, on each family's tokenizer: the same ids,
    masks and errors as rendering and encoding each conversation whole. The reference swaps the old
    per-row helpers back in."""
    cases = [(name, fmt, rows, True) for name in CHAT_FAMILIES for fmt, rows in _chat_rows().items()]
    cases += [(name, fmt, rows, False) for name in ("gpt2", "llama3", "mistral") for fmt, rows in _plain_rows().items()]
    ours = {}
    for name, fmt, rows, chat in cases:
        for k, limits in enumerate(LIMITS):
            ours[name, fmt, chat, k] = _examples(fmt, rows, families[name], chat, limits)
    # Fresh tokenizers for the reference: no cached state carries over.
    fresh = {name: copy.deepcopy(tok) for name, tok in families.items()}
    monkeypatch.setattr(tokenize, "encode_chat", _old_encode_chat)
    monkeypatch.setattr(tokenize, "_common_prefix", _old_common_prefix)
    monkeypatch.setattr(tokenize, "_through_turn_end", _old_through_turn_end)
    masks = 0
    for name, fmt, rows, chat in cases:
        for k, limits in enumerate(LIMITS):
            reference = _examples(fmt, rows, fresh[name], chat, limits)
            assert ours[name, fmt, chat, k] == reference, (name, fmt, chat, limits)
            masks += sum("prompt_loss_mask" in e for e in reference[0])
    assert masks > 50  # the earlier-turns masks were compared, not only the rows without one


def test_a_turn_mask_tokenises_each_turn_once(families):
    """The earlier-turns mask of a long conversation encodes the text from the last added token each
    rendering shares with the prompt, not every rendering whole (O(turns) characters, not O(turns^2))."""
    tokenizer = families["qwen2.5"]
    messages = _conversation(1, 12)
    encoded_chars = []
    original = type(tokenizer).__call__

    class Counting(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            encoded_chars.append(len(text))
            return original(self, text, *args, **kwargs)

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.__class__ = Counting
    examples, errors = build_examples("sft", [(Where("rows.jsonl", 1), {"messages": messages})], tokenizer,
                                      max_length=None)
    assert not errors and "prompt_loss_mask" in examples[0]
    whole = len(tokenizer.apply_chat_template(messages, tokenize=False))
    # prompt + prompt-and-completion, then per earlier turn its header and its end: ~2 conversations.
    # Encoding each rendering whole read ~13 of them here.
    assert sum(encoded_chars) < 3 * whole, (sum(encoded_chars), whole)


def test_encode_chat_resumes_only_where_the_texts_agree(families):
    """A text sharing only part of the encoded one's start (a different system prompt, an edited turn)
    is encoded from an added token inside the shared part, and gives the whole encoding's ids."""
    for name in CHAT_FAMILIES:
        tokenizer = families[name]
        conversation = _conversation(2, 3)
        base = encode_chat(tokenizer, tokenizer.apply_chat_template(conversation, tokenize=False))
        first = conversation[0]["content"]
        # The same length edited early: every added token sits where the encoded text has one, but the ids
        # before them differ.
        same_length = [_user(first.upper() if first.upper() != first else first[::-1])] + conversation[1:]
        edits = [conversation[:3], conversation[:4] + [_user("extra")], [_user("x")] + conversation[1:], same_length,
                 conversation[:2] + [_user(conversation[2]["content"] + " more")] + conversation[3:]]
        for edited in edits:
            try:
                text = tokenizer.apply_chat_template(edited, tokenize=False)
            except Exception:  # noqa: BLE001 - a template that refuses the edit (roles out of order)
                continue
            assert encode_chat(tokenizer, text, base).ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_bad_row_deep_in_a_large_file_is_named_before_any_row_is_tokenised(tmp_path, toy_tokenizer):
    """Row 45,000 of 45,000 misses a field: the error names its file, line and field, and no row was
    tokenised to find it (validation runs over every row first)."""
    path = tmp_path / "big.jsonl"
    row = json.dumps({"prompt": "the class was", "chosen": " fun .", "rejected": " bad ."})
    with path.open("w") as f:
        f.write((row + "\n") * 44_999 + json.dumps({"prompt": "the class was", "chosen": " fun ."}) + "\n")
    calls = []

    class Counting(type(toy_tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.__class__ = Counting
    with pytest.raises(DataError) as error:
        PreferenceDataModule(str(path), tokenizer=tokenizer).prepare()
    assert f"{path}:45000: field 'rejected': is missing" in str(error.value)
    assert len(error.value.errors) == 1
    assert calls == []


def test_jsonl_read_line_by_line_reads_as_the_whole_text_did(tmp_path):
    """A JSONL file is read a line at a time (never whole beside its rows), with the same rows, lines and
    errors as splitting the whole decoded text: a BOM, CRLF ends, blank lines, invalid UTF-8 bytes (also
    right before a newline), bad JSON, no newline at the end."""
    from lit_rlhf.data.sources import _load_jsonl, _read_text

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\n{"prompt": "b\xff"}\n{"prompt": "\xe2\x82"}\n\xe2\x82\n'
                     b'not json\n  \n{"prompt": "\xc3\xa9"}')
    line_by_line, whole = [], []
    rows = _load_jsonl(path, line_by_line)
    assert rows == _load_jsonl(path, whole, text=_read_text(path))
    assert [str(e) for e in line_by_line] == [str(e) for e in whole]
    assert [(where.line, row["prompt"]) for where, row in rows] == [(1, "a"), (3, "b\udcff"), (4, "\udce2\udc82"),
                                                                   (8, "é")]
    assert [e.where.line for e in line_by_line] == [5, 6]
