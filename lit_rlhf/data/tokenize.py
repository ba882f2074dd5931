"""Render and tokenise validated records into examples of python int lists.

The prompt/completion boundary is found on token ids, never by slicing strings: the prompt
and the prompt + completion are tokenised separately, the prompt's ids must be a prefix of
the full ids (otherwise the tokenizer merged tokens across the boundary, or the chat template
renders the prompt alone differently, and the row is an error), and the completion ids are the rest.

- Plain text: the prompt is tokenised with the tokenizer's special tokens (its bos, unless the
  text starts with that bos already, as a chat template rendered to a string does); prompt
  and completion are joined with one space unless the prompt already ends, or the completion
  already starts, with whitespace; the completion is followed by eos unless it already ends
  with it. A ``text`` row (SFT) is all completion: ``prompt_ids`` is empty.
- Conversational: the chat template renders the prompt messages with
  ``add_generation_prompt=True`` (when the completion is an assistant turn) and the prompt +
  completion messages without; both strings are tokenised with ``add_special_tokens=False``
  because the template owns the special tokens (bos, turn ends, eos). The completion ends with the
  template's end-of-turn token (``end_of_turn_ids``): whitespace the template writes after it
  (Qwen's and Gemma's ``\n``) is left out, since a rollout stops at that token.
- Implicit preference prompts (no ``prompt`` field): for conversational rows the common
  leading messages of ``chosen`` and ``rejected`` (at least one); for plain text the longest common prefix
  of their token ids (holding some text, not a BOS alone).

Truncation (``max_length`` bounds prompt + completion, ``max_prompt_length`` the prompt):
``truncation="error"`` makes an over-long row a :class:`DataError`; ``"truncate"`` keeps the
*end* of the prompt (left-truncation; a leading BOS stays in front) and cuts the completion on
the right. When the prompt alone would fill ``max_length``, it keeps its last ``max_length - 1``
tokens so every completion keeps at least one token.

Examples (all ids are ``list[int]``; ``prompt`` is the raw prompt field, ``prompt_text``
the rendered prompt string):

| format     | keys                                                             |
|------------|------------------------------------------------------------------|
| prompt     | ``prompt_ids``, ``prompt_text``, ``prompt``                      |
| preference | ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``prompt_text``, ``prompt`` |
| unpaired   | ``prompt_ids``, ``completion_ids``, ``label``, ``prompt_text``, ``prompt`` |
| sft        | ``prompt_ids``, ``completion_ids``, ``prompt_text``, ``prompt``; ``prompt_loss_mask`` |

``prompt_loss_mask`` (0/1 per prompt id, cut as the prompt ids are cut) is on a ``messages`` row with
assistant turns before its last one: 1 on each earlier assistant turn's tokens, from after its
generation prompt through its end-of-turn token, so every assistant turn is trained on, as TRL's
``assistant_only_loss`` and torchtune do. A row whose template renders a conversation ending at an earlier
turn differently from the whole (one that rewrites earlier turns) has none: its last turn alone is
trained on, and the number of such rows is logged once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

from jinja2 import TemplateError

from lit_rlhf.data.formats import DataError, Where, check_row, detect_conversational, row_error

log = logging.getLogger("lit_rlhf.data")

Truncation = Literal["error", "truncate"]
Example = dict[str, Any]

#: The completion fields of each format, in the order they are tokenised.
COMPLETION_FIELDS = {"prompt": (), "preference": ("chosen", "rejected"), "unpaired": ("completion",), "sft": ("completion",)}
#: Where each completion field's ids go in the example.
IDS_KEY = {"chosen": "chosen_ids", "rejected": "rejected_ids", "completion": "completion_ids"}


def resolve_conversational(fmt: str, rows: list[tuple[Where, Any]], conversational: bool | None) -> tuple[bool, str]:
    """Decide whether a dataset is conversational; returns ``(flag, reason)`` for messages."""
    if conversational is not None:
        return bool(conversational), f"conversational={conversational} was set"
    for where, row in rows:
        if isinstance(row, dict):
            flag = detect_conversational(fmt, row)
            return flag, f"{'conversational' if flag else 'plain text'} as detected from the first row, {where}"
    return False, "no rows"


def encode(tokenizer, text: str, special_tokens: bool) -> list[int]:
    """The ids of ``text``, with the tokenizer's special tokens when ``special_tokens``; a BOS the text
    already starts with (a chat rendered to a string ahead of time writes its own) is not doubled."""
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    bos = tokenizer.bos_token_id
    if special_tokens and bos is not None and ids[:2] == [bos, bos]:
        own = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids[1:] == own:  # the first BOS is the tokenizer's, the second the text's
            return own
    return ids


class ChatIds(NamedTuple):
    """A rendered chat's ids (``add_special_tokens=False``: the template writes them), with where
    its encoding can be resumed: ``(index in ids, offset in text)`` of each safe added token."""

    text: str
    ids: list[int]
    resume_at: list[tuple[int, int]]


class _Resumable(NamedTuple):
    """What ``encode_chat`` knows of a tokenizer."""

    size: int  # len(tokenizer) when read: a token added since makes it stale
    contents: dict[int, str]  # {id: content} of the added tokens an encoding can resume at
    short: dict[str, ChatIds]  # short texts from one of them on, encoded: every row repeats its turn headers and ends


_RESUMABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: The longest text, and the most texts, ``_Resumable.short`` keeps.
_SHORT_CHARS, _SHORT_TEXTS = 64, 4096


def _resumable(tokenizer) -> _Resumable:
    known = _RESUMABLE.get(tokenizer)
    if known is None or known.size != len(tokenizer):
        added = dict(tokenizer.added_tokens_decoder) if tokenizer.is_fast else {}
        # A token that strips the whitespace beside it, or that a longer added token holds, matches
        # depending on the text around it, so the text before it is not encoded on its own.
        contents = {i: t.content for i, t in added.items()
                    if not (t.lstrip or t.rstrip or t.single_word) and t.content
                    and not any(t.content in o.content for j, o in added.items() if j != i)}
        known = _Resumable(len(tokenizer), contents, {})
        _RESUMABLE[tokenizer] = known
    return known


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """The length of the common start of two strings or lists (slice comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _encode_chat_whole(tokenizer, text: str) -> ChatIds:
    resume = _resumable(tokenizer).contents
    if not resume:
        return ChatIds(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]), [])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = encoded["offset_mapping"]
    return ChatIds(text, ids, [(i, offsets[i][0]) for i in sorted(i for t in resume for i in _indices(ids, t))])


