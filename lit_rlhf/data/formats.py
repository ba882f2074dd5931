"""The four data formats, their schemas, and the row validation that runs before any training.

| format     | fields                                                        |
|------------|---------------------------------------------------------------|
| prompt     | ``prompt``                                                    |
| preference | ``prompt``, ``chosen``, ``rejected``; or implicit ``chosen``, ``rejected``; optional ``margin`` |
| unpaired   | ``prompt``, ``completion``, ``label`` (bool)                  |
| sft        | ``text``; or ``messages``; or ``prompt`` + ``completion``     |

Every text field is either plain text (a string) or conversational (a list of
``{"role", "content"}`` messages, roles ``system`` / ``user`` / ``assistant`` / ``tool``).
A dataset is one or the other throughout. Unknown extra fields are ignored.

``check_row`` turns one raw row into a normalised *record* (the fields the tokenizer
needs) or a list of :class:`DataError`, one per problem, each naming the file, the line
(or row) and the field, and saying what to do instead. ``report_invalid`` raises them
together, or drops the rows and logs the count (``on_invalid="skip"``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("lit_rlhf.data")

Format = Literal["prompt", "preference", "unpaired", "sft"]
FORMATS: tuple[str, ...] = ("prompt", "preference", "unpaired", "sft")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
OnInvalid = Literal["error", "skip"]

#: How many problems an aggregated error lists before it says "... and N more".
MAX_LISTED = 20
#: CSV cells have no booleans: these strings (any case) are accepted for ``label`` in CSV files.
CSV_TRUE = ("true", "1")
CSV_FALSE = ("false", "0")


class DataError(ValueError):
    """A problem with the data, found before training; the message says where and what to do.

    ``errors`` holds the individual problems when several were collected into one error.
    """

    def __init__(self, message: str, errors: list[DataError] | None = None, where: Where | None = None):
        super().__init__(message)
        self.errors: list[DataError] = errors if errors is not None else [self]
        self.where = where


@dataclass(frozen=True)
class Where:
    """The provenance of a row.

    Args:
        source: the file (or saved dataset directory, or hub name) the row came from.
        line: 1-based. For JSONL and CSV it is the physical line in the file (CSV counts
            the header, so the first data row is line 2); for JSON arrays, Parquet and
            ``datasets`` it is the row number (the first row is row 1).
        unit: ``"line"`` (printed ``file:7``) or ``"row"`` (printed ``file: row 7``).
        kind: the source type: ``jsonl``, ``json``, ``csv``, ``parquet``, ``dataset``, ``hub``.
    """

    source: str
    line: int
    unit: Literal["line", "row"] = "line"
    kind: str = "jsonl"

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source}: row {self.line}"


def row_error(where: Where, field: str | None, problem: str) -> DataError:
    """``file:7: field 'chosen': <problem>``; ``field=None`` for problems of the whole line."""
    prefix = f"{where}: " if field is None else f"{where}: field '{field}': "
    return DataError(prefix + problem, where=where)


def report_invalid(errors: list[DataError], on_invalid: OnInvalid, what: str) -> None:
    """Raise all ``errors`` as one :class:`DataError`, or log them when ``on_invalid="skip"``.

    Args:
        errors: one per problem; the caller has already dropped the rows they belong to.
        on_invalid: ``"error"`` raises, ``"skip"`` logs the count and the first few reasons.
        what: a name for the data in the message, e.g. ``"preference data (train)"``.
    """
    if not errors:
        return
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if on_invalid == "skip":
        rows = len({e.where for e in errors if e.where is not None})
        first = "\n  ".join(str(e) for e in errors[:5])
        log.warning("skipped %d invalid row(s) of %s (on_invalid='skip'); first reasons:\n  %s", rows, what, first)
        return
    listed = "\n  ".join(str(e) for e in errors[:MAX_LISTED])
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    raise DataError(
        f"{len(errors)} problem(s) in {what}:\n  {listed}{more}\n"
        "Fix these rows, or set on_invalid='skip' to drop them.",
        errors,
    )


# ---------------------------------------------------------------------------------------------
# Detection


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def detect_conversational(fmt: str, row: dict) -> bool:
    """Whether a row is conversational: its main text field holds a list of messages."""
    keys = {"prompt": ("prompt",), "preference": ("prompt", "chosen"), "unpaired": ("prompt", "completion")}
    if fmt == "sft":
        if "messages" in row:
            return True
        if "text" in row:
            return False
        return is_conversational(row.get("prompt")) or is_conversational(row.get("completion"))
    return any(is_conversational(row.get(k)) for k in keys[fmt])


# ---------------------------------------------------------------------------------------------
# Field checks. Each returns the problems it found; an empty list means the field is usable.


# Sources decode with errors="surrogateescape", so an invalid UTF-8 byte b becomes U+DC00+b.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _has_bad_bytes(text: str) -> bool:
    return _ESCAPED_BYTE.search(text) is not None


_BAD_BYTES = "contains bytes that are not valid UTF-8; re-save the file as UTF-8"


def _check_messages(value: list, where: Where, field: str, *, allow_empty: bool) -> list[DataError]:
    errors = []
    if not value and not allow_empty:
        return [row_error(where, field, "is an empty list of messages; give at least one message")]
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            errors.append(row_error(where, name, f"is a {type(message).__name__}; each message must be an object "
                                    'like {"role": "user", "content": "..."}'))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            errors.append(row_error(where, f"{name}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}"))
        if not isinstance(content, str):
            errors.append(row_error(where, f"{name}.content",
                                    f"is {_describe(content)}; a message's content must be a string"))
        elif _has_bad_bytes(content):
            errors.append(row_error(where, f"{name}.content", _BAD_BYTES))
    return errors


def _describe(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def _check_text(row: dict, field: str, where: Where, conversational: bool, *, required_nonempty: bool,
                mode_hint: str) -> list[DataError]:
    """A text field: a string in plain-text data, a list of messages in conversational data."""
    if field not in row or row[field] is None:
        return [row_error(where, field, "is missing; every row of this format needs it")]
    value = row[field]
    if conversational:
        if not isinstance(value, list):
            return [row_error(where, field, f"is {_describe(value)}; this dataset is conversational ({mode_hint}), "
                              'so it must be a list of {"role", "content"} messages')]
        errors = _check_messages(value, where, field, allow_empty=not required_nonempty)
        if not errors and required_nonempty and not any(m["content"].strip() for m in value):
            errors.append(row_error(where, field, "has only empty messages; give it some content"))
        return errors
    if not isinstance(value, str):
        kind = "a list of messages" if isinstance(value, list) else _describe(value)
        return [row_error(where, field, f"is {kind}; this dataset is plain text ({mode_hint}), so it must be a string")]
    if _has_bad_bytes(value):
        return [row_error(where, field, _BAD_BYTES)]
    if required_nonempty and not value.strip():
        return [row_error(where, field, "is empty; give it some text, or drop the row")]
    return []


def _check_label(row: dict, where: Where) -> tuple[bool | None, list[DataError]]:
    if "label" not in row or row["label"] is None:
        return None, [row_error(where, "label", "is missing; give true (desirable) or false (undesirable)")]
    value = row["label"]
    if isinstance(value, bool):
        return value, []
    if where.kind == "csv" and isinstance(value, str):
        if value.strip().lower() in CSV_TRUE:
            return True, []
        if value.strip().lower() in CSV_FALSE:
            return False, []
    return None, [row_error(where, "label", f"is {value!r}; it must be a boolean, true or false "
                            "(in CSV: true/false/1/0)")]


#: The fields that tell the formats apart, for the hint when a row of one reaches another's DataModule.
SIGNATURES: dict[str, tuple[frozenset[str], ...]] = {
    "preference": (frozenset({"chosen", "rejected"}),),
    "unpaired": (frozenset({"completion", "label"}),),
    "sft": (frozenset({"messages"}), frozenset({"text"}), frozenset({"prompt", "completion"})),
    "prompt": (frozenset({"prompt"}),),
}
_DATAMODULES = {"prompt": "PromptDataModule", "preference": "PreferenceDataModule", "unpaired": "UnpairedDataModule",
                "sft": "SFTDataModule"}


def _check_format(fmt: str, row: dict, where: Where) -> list[DataError]:
    """One error for a row that has none of ``fmt``'s own fields but all of another format's.

    A prompt row in preference data would otherwise report 'chosen' and 'rejected' missing,
    without saying that the file is simply the wrong kind of data.
    """
    own = {"prompt": ("prompt",), "preference": ("chosen", "rejected"), "unpaired": ("completion", "label"),
           "sft": ("text", "messages", "completion")}[fmt]
    keys = {k for k, v in row.items() if v is not None}
    if keys & set(own):
        return []
    for other, signatures in SIGNATURES.items():
        if other != fmt and any(sig <= keys for sig in signatures):
            return [row_error(where, own[0], f"is missing: the row has {', '.join(sorted(keys))}, which looks like "
                              f"{other} data; {fmt} data goes to {_DATAMODULES[fmt]}, {other} data to "
                              f"{_DATAMODULES[other]}")]
    return []


def _check_role_order(messages: list, where: Where, field: str) -> list[DataError]:
    """A system message only first: chat templates drop a later one or render it mid-dialogue.

    Any list may open with one, as a completion that repeats the whole conversation does (an implicit
    prompt); after an explicit prompt, ``_check_after_prompt`` refuses it.
    """
    for i, message in enumerate(messages[1:], start=1):
        if isinstance(message, dict) and message.get("role") == "system":
            return [row_error(where, f"{field}[{i}].role", f"is 'system' at position {i}; a system message may only "
                              "be the first message of the conversation")]
    return []


def _check_prompt_turn(prompt: list, where: Where) -> list[DataError]:
    """A prompt to answer (the prompt format) must not end with the assistant's own turn."""
    last = prompt[-1] if prompt else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        return [row_error(where, f"prompt[{len(prompt) - 1}].role", "is 'assistant', the last message of a prompt; "
                          "the model answers the last user (or tool) message, so end the prompt with one")]
    return []


