"""The repository and its embedded toy task (``assets/toy``), as absolute paths: a test may run in
another directory (a subprocess in ``tmp_path``) or build a session fixture before the conftest's
move to the repository root."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = str(REPO / "assets" / "toy" / "base")  # a model directory, as BankSpec(model=...) takes it
TOY_TEACHER = str(REPO / "assets" / "toy" / "teacher")
TOY_DATA = REPO / "assets" / "toy" / "data"  # the datasets: TOY_DATA / "sft_train.jsonl"


def import_file(path: Path, name: str) -> ModuleType:
    """The script at ``path`` (in benchmarks/ or examples/, not a package) imported as module ``name``,
    registered in ``sys.modules`` first: dataclasses look their module up while the file executes."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
