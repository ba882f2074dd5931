"""The LM head on completion-predicting positions only (``models.head``): the same log-probs, losses
and gradients as full logits, padded and padding-free, on families with different heads (tied GPT-2,
Gemma2's soft-capping after the head), and full logits where a model's forward does not allow it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_rlhf.data import PreferenceDataModule, UnpairedDataModule
from lit_rlhf.methods import DPO, KTO, PreferenceMethod
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.head import head_on, head_selection_supported
from tests.methods.tiny_families import FAMILIES, PREFERENCE, TOL, UNPAIRED, build_families


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), FAMILIES)


def make(cls, model: str, *, train_mode: str = "lora", padding_free: bool | None = None, **kwargs):
    """A method whose policy differs from its reference (LoRA B off zero, or full weights nudged)."""
    method = cls(bank=BankSpec(model=model, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8)),
                 padding_free=padding_free, **kwargs)
    method.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in method.bank.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif train_mode == "full" and param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.01)
    assert method.uses_packing() is (padding_free is None)
    return method


def reduced_and_full(method, run):
    """``run()`` with the LM head on the completion-predicting positions, then on every position."""
    assert method.uses_head_selection()
    reduced = run()
    method._head_selection = False
    try:
        return reduced, run()
    finally:
        method._head_selection = True


def preference_batch(method) -> dict:
    data = PreferenceDataModule(train=PREFERENCE, max_length=64).prepare(method.tokenizer)
    return data.collator(data.train_examples[:4])


def unpaired_batch(method) -> dict:
    data = UnpairedDataModule(train=UNPAIRED, max_length=64).prepare(method.tokenizer)
    return data.collator(data.train_examples[:4])


def test_head_on_runs_the_head_on_the_kept_positions_in_order():
    head = nn.Linear(2, 3)
    hidden = torch.arange(12.0).view(2, 3, 2)
    keep = torch.tensor([[False, True, True], [True, False, False]])
    with head_on(head, keep) as applied:
        out = head(hidden)
    assert applied == [True]
    torch.testing.assert_close(out, head(torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 0]]))[None])
    assert head(hidden).shape == (2, 3, 3), "the hook must be gone after the block"


@pytest.mark.parametrize("padding_free", [None, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_log_probs_and_loss_match_full_logits(models, family, padding_free):
    # LD-DPO's reweighted sums and WPO's weights read per-token log-probs and the logits themselves.
    method = make(DPO, models[family], padding_free=padding_free, beta=0.5, ld_alpha=0.5, use_weighting=True)
    batch = preference_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        logits, _ = method.lm_logits(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        predicting = int(batch["completion_mask"][:, 1:].sum())
        assert logits.shape[:2] == (1, predicting) and predicting < int(batch["attention_mask"].sum())
        reduced, full = reduced_and_full(method, lambda: method.pair_logps(batch, with_weights=True))
        for ours, theirs in zip(reduced, full):
            torch.testing.assert_close(ours, theirs, **TOL)
        reduced, full = reduced_and_full(method, lambda: PreferenceMethod.pair_logps(method, batch))
        for ours, theirs in zip(reduced, full):
            torch.testing.assert_close(ours, theirs, **TOL)
    (loss, _), (expected, _) = reduced_and_full(method, lambda: method.compute_loss(batch))
    assert not torch.isclose(expected, torch.tensor(0.6931), atol=1e-3), "policy and reference should differ"
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize(("family", "padding_free"), [("llama", None), ("qwen2", False), ("gpt2", False),
                                                      ("gemma2", None)])
def test_kto_log_probs_and_loss_match_full_logits(models, family, padding_free):
    method = make(KTO, models[family], padding_free=padding_free, beta=0.5)
    batch = unpaired_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        for prefix in ("", "kl_"):
            reduced, full = reduced_and_full(method, lambda: method.completion_logps(batch, prefix))
            torch.testing.assert_close(reduced.logps, full.logps, **TOL)
            assert torch.equal(reduced.num_tokens, full.num_tokens)
    (loss, metrics), (expected, expected_metrics) = reduced_and_full(method, lambda: method.compute_loss(batch))
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(metrics["kl"][0], expected_metrics["kl"][0], **TOL)


@pytest.mark.parametrize(("family", "padding_free"), [("llama", None), ("gemma2", False)])
def test_full_mode_gradients_match_full_logits(models, family, padding_free):
    """Full fine-tuning, reference copy included: one step's loss and every gradient (the LM head's too)
    equal those of full logits."""
    method = make(DPO, models[family], train_mode="full", padding_free=padding_free, beta=0.5)
    method.bank.train()
    batch = preference_batch(method)
    trained = [(name, param) for name, param in method.bank.named_parameters() if param.requires_grad]

    def gradients():
        method.bank.zero_grad(set_to_none=True)
        method.compute_loss(batch)[0].backward()
        return [param.grad.clone() for _, param in trained]

    reduced, full = reduced_and_full(method, gradients)
    assert any("lm_head" in name or "wte" in name or "embed" in name for name, _ in trained)
    for (name, _), ours, theirs in zip(trained, reduced, full):
        torch.testing.assert_close(ours, theirs, **TOL, msg=name)


class KeywordHead(nn.Module):
    """A causal LM whose forward calls its head with a keyword argument (no positional input to select)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        hidden = self.inner.base_model(input_ids=input_ids).last_hidden_state
        return self.inner.get_output_embeddings()(input=hidden)


def test_models_whose_forward_does_not_allow_it_are_found(models):
    method = make(DPO, models["llama"])
    bank, head = method.bank, method.bank.output_embeddings()
    vocab = bank.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        def plain(ids):
            return bank(ids).logits

        def reshaped(ids):  # logits reshaped to the input's shape after the head
            return bank(ids).logits.reshape(*ids.shape, -1)

        keyword = KeywordHead(bank.model.get_base_model())
        assert head_selection_supported(plain, head, vocab, torch.device("cpu"))
        assert not head_selection_supported(reshaped, head, vocab, torch.device("cpu"))
        assert not head_selection_supported(keyword, head, vocab, torch.device("cpu"))


def test_falls_back_to_full_logits(models, caplog, monkeypatch):
    """Where the head that would be hooked is not the one the forward runs, the first-forward check
    fails: full logits, logged, and the same log-probs."""
    method = make(DPO, models["qwen2"])
    batch = preference_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        expected = method.pair_logps(batch)
    method._head_selection = None
    monkeypatch.setattr(method.bank, "output_embeddings", lambda: nn.Linear(4, 4))
    with caplog.at_level("INFO", logger="lit_rlhf.methods"):
        assert not method.uses_head_selection()
    assert "LM head on every position" in caplog.text
    with torch.no_grad(), method.bank.role("policy"):
        logits, layout = method.lm_logits(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert logits.shape[:2] == layout.slot_mask.shape and int(layout.slot_mask.sum()) == int(batch["attention_mask"].sum())
        for ours, theirs in zip(method.pair_logps(batch), expected):
            torch.testing.assert_close(ours, theirs, **TOL)


def test_a_batch_without_completion_tokens_keeps_its_graph(models):
    """No completion-predicting position: full logits, so the (zero) loss still reaches the weights."""
    method = make(DPO, models["llama"], beta=0.5)
    batch = preference_batch(method)
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    with method.bank.role("policy"):
        logits, _ = method.lm_logits(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert logits.shape[1] > 1
    loss, _ = method.compute_loss(batch)
    loss.backward()
    assert all(param.grad is not None for name, param in method.bank.named_parameters() if param.requires_grad)
