"""The repository and its embedded toy task (``assets/toy``), as absolute paths: a test may run in
another directory (a subprocess in ``tmp_path``) or build a session fixture before the conftest's
move to the repository root."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = str(REPO / "assets" / "toy" / "base")  # a model directory, as BankSpec(model=...) takes it
TOY_TEACHER = str(REPO / "assets" / "toy" / "teacher")
TOY_DATA = REPO / "assets" / "toy" / "data"  # the datasets: TOY_DATA / "sft_train.jsonl"