def _check_after_prompt(prompt: list, completion: list, where: Where, field: str) -> list[DataError]:
    """A completion follows its explicit prompt in one rendered conversation, so it must not open with
    the prompt again (the conversation would hold the user's turn twice) nor with a system message
    (rendered mid-conversation). TRL trains on both as they render."""
    if not prompt:
        return []
    # The whole prompt, or its last message (a prompt [system, user] with a completion [user, assistant]).
    if completion[: len(prompt)] == prompt or completion[:1] == prompt[-1:]:
        return [row_error(where, field, "repeats the prompt's messages at its start, so prompt + completion would "
                          "hold them twice; give only the messages after the prompt" + (
                              ", or drop 'prompt' and let the shared leading messages of 'chosen' and 'rejected' "
                              "be the prompt" if field in ("chosen", "rejected") else ""))]
    first = completion[0] if completion else None
    if isinstance(first, dict) and first.get("role") == "system":
        return [row_error(where, f"{field}[0].role", "is 'system' right after the prompt; a system message may only "
                          "be the first message of the conversation, so put it at the start of the prompt")]
    return []


def _check_margin(row: dict, where: Where) -> tuple[float | None, list[DataError]]:
    """The optional ``margin`` of a preference row: a finite number (how much better ``chosen`` is,
    read by the reward model's loss), or absent / null."""
    value = row.get("margin")
    if value is None:
        return None, []
    if where.kind == "csv" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, [row_error(where, "margin", f"is {value!r}; it must be a finite number (or left out)")]
    return float(value), []


