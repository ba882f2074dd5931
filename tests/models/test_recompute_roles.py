"""``bank.gradient_checkpointing`` per role: the listed roles' training forwards recompute in backward,
the others keep their activations, and gradients are those of a run without checkpointing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lit_rlhf.cli import console
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer
from lit_rlhf.models.bank import RecomputeInRole, check_bank_spec, eval_mode

from tests.paths import TOY_BASE

PPO_ROLES = [AdapterSpec("policy"), AdapterSpec("value", head="value")]


@pytest.fixture(scope="module")
def batch():
    enc = load_tokenizer(BankSpec(model=TOY_BASE))(["the movie was good and fun .", "i think the car is"],
                                                   return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def ppo_bank(checkpointing) -> AdapterBank:
    """Policy and value adapters, each moved off the base (a fresh LoRA is a no-op), so a layer
    recomputed in the wrong role would give other gradients; a frozen reward adapter beside them."""
    torch.manual_seed(0)
    spec = BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", head="score", trainable=False)],
                    gradient_checkpointing=checkpointing)
    bank = AdapterBank(spec, require=PPO_ROLES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name or name.startswith("heads."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return bank


def recomputed_in_backward(bank: AdapterBank, step) -> Counter:
    """Run ``step`` (forwards, then a backward it starts by calling ``backward_begins``) and count the
    decoder layers' sub-layer calls made during backward, by the role active when each ran."""
    in_backward = [False]
    counts = Counter()

    def count(*_):
        if in_backward[0]:
            counts[bank.active] += 1

    layers = [m for m in bank.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    hooks = [sub.register_forward_hook(count) for layer in layers for sub in layer.children()]
    try:
        step(lambda: in_backward.__setitem__(0, True))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def ppo_like_step(bank: AdapterBank, batch) -> tuple[dict[str, torch.Tensor], Counter]:
    """Reference forward (no grad), policy forward, value forward, one backward of the sum: every
    trainable parameter's gradient, and the roles recomputed in that backward."""
    ids, mask = batch

    def step(backward_begins):
        with bank.reference():
            reference = bank(ids, mask).logits
        logits = bank(ids, mask).logits
        values = bank.values(ids, mask, adapter="value")
        loss = (logits.log_softmax(-1) - reference.log_softmax(-1)).pow(2).mean() + values.pow(2).mean()
        backward_begins()
        loss.backward()

    recomputed = recomputed_in_backward(bank, step)
    grads = {n: p.grad.clone() for n, p in bank.named_parameters() if p.requires_grad}
    return grads, recomputed


@pytest.mark.parametrize("checkpointing, recomputing", [
    (True, {"policy", "value"}),
    (["policy"], {"policy"}),
    (["value"], {"value"}),
    ([], set()),
])
def test_only_the_listed_roles_recompute_and_gradients_are_unchanged(batch, checkpointing, recomputing):
    expected, plain_recomputed = ppo_like_step(ppo_bank(False), batch)
    assert not plain_recomputed  # nothing runs a layer during backward without checkpointing

    grads, recomputed = ppo_like_step(ppo_bank(checkpointing), batch)
    assert set(recomputed) == recomputing, recomputed
    assert any(".value." in n for n in grads) and any(".policy." in n for n in grads)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_grad_and_eval_forwards_never_reach_the_checkpoint_function(batch, monkeypatch):
    calls = Counter()
    original = RecomputeInRole.__call__

    def counting(self, function, *args, **kwargs):
        calls[self._bank().active] += 1
        return original(self, function, *args, **kwargs)

    monkeypatch.setattr(RecomputeInRole, "__call__", counting)
    bank = ppo_bank(["policy"])
    layers = sum(isinstance(m, GradientCheckpointingLayer) for m in bank.model.modules())
    with torch.no_grad():
        bank(*batch)
    with bank.reference():
        bank(*batch)
    with eval_mode(bank):
        bank.values(*batch, adapter="value").sum().backward()
    assert not calls
    bank(*batch)
    bank.values(*batch, adapter="value")
    assert calls == {"policy": layers, "value": layers}  # asked per call; only the policy's recompute


def test_full_mode_takes_its_one_trainable_role_as_the_list(batch):
    ids, mask = batch

    def full_step(checkpointing):
        torch.manual_seed(0)
        bank = AdapterBank(BankSpec(model=TOY_BASE, train_mode="full", gradient_checkpointing=checkpointing),
                           require=[AdapterSpec("policy")])

        def step(backward_begins):
            loss = bank(ids, mask).logits.log_softmax(-1).mean()
            backward_begins()
            loss.backward()

        recomputed = recomputed_in_backward(bank, step)
        return {n: p.grad.clone() for n, p in bank.named_parameters() if p.requires_grad}, recomputed

    expected, plain_recomputed = full_step(False)
    grads, recomputed = full_step(["policy"])
    assert not plain_recomputed and set(recomputed) == {"policy"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("checkpointing, message", [
    (["critic"], r"bank.gradient_checkpointing lists \['critic'\], not trainable adapters of this bank"),
    (["policy", "reward"], r"lists \['reward'\], .* trainable adapters are \['policy', 'value'\]; frozen ones \(\['reward'\]\)"),
    ("policy", r"bank.gradient_checkpointing takes true, false or a list of adapter names, got 'policy'"),
])
def test_a_role_list_naming_no_trainable_adapter_is_refused_before_any_weights_load(checkpointing, message):
    spec = BankSpec(model=TOY_BASE, adapters=[AdapterSpec("reward", head="score", trainable=False)],
                    gradient_checkpointing=checkpointing)
    with pytest.raises(InvalidArgument, match=message):
        check_bank_spec(spec, [*PPO_ROLES, *spec.adapters])


def test_the_command_line_takes_a_role_list_and_names_the_key_of_a_wrong_one(tmp_path, capsys):
    base = ["fit", "--config", "configs/ppo.yaml", "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        console([*base, "--model.init_args.bank.gradient_checkpointing", "[policy]", "--print_config"])
    assert info.value.code == 0
    assert "gradient_checkpointing:\n      - policy\n" in capsys.readouterr().out

    with pytest.raises(SystemExit) as info:
        console([*base, "--model.init_args.bank.gradient_checkpointing", "[critic]"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "lit-rlhf: error: bank.gradient_checkpointing lists ['critic']" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