def _indices(ids: list[int], value: int) -> Iterator[int]:
    """Where ``value`` is in ``ids`` (each search runs in C, unlike a scan of every id in Python)."""
    i = -1
    while True:
        try:
            i = ids.index(value, i + 1)
        except ValueError:
            return
        yield i


def encode_chat(tokenizer, text: str, like: ChatIds | None = None) -> ChatIds:
    """The ids of a rendered chat, equal to ``tokenizer(text, add_special_tokens=False)``.

    With ``like`` (an encoded text that ``text`` shares a start with: the same conversation up to
    an earlier turn, or with one more turn), only the rest of ``text`` from the last added token
    inside the shared start is encoded. A fast tokenizer cuts its input at added tokens and encodes
    the pieces between them each on its own, so the ids before that token are ``like``'s. Rendering a
    conversation once per turn (``_earlier_turns_mask``) thus costs each turn's tokens once, not the
    whole conversation per turn, and the short rests every row repeats (a turn's header, its end) are
    encoded once per tokenizer.
    """
    if like is None or not like.resume_at:
        return _encode_chat_whole(tokenizer, text)
    shared = _common_prefix(like.text, text)
    known = _resumable(tokenizer)
    for k in range(len(like.resume_at) - 1, -1, -1):
        index, start = like.resume_at[k]
        token = like.ids[index]
        if start + len(known.contents[token]) <= shared:
            rest_text = text[start:]
            rest = known.short.get(rest_text)
            if rest is None:
                rest = _encode_chat_whole(tokenizer, rest_text)
                if len(rest_text) <= _SHORT_CHARS and len(known.short) < _SHORT_TEXTS:
                    known.short[rest_text] = rest
            if rest.ids[:1] != [token]:  # the token did not open the rest: encode it all
                break
            return ChatIds(text, like.ids[:index] + rest.ids,
                           like.resume_at[:k] + [(index + i, start + s) for i, s in rest.resume_at])
    return _encode_chat_whole(tokenizer, text)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: Where, field: str = "prompt") -> str:
    """The chat template's rendering of ``messages`` as a string.

    A template that refuses the messages (``raise_exception``: Gemma and Mistral reject a system
    turn, most templates roles out of order) makes the row, at ``where``, a :class:`DataError`.
    """
    if not messages:  # an empty SFT prompt: the row is all completion (transformers refuses to render nothing)
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise row_error(where, field, f"the tokenizer's chat template refuses these messages: {e}") from e