def _check_repeated_prompt(row: dict, where: Where) -> list[DataError]:
    shared = []
    for a, b in zip(row["chosen"], row["rejected"]):
        if a != b:
            break
        shared.append(a)
    prompt = row["prompt"].strip()
    if any(m["role"] == "user" and m["content"].strip() == prompt for m in shared):
        return []
    return [row_error(where, "prompt", "is a string while 'chosen' and 'rejected' are conversations, and their "
                      "shared leading messages hold no user turn equal to it; give the prompt as a list of "
                      "messages, or drop it and let the shared leading messages be the prompt")]


def check_row(fmt: str, row: Any, where: Where, conversational: bool, mode_hint: str = "") -> tuple[dict | None, list[DataError]]:
    """Validate one raw row and normalise it into a record.

    Args:
        fmt: one of ``FORMATS``.
        row: the row as loaded (a dict of fields).
        where: its provenance, used in every message.
        conversational: whether the dataset is conversational (decided once per dataset).
        mode_hint: why the dataset is (not) conversational, shown in type errors.

    Returns:
        ``(record, [])`` or ``(None, errors)``. Records are
        prompt ``{"prompt"}``; preference ``{"prompt" (None when implicit), "chosen", "rejected"}``
        plus ``"margin"`` (float) when the row has one;
        unpaired ``{"prompt", "completion", "label"}``; sft ``{"prompt", "completion"}`` where
        ``prompt`` is None for a ``text`` row, and a ``messages`` row is split before its
        last (assistant) message and marked ``"split_messages": True``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(row, dict):
        return None, [row_error(where, None, f"is a {type(row).__name__}; each row must be an object with named fields")]
    hint = mode_hint or ("conversational" if conversational else "plain text")
    wrong_format = _check_format(fmt, row, where)
    if wrong_format:
        return None, wrong_format

    def text(field: str, nonempty: bool) -> list[DataError]:
        errors = _check_text(row, field, where, conversational, required_nonempty=nonempty, mode_hint=hint)
        if not errors and conversational:
            errors = _check_role_order(row[field], where, field)
        return errors

    if fmt == "prompt":
        errors = text("prompt", nonempty=True)
        if not errors and conversational:
            errors = _check_prompt_turn(row["prompt"], where)
        return (None, errors) if errors else ({"prompt": row["prompt"]}, [])

    if fmt == "preference":
        implicit = row.get("prompt") is None  # no prompt field (or a null one): the shared prefix is the prompt
        repeated = conversational and isinstance(row.get("prompt"), str) and all(
            isinstance(row.get(f), list) for f in ("chosen", "rejected"))
        errors = ([] if implicit or repeated else text("prompt", nonempty=True)) + text("chosen", True) + \
            text("rejected", True)
        if repeated and not errors:
            # HuggingFaceH4/ultrafeedback_binarized as published: `prompt` a string, `chosen` and `rejected`
            # whole conversations that repeat it as a user turn. As TRL does, the prompt is their shared
            # leading messages; the string only has to match one of their user turns.
            errors = _check_repeated_prompt(row, where)
            implicit = True
        if not errors and conversational and not implicit:
            errors = [e for f in ("chosen", "rejected") for e in _check_after_prompt(row["prompt"], row[f], where, f)]
        if not errors and row["chosen"] == row["rejected"]:
            errors.append(row_error(where, "chosen", "is identical to 'rejected'; a preference pair needs two "
                                    "different completions"))
        margin, margin_errors = _check_margin(row, where)
        errors += margin_errors
        if errors:
            return None, errors
        record = {"prompt": None if implicit else row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        if margin is not None:
            record["margin"] = margin
        return record, []

    if fmt == "unpaired":
        errors = text("prompt", nonempty=True) + text("completion", True)
        if not errors and conversational:
            errors = _check_after_prompt(row["prompt"], row["completion"], where, "completion")
        label, label_errors = _check_label(row, where)
        errors += label_errors
        if errors:
            return None, errors
        return {"prompt": row["prompt"], "completion": row["completion"], "label": label}, []

    # sft: text | messages | prompt + completion
    if "messages" in row and row["messages"] is not None:
        if not conversational:
            return None, [row_error(where, "messages", f"is present but this dataset is plain text ({hint}); "
                                    "use either 'text' or 'messages' rows throughout")]
        errors = text("messages", True)
        if errors:
            return None, errors
        messages = row["messages"]
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            return None, [row_error(where, "messages", "must end with a non-empty assistant message (the "
                                    "completion the model learns)")]
        # Marked: every assistant turn of a messages row is trained on, not only the split-off last one.
        return {"prompt": messages[:-1], "completion": messages[-1:], "split_messages": True}, []
    if "text" in row and row["text"] is not None:
        if conversational:
            return None, [row_error(where, "text", f"is present but this dataset is conversational ({hint}); "
                                    "use 'messages' rows throughout")]
        errors = text("text", True)
        return (None, errors) if errors else ({"prompt": None, "completion": row["text"]}, [])
    if "prompt" not in row and "completion" not in row:
        return None, [row_error(where, "text", "is missing; an SFT row needs 'text', 'messages', or "
                                "'prompt' and 'completion'")]
    # An empty SFT prompt is allowed: the row is then all completion, like a 'text' row.
    errors = text("prompt", nonempty=False) + text("completion", True)
    if not errors and conversational:
        errors = _check_after_prompt(row["prompt"], row["completion"], where, "completion")
    return (None, errors) if errors else ({"prompt": row["prompt"], "completion": row["completion"]}, [])
