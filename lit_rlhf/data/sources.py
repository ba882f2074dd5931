"""Load raw rows, each with where it came from, from files, folders, saved datasets or the hub.

A source is one of:

- a ``.jsonl`` file (one JSON object per line; blank lines are skipped),
- a ``.json`` file (an array of objects, or JSONL content),
- a ``.parquet`` file,
- a ``.csv`` file (header row; every cell is a string, so CSV suits plain-text data only),
- a directory of such files (read in sorted name order, not recursively),
- a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
- a ``datasets`` hub name (anything that is not an existing path and has no data-file
  extension), loaded with ``datasets.load_dataset(name, split=hub_split)``,
- or a list of any of these, concatenated in order.

Text files are decoded as UTF-8 with ``errors="surrogateescape"``: an invalid byte does
not stop loading, it becomes a marker that validation reports against its line and field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from lit_rlhf.data.formats import DataError, Where, report_invalid, row_error

Source = Union[str, Path, list]
Row = tuple[Where, dict]
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".csv")


def load_rows(source: Source, hub_split: str = "train", errors: list[DataError] | None = None) -> list[Row]:
    """Load every row of ``source`` with its provenance.

    Args:
        source: a path, a hub name, or a list of them (see the module docstring).
        hub_split: the split of a hub dataset, or of a saved ``DatasetDict``.
        errors: if given, lines that cannot be read (malformed JSON) are appended here and
            loading goes on; otherwise they are raised together as one :class:`DataError`.

    Returns:
        ``[(Where(source, line), row), ...]`` in source order.
    """
    own_errors: list[DataError] = [] if errors is None else errors
    rows: list[Row] = []
    for item in source if isinstance(source, (list, tuple)) else [source]:
        rows.extend(_load_one(item, hub_split, own_errors))
    if errors is None:
        report_invalid(own_errors, "error", f"data from {source}")
    return rows


def _load_one(source: Union[str, Path], hub_split: str, errors: list[DataError]) -> list[Row]:
    path = Path(source)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved_dataset(path, hub_split)
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {'/'.join(FILE_SUFFIXES)} files and is not a "
                                    "saved `datasets` dataset")
        return [row for f in files for row in _load_file(f, errors)]
    if path.is_file():
        return _load_file(path, errors)
    if path.suffix in FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return _load_hub(str(source), hub_split)


def _load_file(path: Path, errors: list[DataError]) -> list[Row]:
    found = len(errors)
    if path.suffix == ".jsonl":
        rows = _load_jsonl(path, errors)
    elif path.suffix == ".json":
        rows = _load_json(path, errors)
    elif path.suffix == ".csv":
        rows = _load_csv(path, errors)
    elif path.suffix == ".parquet":
        rows = _load_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if not rows and len(errors) == found:
        # Most often a failed export or a wrong path inside a folder: say so rather than train on less.
        errors.append(row_error(Where(str(path), 1, "line", path.suffix.lstrip(".")), None,
                                "the file holds no rows; fill it or remove it"))
    return rows


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _read_lines(path: Path) -> Iterator[str]:
    """The lines of a text file as ``_read_text(path).split("\n")`` has them, read one at a time: a
    large file is never held whole next to its parsed rows. (No UTF-8 sequence holds the byte of
    ``\n``, so each line decodes as it does within the whole text.)"""
    with path.open("rb") as f:
        for number, raw in enumerate(f):
            line = raw.decode("utf-8", errors="surrogateescape")
            yield (line.removeprefix("\ufeff") if number == 0 else line).removesuffix("\n")


def _load_jsonl(path: Path, errors: list[DataError], text: str | None = None) -> list[Row]:
    rows = []
    lines = _read_lines(path) if text is None else text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = Where(str(path), number, "line", "jsonl")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(row_error(where, None, f"line is not valid JSON ({e.msg} at column {e.colno}); each line "
                                    "must be one JSON object"))
            continue
        rows.append((where, row))
    return rows


def _load_json(path: Path, errors: list[DataError]) -> list[Row]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not a single JSON document: read it as JSON lines
    if isinstance(data, list):
        return [(Where(str(path), i, "row", "json"), row) for i, row in enumerate(data, start=1)]
    if isinstance(data, dict):  # a single object (or a one-line JSONL file)
        return [(Where(str(path), 1, "row", "json"), data)]
    return _load_jsonl(path, errors, text)


def _load_csv(path: Path, errors: list[DataError]) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows, last_line = [], 1  # line 1 is the header
    for row in reader:
        where = Where(str(path), last_line + 1, "line", "csv")
        last_line = reader.line_num
        if None in row:  # DictReader files the cells beyond the header under the key None
            errors.append(row_error(where, None, f"has {len(reader.fieldnames) + len(row[None])} cells but the header "
                                    f"has {len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)}); quote "
                                    "cells that contain commas"))
            continue
        rows.append((where, row))
    return rows


def _load_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [(Where(str(path), i, "row", "parquet"), row) for i, row in enumerate(table.to_pylist(), start=1)]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved_dataset(path: Path, split: str) -> list[Row]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path}: saved DatasetDict has no split {split!r} (it has {', '.join(data)}); "
                             "set hub_split to one of them")
        data = data[split]
    return [(Where(str(path), i, "row", "dataset"), dict(row)) for i, row in enumerate(data, start=1)]


def _load_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:  # datasets >= 4 (pinned) runs no loading scripts: a hub dataset is data files only
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason we tried the hub at all
        raise FileNotFoundError(f"{name!r} is not a local file or directory, so it was loaded as a `datasets` hub "
                                f"name (split {split!r}), which failed: {e}") from e
    source = f"{name}[{split}]"
    return [(Where(source, i, "row", "hub"), dict(row)) for i, row in enumerate(data, start=1)]