#: The assistant's content when rendering a turn to find what the template closes it with.
_TURN_PROBE = "lit-rlhf-turn-probe"

#: Per tokenizer: (the chat template the turn end was found for, the turn end). It is read for every
#: conversational row and every scored reply; a changed template is read again.
_TURN_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the tokenizer's chat template writes right after an assistant's content
    (whitespace between them allowed), as a one-id list; ``[]`` without a template, when the turn
    ends in plain text, or when the template cannot render a user/assistant exchange.

    This is where a chat model stops, and it need not be the tokenizer's EOS: Llama-3 Instruct's
    first release has EOS ``<|end_of_text|>`` and ends turns with ``<|eot_id|>``; Gemma's EOS is
    ``<eos>``, its turns end with ``<end_of_turn>`` (their ``generation_config.json`` list both, as
    TRL reads them; lit_rlhf reads the template, and the file's end tokens when it has the model).
    """
    template = getattr(tokenizer, "chat_template", None)
    known = _TURN_ENDS.get(tokenizer)
    if known is None or known[0] is not template:
        known = template, _find_end_of_turn(tokenizer) if template is not None else []
        _TURN_ENDS[tokenizer] = known
    return list(known[1])


def _find_end_of_turn(tokenizer) -> list[int]:
    """``end_of_turn_ids`` from a rendered probe turn (uncached)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:  # e.g. a template that insists on a system turn: no turn end to learn here
        return []
    tail = text[text.rfind(_TURN_PROBE) + len(_TURN_PROBE):]
    # Llama-3 names no additional special tokens: its turn tokens are special only as added tokens.
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return [token_id]
        if tokenizer.decode([token_id]).strip():
            return []
    return []


def join_prompt_completion(prompt: str, completion: str) -> str:
    """Plain-text prompt + completion with one space between, unless either side already has one there."""
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return prompt + completion
    return prompt + " " + completion


def _split(prompt_ids: list[int], full_ids: list[int], where: Where, field: str, chat: bool = False,
           prompt: str = "") -> list[int]:
    """Completion ids = full ids after the prompt ids, which must be their prefix."""
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids and chat:
        # TRL 1.16 starts the completion where the two diverge instead, training on a prompt it never generates from.
        raise row_error(where, field, "the chat template renders the prompt alone (with the generation prompt) "
                        "differently from the start of prompt + completion (the prompt's ids are not a prefix of the "
                        "conversation's ids); use a chat template that renders both alike")
    if full_ids[:n] != prompt_ids and prompt[-1:].isspace():
        # BPE tokenizers (byte-level and sentencepiece alike) attach a space to the word after it.
        raise row_error(where, field, "the prompt ends with whitespace, which the tokenizer merges into the "
                        "completion's first token (the prompt's ids are not a prefix of the prompt + completion ids); "
                        "remove it from the prompt: prompt and completion are joined with one space")
    if full_ids[:n] != prompt_ids:
        raise row_error(where, field, "the tokenizer merged tokens across the prompt/completion boundary (the prompt's "
                        "ids are not a prefix of the prompt + completion ids); end the prompt with a separator the "
                        "tokenizer keeps apart (a newline, a colon)")
    if len(full_ids) == n:
        raise row_error(where, field, "produces no tokens after the prompt; give it some text")
    return full_ids[n:]


def _through_turn_end(ids: list[int], turn_end: list[int], tokenizer) -> list[int]:
    """``ids`` up to their last end-of-turn token when the template writes only whitespace after it
    (Qwen's and Gemma's ``\n``): a rollout stops at that token, so the completion a reward adapter
    is trained on ends where it is read on rollouts, and SFT teaches nothing a rollout never samples."""
    if not turn_end or turn_end[0] not in ids:
        return ids
    last = len(ids) - 1 - ids[::-1].index(turn_end[0])
    if not tokenizer.decode(ids[last + 1:]).strip():
        return ids[: last + 1]
    return ids


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _tokenize_plain(fmt: str, record: dict, tokenizer, where: Where) -> tuple[list[int], dict[str, list[int]], str, Any]:
    eos = tokenizer.eos_token_id
    fields = COMPLETION_FIELDS[fmt]
    prompt = record.get("prompt")
    if fmt == "sft" and prompt is None:  # a `text` row: everything is completion
        return [], {"completion": _with_eos(encode(tokenizer, record["completion"], True), eos)}, "", ""
    if fmt == "preference" and prompt is None:  # implicit prompt: the common prefix on token ids
        chosen, rejected = (encode(tokenizer, record[f], True) for f in ("chosen", "rejected"))
        n = _common_prefix(chosen, rejected)
        text = tokenizer.decode(chosen[:n], skip_special_tokens=True)
        if not text.strip():  # nothing shared but a BOS: two texts, not two answers to one prompt
            raise row_error(where, "chosen", "shares no leading text with 'rejected', so there is no implicit prompt "
                            "(the shared leading text); give an explicit 'prompt'")
        for field, ids in (("chosen", chosen), ("rejected", rejected)):
            if len(ids) == n:
                other = "rejected" if field == "chosen" else "chosen"
                raise row_error(where, field, f"has no tokens after the prefix it shares with '{other}' (it is a "
                                f"prefix of '{other}'), so nothing is left to compare; give an explicit 'prompt'")
        prompt_ids = chosen[:n]
        return prompt_ids, {"chosen": _with_eos(chosen[n:], eos), "rejected": _with_eos(rejected[n:], eos)}, text, text
    prompt_ids = encode(tokenizer, prompt, True)
    completions = {}
    for field in fields:
        full = encode(tokenizer, join_prompt_completion(prompt, record[field]), True)
        completions[field] = _with_eos(_split(prompt_ids, full, where, field, prompt=prompt), eos)
    return prompt_ids, completions, prompt, prompt


def _tokenize_chat(fmt: str, record: dict, tokenizer, where: Where) -> tuple[ChatIds, dict[str, list[int]], str, Any]:
    fields = COMPLETION_FIELDS[fmt]
    prompt = record.get("prompt")
    messages = {f: record[f] for f in fields}
    if fmt == "preference" and prompt is None:  # implicit prompt: the common leading messages
        chosen, rejected = record["chosen"], record["rejected"]
        n = _common_prefix(chosen, rejected)
        if n == 0:
            raise row_error(where, "chosen", "shares no leading message with 'rejected', so there is no implicit prompt "
                            "(the shared leading messages); give an explicit 'prompt'")
        for field, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) == n:
                other = "rejected" if field == "chosen" else "chosen"
                raise row_error(where, field, f"has no messages after those it shares with '{other}'; an implicit "
                                "prompt is the common leading messages, so each side needs its own final turn")
        prompt, messages = chosen[:n], {"chosen": chosen[n:], "rejected": rejected[n:]}
    # All completions of a row start with the same role in practice; the prompt is rendered per completion.
    generation = not fields or messages[fields[0]][0]["role"] == "assistant"
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=generation, where=where)
    encoded = encode_chat(tokenizer, prompt_text)
    completions = {}
    turn_end = end_of_turn_ids(tokenizer)
    for field in fields:
        text = render_chat(tokenizer, prompt + messages[field], False, where, field)
        full = encode_chat(tokenizer, text, encoded).ids
        completions[field] = _through_turn_end(_split(encoded.ids, full, where, field, chat=True), turn_end, tokenizer)
    return encoded, completions, prompt_text, prompt


