"""Fixtures of the rollout tests: the toy base and its tokenizer."""

import pytest
import torch

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer

from tests.paths import TOY_BASE


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BankSpec(model=TOY_BASE))


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(0)
    return AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("policy"), AdapterSpec("other")])).eval()
