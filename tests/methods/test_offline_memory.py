"""Memory of the offline steps: one logits tensor alive at a time, chunked float32 work on the logits."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, UnpairedDataModule
from lit_rlhf.losses import logprobs, log_sum_squared_probs
from lit_rlhf.methods import DPO, KTO
from lit_rlhf.models import BankSpec, LoraSpec


def forwards_during_loss(method, batch) -> list[bool]:
    """Whether gradients were on, for each LM-head call of one ``compute_loss``."""
    calls = []
    head = method.bank.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    try:
        method.compute_loss(batch)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("cls", [DPO, KTO])
def test_the_forward_with_gradient_comes_last(cls):
    """The logits a backward keeps are the last logits made: every pass without gradient (reference,
    KTO's KL rows) runs before it and frees its own, so two logits tensors are never alive at once."""
    method = cls(bank=BankSpec(lora=LoraSpec(r=4)))
    method.configure_model()
    method.bank.train()
    if cls is DPO:
        data = PreferenceDataModule(train="assets/toy/data/preference_train.jsonl", batch_size=4, max_length=64)
    else:
        data = UnpairedDataModule(train="assets/toy/data/unpaired_train.jsonl", batch_size=4, max_length=64)
    batch = next(iter(data.prepare(method.tokenizer).train_dataloader()))
    method.uses_packing(), method.uses_fused_head()  # the one-off probes run outside the step's count
    calls = forwards_during_loss(method, batch)
    assert calls[-1] and not any(calls[:-1]) and len(calls) == (2 if cls is DPO else 4), calls


def test_log_sum_squared_probs_chunked_equals_the_formula(monkeypatch):
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16)
    expected = torch.log((torch.softmax(logits.double(), dim=-1) ** 2).sum(dim=-1)).float()
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * 11)  # 4 positions per chunk: 4 chunks over 15
    torch.testing.assert_close(log_sum_squared_probs(logits), expected, atol=1e-5, rtol=1e-5)