def _has_earlier_turns(fmt: str, record: dict) -> bool:
    """Whether a record is a ``messages`` row with assistant turns before its last one."""
    return fmt == "sft" and bool(record.get("split_messages")) and any(
        m["role"] == "assistant" for m in record["prompt"])


def _earlier_turns_mask(prompt: list[dict], encoded: ChatIds, tokenizer, where: Where) -> list[int] | None:
    """1 on the prompt ids of each assistant turn, from after its generation prompt through its
    end-of-turn token (the span a completion covers), 0 elsewhere; None when the chat template renders
    a conversation ending at some assistant turn differently from the start of the whole prompt (Qwen3
    drops the reasoning of earlier turns, for one), so the turn's tokens there are not known.

    Each turn is found by rendering the messages before it with the generation prompt and the messages
    through it without, as the last turn is split off (TRL's ``assistant_only_loss`` reads the same
    spans from the template's ``{% generation %}`` markers instead, which few templates carry)."""
    prompt_ids = encoded.ids
    mask = [0] * len(prompt_ids)
    turn_end = end_of_turn_ids(tokenizer)
    for i, message in enumerate(prompt):
        if message["role"] != "assistant":
            continue
        if i == 0:  # no messages to render a generation prompt after: its header is unknown
            return None
        try:
            head = encode_chat(tokenizer, render_chat(tokenizer, prompt[:i], True, where), encoded).ids
            turn = encode_chat(tokenizer, render_chat(tokenizer, prompt[: i + 1], False, where), encoded).ids
        except DataError:  # the template refuses a conversation ending here
            return None
        turn = _through_turn_end(turn, turn_end, tokenizer)
        if len(turn) <= len(head) or turn[: len(head)] != head or prompt_ids[: len(turn)] != turn:
            return None
        mask[len(head): len(turn)] = [1] * (len(turn) - len(head))
    return mask


