import json
from pathlib import Path

import pytest

from tests.paths import TOY_BASE, TOY_DATA


@pytest.fixture(scope="session")
def toy_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOY_BASE)


@pytest.fixture(scope="session")
def toy_data() -> Path:
    return TOY_DATA


def _write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw lines (str / bytes written as they are)."""
    with path.open("wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.fixture
def write_jsonl():
    return _write_jsonl
