"""Fixtures of the rollout tests: the toy base and its tokenizer."""

import sys
from pathlib import Path

import pytest
import torch

# Lets the test modules import the plain-python `_rollout_helpers` next to them.
sys.path.insert(0, str(Path(__file__).parent))

from _rollout_helpers import TOY  # noqa: E402

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BankSpec(model=TOY))


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(0)
    return AdapterBank(BankSpec(model=TOY, adapters=[AdapterSpec("policy"), AdapterSpec("other")])).eval()