def _keep_end(seq: list[int], limit: int, keep_first: bool) -> list[int]:
    """The last ``limit`` items of a prompt's ids (or of a mask aligned with them), behind its first
    when ``keep_first`` (the prompt starts with BOS): a model that always saw its BOS first (Llama-3,
    Gemma, Mistral) reads a sequence without one badly. Cutting to a limit and then to a smaller one
    keeps what cutting to the smaller one at once keeps, so a mask is cut once to the ids' final length."""
    head = 1 if keep_first and limit > 1 else 0
    return seq[:head] + seq[len(seq) - (limit - head):]


def _starts_with_bos(prompt_ids: list[int], bos: int | None) -> bool:
    return bos is not None and prompt_ids[:1] == [bos]


def _fit(prompt_ids: list[int], completions: dict[str, list[int]], where: Where, *, max_length: int | None,
         max_prompt_length: int | None, truncation: Truncation, bos: int | None = None
         ) -> tuple[list[int], dict[str, list[int]], bool]:
    """Apply the truncation policy; returns the (possibly cut) ids and whether anything was cut."""
    prompt_limit = max_prompt_length
    if not completions and prompt_limit is None:  # prompt-only data: max_length bounds the prompt
        prompt_limit = max_length
    if truncation == "error":
        if prompt_limit is not None and len(prompt_ids) > prompt_limit:
            name = "max_prompt_length" if max_prompt_length is not None else "max_length"
            raise row_error(where, "prompt", f"is {len(prompt_ids)} tokens, longer than {name}={prompt_limit}; shorten "
                            f"it, raise {name}, or set truncation='truncate'")
        for field, ids in completions.items():
            if max_length is not None and len(prompt_ids) + len(ids) > max_length:
                raise row_error(where, field, f"prompt + {field} is {len(prompt_ids) + len(ids)} tokens, longer than "
                                f"max_length={max_length}; shorten it, raise max_length, or set truncation='truncate'")
        return prompt_ids, completions, False
    if truncation != "truncate":
        raise ValueError(f"truncation must be 'error' or 'truncate', got {truncation!r}")
    cut = False
    if prompt_limit is not None and len(prompt_ids) > prompt_limit:
        prompt_ids, cut = _keep_end(prompt_ids, prompt_limit, _starts_with_bos(prompt_ids, bos)), True
    if max_length is not None and completions:
        if len(prompt_ids) > max_length - 1:  # leave every completion at least one token
            prompt_ids, cut = _keep_end(prompt_ids, max_length - 1, _starts_with_bos(prompt_ids, bos)), True
        room = max_length - len(prompt_ids)
        for field, ids in completions.items():
            if len(ids) > room:
                completions[field], cut = ids[:room], True
    return prompt_ids, completions, cut


