"""The LM head on completion-predicting positions only (``models.head``), fused with the log-probs where
nothing follows it (``losses.head_token_logps``): the same log-probs, losses and gradients as full
logits, padded and padding-free, on families with different heads (tied GPT-2 and Gemma 3, Phi-2's bias; Gemma 2's
soft-capping, Cohere's logit scale and Granite's division after the head, which keep the unfused head), for the
offline methods and SFT, and full logits where a model's forward does not allow it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.losses import logprobs
from lit_rlhf.methods import DPO, KTO, SFT, PreferenceMethod
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.head import fused_head_supported, head_on
from tests.methods.tiny_families import (
    AFTER_HEAD,
    FAMILIES,
    PREFERENCE,
    TOL,
    UNPAIRED,
    build_families,
    move_off_reference,
)

MORE = ["gemma3_text", "cohere", "granite", "phi"]
from tests.paths import TOY_DATA


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), FAMILIES + MORE)


def make(cls, model: str, *, train_mode: str = "lora", padding_free: bool | None = None, **kwargs):
    """A method whose policy differs from its reference (LoRA B off zero, or full weights nudged)."""
    method = cls(bank=BankSpec(model=model, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8)),
                 padding_free=padding_free, **kwargs)
    method.configure_model()
    move_off_reference(method.bank, train_mode)
    assert method.uses_packing() is (padding_free is None)
    return method


def head_paths(method, run) -> dict:
    """``run()`` on each LM head path the model allows: ``fused`` (where its check passes), ``selected``
    (the kept positions' logits) and ``full`` (every position's logits)."""
    assert method.uses_head_selection()
    fused = method.uses_fused_head()
    results = {}
    try:
        for name, selection, fused_on in (("fused", True, True), ("selected", True, False), ("full", False, False)):
            if fused_on and not fused:
                continue
            method._head_selection, method._fused_head = selection, fused_on
            results[name] = run()
    finally:
        method._head_selection, method._fused_head = True, fused
    return results


def assert_paths_agree(results: dict, compare) -> None:
    for name, ours in results.items():
        if name != "full":
            compare(ours, results["full"], name)


def close_fields(ours, theirs, name):
    for field, (a, b) in enumerate(zip(ours, theirs)):
        if a is None:
            assert b is None, (name, field)
        else:
            torch.testing.assert_close(a, b, **TOL, msg=f"{name}, field {field}")


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
    expected = torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 0]])[None]
    with head_on(head, keep) as selected:
        out = head(hidden)
    assert len(selected) == 1 and torch.equal(selected[0], expected)
    torch.testing.assert_close(out, head(expected))
    assert head(hidden).shape == (2, 3, 3), "the hook must be gone after the block"


def test_head_on_passthrough_hands_back_the_selected_input_without_running_the_head():
    head = nn.Linear(2, 3)
    hidden = torch.arange(12.0).view(2, 3, 2)
    keep = torch.tensor([[False, True, True], [True, False, False]])
    with head_on(head, keep, passthrough=True) as selected:
        out = head(hidden)
        other = head(torch.zeros(4, 2))  # not the selected input: the head runs on it
    assert out is selected[0] and out.shape == (1, 3, 2)
    assert other.shape == (4, 3)
    assert "forward" not in head.__dict__ and head(hidden).shape == (2, 3, 3), "the head must be restored"
    wrapped = head.forward  # a forward set on the instance (as accelerate's hooks set it) is put back
    head.forward = wrapped
    with head_on(head, keep, passthrough=True):
        assert head(hidden).shape == (1, 3, 2)
    assert head.__dict__["forward"] is wrapped


@pytest.mark.parametrize(("family", "padding_free"), [
    *(pytest.param(family, padding_free, id=f"{family}-{'padded' if padding_free is False else 'packed'}")
      for family in FAMILIES for padding_free in (None, False)),
    *(pytest.param(family, None, id=f"{family}-packed") for family in MORE)])
def test_dpo_log_probs_and_loss_match_full_logits(models, family, padding_free):
    # LD-DPO's reweighted sums and WPO's weights read per-token log-probs and the logits themselves.
    method = make(DPO, models[family], padding_free=padding_free, beta=0.5, ld_alpha=0.5, use_weighting=True)
    batch = preference_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        results = head_paths(method, lambda: method.pair_logps(batch, with_weights=True))
        assert set(results) == ({"selected", "full"} if family in AFTER_HEAD else {"fused", "selected", "full"})
        assert_paths_agree(results, close_fields)
        assert_paths_agree(head_paths(method, lambda: PreferenceMethod.pair_logps(method, batch)), close_fields)
    results = head_paths(method, lambda: method.compute_loss(batch)[0])
    assert not torch.isclose(results["full"], torch.tensor(0.6931), atol=1e-3), "policy and reference should differ"
    assert_paths_agree(results, lambda ours, theirs, name: torch.testing.assert_close(ours, theirs, **TOL, msg=name))


@pytest.mark.parametrize(("family", "padding_free"), [("llama", None), ("qwen2", False), ("gpt2", False),
                                                      ("gemma2", None)])
def test_kto_log_probs_and_loss_match_full_logits(models, family, padding_free):
    method = make(KTO, models[family], padding_free=padding_free, beta=0.5)
    batch = unpaired_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        for prefix in ("", "kl_"):
            assert_paths_agree(head_paths(method, lambda: method.completion_logps(batch, prefix)), close_fields)
    results = head_paths(method, lambda: method.compute_loss(batch))
    assert_paths_agree({name: (loss, metrics["kl"][0]) for name, (loss, metrics) in results.items()}, close_fields)


@pytest.mark.parametrize(("family", "padding_free", "train_mode"),
                         [("llama", None, "full"), ("gpt2", False, "full"), ("llama", False, "lora"),
                          ("gemma2", False, "full")])
def test_a_dpo_step_has_the_loss_and_gradients_of_full_logits(models, family, padding_free, train_mode):
    """One DPO step, on the fused head (llama, tied GPT-2; the reference copy's head in full mode) or the
    selected logits (gemma2): the loss and every gradient (the LM head's, the tied embeddings', LoRA's)
    equal those of full logits."""
    method = make(DPO, models[family], train_mode=train_mode, padding_free=padding_free, beta=0.5)
    method.bank.train()
    batch = preference_batch(method)
    trained = [(name, param) for name, param in method.bank.named_parameters() if param.requires_grad]

    def step():
        method.bank.zero_grad(set_to_none=True)
        loss = method.compute_loss(batch)[0]
        loss.backward()
        return [loss.detach()] + [param.grad.clone() for _, param in trained]

    results = head_paths(method, step)
    assert ("fused" in results) is (family != "gemma2")
    assert train_mode == "lora" or any("lm_head" in name or "wte" in name or "embed" in name for name, _ in trained)
    names = ["loss"] + [name for name, _ in trained]
    assert_paths_agree(results, lambda ours, theirs, path: [
        torch.testing.assert_close(a, b, **TOL, msg=f"{path}: {name}") for name, a, b in zip(names, ours, theirs)])


@pytest.mark.parametrize("family", FAMILIES + MORE)
def test_the_head_is_fused_where_nothing_follows_it(models, caplog, family):
    """The check picks the fused head on plain linear heads (tied GPT-2 and Gemma 3, Phi-2's with a bias), and
    not where the forward changes the logits after the head (Gemma 2 soft-caps them, Cohere scales them, Granite
    divides them: fusing would skip it); logged either way."""
    fused = family not in AFTER_HEAD
    method = make(DPO, models[family])
    with caplog.at_level("INFO", logger="lit_rlhf.methods"):
        assert method.uses_fused_head() is fused
    assert ("LM head fused with the log-probs" in caplog.text) is fused
    assert ("LM head not fused" in caplog.text) is not fused


def test_fused_head_check_refuses_a_head_that_is_not_plain_linear_or_is_followed(models):
    method = make(DPO, models["llama"])
    bank, head = method.bank, method.bank.output_embeddings()
    vocab = bank.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        def plain(ids):
            return bank(ids).logits

        def scaled(ids):  # a logit scale after the head (Cohere, Granite)
            return bank(ids).logits * 0.5

        class Subclassed(nn.Linear):  # e.g. a quantized or adapted head: its weight is not its whole map
            pass

        assert fused_head_supported(plain, head, vocab, torch.device("cpu"))
        assert not fused_head_supported(scaled, head, vocab, torch.device("cpu"))
        other = Subclassed(head.in_features, head.out_features, bias=False)
        assert not fused_head_supported(plain, other, vocab, torch.device("cpu"))


def test_the_fused_head_keeps_no_logits_for_backward(models, monkeypatch):
    """The policy forward of a DPO step saves for backward at most one chunk of logits (the last, 8 rows
    here), never the kept positions' logits whole (the unfused head saves them)."""
    method = make(DPO, models["llama"], beta=0.5)
    method.bank.train()
    batch = preference_batch(method)
    vocab = method.bank.model.get_input_embeddings().num_embeddings
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 8 * vocab)
    kept = int(batch["completion_mask"][:, 1:].sum())
    saved: list[tuple[int, ...]] = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    def logits_saved() -> list:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            method.compute_loss(batch)
        return [torch.Size(shape).numel() // vocab for shape in saved if shape and shape[-1] == vocab]

    assert method.uses_fused_head() and kept > 8
    assert logits_saved() == [8 if kept % 8 == 0 else kept % 8]
    method._fused_head = False
    assert kept in logits_saved(), "the unfused head saves its logits (the check above would see them)"


def test_falls_back_to_full_logits(models, caplog, monkeypatch):
    """Where the head that would be hooked is not the one the forward runs, the first-forward check
    fails: full logits, logged, and the same log-probs."""
    method = make(DPO, models["qwen2"])
    batch = preference_batch(method)
    with torch.no_grad(), method.bank.role("policy"):
        expected = method.pair_logps(batch)
    method._head_selection = None
    method._fused_head = None
    monkeypatch.setattr(method.bank, "output_embeddings", lambda: nn.Linear(4, 4))
    with caplog.at_level("INFO", logger="lit_rlhf.methods"):
        assert not method.uses_head_selection() and not method.uses_fused_head()
    assert "LM head on every position" in caplog.text and "LM head not fused" in caplog.text
    with torch.no_grad(), method.bank.role("policy"):
        for ours, theirs in zip(method.pair_logps(batch), expected):
            torch.testing.assert_close(ours, theirs, **TOL)


def test_a_batch_without_completion_tokens_keeps_its_graph(models):
    """No completion-predicting position: full logits, so the (zero) loss still reaches the weights."""
    method = make(DPO, models["llama"], beta=0.5)
    assert method.uses_fused_head()
    batch = preference_batch(method)
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    loss, _ = method.compute_loss(batch)
    loss.backward()
    assert all(param.grad is not None for name, param in method.bank.named_parameters() if param.requires_grad)


@pytest.mark.parametrize(("family", "packing"), [("llama", True), ("gpt2", False), ("gemma2", True)])
def test_an_sft_step_has_the_loss_and_gradients_of_full_logits(models, family, packing):
    """SFT's loss from the same forward (fused head, or the kept positions' logits on gemma2), on packed
    and padded batches: the loss and every gradient (LM head and embeddings included) equal full logits'."""
    method = SFT(bank=BankSpec(model=models[family], train_mode="full"))
    method.configure_model()
    method.bank.train()
    data = SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), max_length=64, packing=packing).prepare(method.tokenizer)
    batch = data.collator(data.train_examples[:4])
    assert ("position_ids" in batch) is packing
    trained = [(name, param) for name, param in method.bank.named_parameters() if param.requires_grad]

    def step():
        method.bank.zero_grad(set_to_none=True)
        loss, num_tokens = method.compute_loss(batch)
        loss.backward()
        return [loss.detach(), num_tokens] + [param.grad.clone() for _, param in trained]

    results = head_paths(method, step)
    assert ("fused" in results) is (family != "gemma2")
    names = ["loss", "num_tokens"] + [name for name, _ in trained]
    assert_paths_agree(results, lambda ours, theirs, path: [
        torch.testing.assert_close(a, b, **TOL, msg=f"{path}: {name}") for name, a, b in zip(names, ours, theirs)])
