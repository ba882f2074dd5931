import json

import pytest

from lit_rlhf.data import DataError, Where, load_rows

ROWS = [
    {"prompt": "the class was", "completion": "good .", "label": True},
    {"prompt": "the car was", "completion": "bad .", "label": False},
    {"prompt": "the team was", "completion": "fun .", "label": True},
]


def _rows(loaded):
    return [row for _, row in loaded]


def test_jsonl(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    loaded = load_rows(str(path))
    assert _rows(loaded) == ROWS
    assert [w.line for w, _ in loaded] == [1, 2, 3] and str(loaded[1][0]) == f"{path}:2"


def test_json_array_and_json_lines(tmp_path, write_jsonl):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ROWS, indent=2))
    loaded = load_rows(path)
    assert _rows(loaded) == ROWS
    assert str(loaded[2][0]) == f"{path}: row 3"
    lines = write_jsonl(tmp_path / "b.json", ROWS)
    assert _rows(load_rows(lines)) == ROWS
    single = tmp_path / "c.json"
    single.write_text(json.dumps(ROWS[0], indent=2))
    assert _rows(load_rows(single)) == ROWS[:1]


def test_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "a.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    loaded = load_rows(path)
    assert _rows(loaded) == ROWS and loaded[0][0] == Where(str(path), 1, "row", "parquet")


def test_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('prompt,completion,label\nthe class was,good .,true\n"the car\nwas",bad .,false\nthe team was,fun .,true\n')
    loaded = load_rows(path)
    assert [w.line for w, _ in loaded] == [2, 3, 5]  # the header is line 1; row 2 spans lines 3-4
    assert [r["label"] for r in _rows(loaded)] == ["true", "false", "true"]  # converted by validation


def test_folder_is_read_in_sorted_order(tmp_path, write_jsonl):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ROWS[2:])
    write_jsonl(folder / "a.jsonl", ROWS[:2])
    (folder / "notes.txt").write_text("ignored")
    assert _rows(load_rows(folder)) == ROWS


def test_list_of_sources(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = tmp_path / "b.json"
    b.write_text(json.dumps(ROWS[1:]))
    assert _rows(load_rows([str(a), str(b)])) == ROWS


def test_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    loaded = load_rows(tmp_path / "ds")
    assert _rows(loaded) == ROWS and str(loaded[0][0]) == f"{tmp_path / 'ds'}: row 1"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS[1:])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert _rows(load_rows(tmp_path / "dd", hub_split="test")) == ROWS[1:]
    with pytest.raises(ValueError, match="no split 'val'"):
        load_rows(tmp_path / "dd", hub_split="val")


def test_missing_file_is_not_a_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_malformed_lines_raise_together_without_error_list(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", ["{", ROWS[0], "[1,"])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert len(info.value.errors) == 2 and f"{path}:1" in str(info.value) and f"{path}:3" in str(info.value)
    errors = []
    assert _rows(load_rows(path, errors=errors)) == ROWS[:1] and len(errors) == 2


def _write(kind, tmp_path, write_jsonl):
    import datasets
    import pandas as pd

    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", ROWS)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(ROWS))
        return tmp_path / "d.json"
    if kind == "parquet":
        pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    if kind == "csv":
        pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)  # labels written as True/False
        return tmp_path / "d.csv"
    if kind == "folder":
        (tmp_path / "d").mkdir()
        write_jsonl(tmp_path / "d" / "0.jsonl", ROWS[:2])
        pd.DataFrame(ROWS[2:]).to_parquet(tmp_path / "d" / "1.parquet")
        return tmp_path / "d"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "folder", "saved"])
def test_every_source_type_gives_the_same_examples(kind, tmp_path, toy_tokenizer, write_jsonl):
    from lit_rlhf.data import UnpairedDataModule

    reference = UnpairedDataModule(train=str(_write("jsonl", tmp_path, write_jsonl)), tokenizer=toy_tokenizer).prepare()
    data = UnpairedDataModule(train=str(_write(kind, tmp_path, write_jsonl)), tokenizer=toy_tokenizer).prepare()
    assert data.train_examples == reference.train_examples and len(data.train_examples) == 3