def tokenize_record(fmt: str, record: dict, tokenizer, where: Where, *, conversational: bool,
                    max_length: int | None = 512, max_prompt_length: int | None = None,
                    truncation: Truncation = "error") -> tuple[Example, bool]:
    """Tokenise one validated record (from ``check_row``) into an example.

    Returns:
        ``(example, truncated)``. Raises :class:`DataError` for a row that cannot be
        tokenised (boundary merge, over-long with ``truncation="error"``).
    """
    if conversational:
        encoded, completions, prompt_text, raw_prompt = _tokenize_chat(fmt, record, tokenizer, where)
        full_prompt_ids = encoded.ids
    else:
        full_prompt_ids, completions, prompt_text, raw_prompt = _tokenize_plain(fmt, record, tokenizer, where)
    prompt_ids, completions, cut = _fit(full_prompt_ids, completions, where, max_length=max_length,
                                        max_prompt_length=max_prompt_length, truncation=truncation,
                                        bos=tokenizer.bos_token_id)
    example: Example = {"prompt_ids": prompt_ids, "prompt_text": prompt_text, "prompt": raw_prompt}
    if conversational and _has_earlier_turns(fmt, record):
        mask = _earlier_turns_mask(record["prompt"], encoded, tokenizer, where)
        if mask is not None:
            keep_first = _starts_with_bos(full_prompt_ids, tokenizer.bos_token_id)
            example["prompt_loss_mask"] = _keep_end(mask, len(prompt_ids), keep_first)
    for field, ids in completions.items():
        example[IDS_KEY[field]] = ids
    if fmt == "unpaired":
        example["label"] = record["label"]
    if "margin" in record:
        example["margin"] = record["margin"]
    return example, cut


def check_rows(fmt: str, rows: list[tuple[Where, Any]], conversational: bool, hint: str
               ) -> tuple[list[tuple[Where, dict]], list[DataError]]:
    """Validate every row (``check_row``) before any is tokenised, so a bad row deep in a large
    file is reported in the time it takes to read the file, not to tokenise it.

    Returns:
        ``(records, errors)``: ``(Where, record)`` of the valid rows, in order, and one
        :class:`DataError` per problem.
    """
    records, errors = [], []
    for where, row in rows:
        record, problems = check_row(fmt, row, where, conversational, hint)
        if problems:
            errors.extend(problems)
        else:
            records.append((where, record))
    return records, errors


def tokenize_records(fmt: str, records: list[tuple[Where, dict]], tokenizer, *, conversational: bool,
                     max_length: int | None = 512, max_prompt_length: int | None = None,
                     truncation: Truncation = "error", hint: str = "") -> tuple[list[Example], list[DataError]]:
    """Tokenise validated records (from :func:`check_rows`); arguments as :func:`build_examples`."""
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the {fmt} data is conversational ({hint}) but the tokenizer has no chat template; set "
                         "tokenizer.chat_template, or give plain-text data")
    if conversational and not end_of_turn_ids(tokenizer):
        # Nothing in the rows marks where an answer ends, so nothing teaches the policy to stop.
        log.warning("the chat template closes an assistant turn with no special token (neither EOS nor an "
                    "end-of-turn token): a policy trained on such rows never learns to stop and rollouts run to "
                    "max_new_tokens; use a template that ends turns with one, or set sampling.stop_token_ids")
    examples, errors, truncated, last_turn_only = [], [], 0, 0
    for where, record in records:
        try:
            example, cut = tokenize_record(fmt, record, tokenizer, where, conversational=conversational,
                                           max_length=max_length, max_prompt_length=max_prompt_length,
                                           truncation=truncation)
        except DataError as e:
            errors.append(e)
            continue
        examples.append(example)
        truncated += cut
        last_turn_only += _has_earlier_turns(fmt, record) and conversational and "prompt_loss_mask" not in example
    if last_turn_only:
        log.warning("the chat template renders %d of %d multi-turn messages row(s) differently up to an earlier "
                    "assistant turn than in the whole conversation (it rewrites earlier turns, or refuses a "
                    "conversation ending there), or they open with an assistant turn, so their earlier assistant "
                    "turns carry no loss: only their last turn is trained on", last_turn_only, len(examples))
    if truncated:
        log.info("truncated %d of %d %s example(s) (max_length=%s, max_prompt_length=%s)", truncated, len(examples),
                 fmt, max_length, max_prompt_length)
    return examples, errors


def build_examples(fmt: str, rows: list[tuple[Where, Any]], tokenizer, *, conversational: bool | None = None,
                   max_length: int | None = 512, max_prompt_length: int | None = None,
                   truncation: Truncation = "error", hint: str | None = None) -> tuple[list[Example], list[DataError]]:
    """Validate and tokenise every row; collect the problems instead of stopping at the first.

    Args:
        fmt: ``prompt`` | ``preference`` | ``unpaired`` | ``sft``.
        rows: ``(Where, row)`` pairs from :func:`lit_rlhf.data.sources.load_rows`.
        tokenizer: a transformers tokenizer.
        conversational: None detects it from the first row.
        max_length: the longest prompt + completion in tokens (None: no limit).
        max_prompt_length: the longest prompt in tokens (None: no separate limit; for the
            prompt format ``max_length`` then bounds the prompt).
        truncation: ``"error"`` or ``"truncate"`` (see the module docstring).
        hint: why the data is (not) conversational, for messages; derived when None.

    Returns:
        ``(examples, errors)``: the examples of the good rows, in order, and one
        :class:`DataError` per problem (validation problems first, then those of tokenising).
        Truncation counts are logged.
    """
    flag, derived = resolve_conversational(fmt, rows, conversational)
    hint = hint or derived
    records, errors = check_rows(fmt, rows, flag, hint)
    examples, tokenize_errors = tokenize_records(fmt, records, tokenizer, conversational=flag, max_length=max_length,
                                                 max_prompt_length=max_prompt_length, truncation=truncation, hint=hint)
    return examples, errors + tokenize_errors
