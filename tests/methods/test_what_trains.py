"""Exactly the intended parameters move: after a few optimizer steps of every method and bank layout,
each frozen tensor (base, reference copy, reward adapter and its head, teacher) is bitwise unchanged,
each trained one has moved, and the optimizer (and gradient clipping) holds exactly the trained ones.

The expected set is written here by name, independently of ``AdapterBank._is_trainable``, so a
wrong trainability rule fails these tests instead of defining what they check."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.methods import CPO, DPO, GKD, GRPO, KTO, ORPO, PPO, RLOO, SFT, BestOfN, OnlineDPO, RewardModeling, SimPO
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig

from tests.methods.online_helpers import make_online, saved_random_adapter
from tests.paths import TOY_BASE, TOY_DATA, TOY_TEACHER

STEPS = 2  # a fresh LoRA's A gets no gradient while B is zero: it moves from the second step on


def lora(*adapters: str) -> Callable[[str], bool]:
    """The LoRA tensors of ``adapters`` (and nothing of the base)."""
    return lambda name: "lora_" in name and any(f".{a}." in name for a in adapters)


def heads(*adapters: str) -> Callable[[str], bool]:
    return lambda name: any(name.startswith(f"heads.{a}.") for a in adapters)


def either(*rules: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda name: any(rule(name) for rule in rules)


def whole_base(name: str) -> bool:
    """``full`` mode: the base's own weights, not its frozen reference copy, a teacher or a head."""
    return name.startswith("model.")


def bank(train_mode: str = "lora", **kwargs) -> BankSpec:
    return BankSpec(model=TOY_BASE, train_mode=train_mode, lora=LoraSpec(r=4, alpha=8), **kwargs)


def preference() -> PreferenceDataModule:
    return PreferenceDataModule(str(TOY_DATA / "preference_train.jsonl"), batch_size=4, max_length=48)


def sft() -> SFTDataModule:
    return SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4, max_length=48)


def unpaired() -> UnpairedDataModule:
    return UnpairedDataModule(str(TOY_DATA / "unpaired_train.jsonl"), batch_size=4, max_length=48)


def prompts() -> PromptDataModule:
    return PromptDataModule(str(TOY_DATA / "prompt_train.jsonl"), batch_size=2, max_length=32)


class Recorded:
    """One short fit: which tensors moved, which the optimizer holds (by group), which clipping saw."""

    def __init__(self, method, data, *, monkeypatch, gradient_clip_val: float | None = 1.0, **trainer_kwargs):
        pl.seed_everything(0)
        method.configure_model()
        self.method = method
        before = {n: p.detach().clone() for n, p in method.bank.named_parameters()}
        self.clipped: list[set[str]] = []
        names = {id(p): n for n, p in method.bank.named_parameters()}
        clip = torch.nn.utils.clip_grad_norm_

        def recording_clip(parameters, *args, **kwargs):
            parameters = list(parameters)
            self.clipped.append({names[id(p)] for p in parameters})
            return clip(parameters, *args, **kwargs)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                       logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        if method.automatic_optimization:
            options.update(max_steps=STEPS, gradient_clip_val=gradient_clip_val)
        else:
            options.update(limit_train_batches=1)  # one rollout: update_epochs x num_mini_batches steps
        options.update(trainer_kwargs)
        trainer = pl.Trainer(**options)
        trainer.fit(method, data)
        self.steps = trainer.global_step
        self.moved = {n for n, p in method.bank.named_parameters() if not torch.equal(p, before[n])}
        self.groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in trainer.optimizers[0].param_groups}
        self.optimized = set().union(*self.groups.values())
        self.all_names = set(before)
        self.before = before

    def assert_trains_exactly(self, expected: Callable[[str], bool], *, unread: Callable[[str], bool] = lambda n: False) -> None:
        """``expected`` tensors are optimized, clipped and moved; every other one is still. ``unread``
        ones among them are optimized but no loss reaches them (a reward model's LM head in full mode)."""
        want = {n for n in self.all_names if expected(n)}
        assert want, "the expected set is empty: the rule names nothing of this bank"
        assert self.steps >= STEPS
        assert self.optimized == want, (sorted(self.optimized - want)[:5], sorted(want - self.optimized)[:5])
        frozen_moved = sorted(self.moved - want)
        assert not frozen_moved, f"frozen tensors moved: {frozen_moved[:5]}"
        still = sorted(n for n in want - self.moved if not unread(n))
        assert not still, f"trained tensors did not move: {still[:5]}"
        assert self.clipped, "gradient clipping never ran"
        for seen in self.clipped:
            assert seen == want, (sorted(want - seen)[:5], sorted(seen - want)[:5])


# -- offline methods ----------------------------------------------------------------------------------

OFFLINE = {
    "dpo-lora": (lambda: DPO(bank=bank(), learning_rate=1e-2), preference, lora("policy")),
    "dpo-full": (lambda: DPO(bank=bank("full"), learning_rate=1e-3), preference, whole_base),
    "kto-lora": (lambda: KTO(bank=bank(), learning_rate=1e-2, desirable_weight=1.5), unpaired, lora("policy")),
    "kto-full": (lambda: KTO(bank=bank("full"), learning_rate=1e-3, desirable_weight=1.5), unpaired, whole_base),
    "orpo-lora": (lambda: ORPO(bank=bank(), learning_rate=1e-2), preference, lora("policy")),
    "cpo-lora": (lambda: CPO(bank=bank(), learning_rate=1e-2), preference, lora("policy")),
    "simpo-full": (lambda: SimPO(bank=bank("full"), learning_rate=1e-3), preference, whole_base),
    "reward-lora": (lambda: RewardModeling(bank=bank(), learning_rate=1e-2), preference,
                    either(lora("reward"), heads("reward"))),
    "reward-full": (lambda: RewardModeling(bank=bank("full"), learning_rate=1e-3), preference,
                    either(whole_base, heads("reward"))),
    "sft-lora": (lambda: SFT(bank=bank(), learning_rate=1e-2), sft, lora("policy")),
    "sft-full": (lambda: SFT(bank=bank("full"), learning_rate=1e-3), sft, whole_base),
}


@pytest.mark.parametrize("case", list(OFFLINE))
def test_offline_methods_train_exactly_their_parameters(case, monkeypatch):
    make, data, expected = OFFLINE[case]
    run = Recorded(make(), data(), monkeypatch=monkeypatch)
    run.assert_trains_exactly(expected, unread=lambda n: case == "reward-full" and n.startswith("model.lm_head."))
    if case in ("dpo-full", "kto-full"):
        assert any(n.startswith("reference_model.") for n in run.all_names)  # the frozen copy exists (and held still)
    if case.split("-")[0] in ("orpo", "cpo", "simpo", "reward", "sft"):
        # Reference-free: no frozen copy of the base, no reference adapter kept.
        assert run.method.bank.reference_model is None and "reference" not in run.method.bank.adapters


def test_dpo_from_a_loaded_policy_keeps_its_frozen_starting_copy_still(tmp_path, monkeypatch):
    start = saved_random_adapter(tmp_path / "sft", "policy")
    method = DPO(bank=bank(adapters=[AdapterSpec("policy", path=start)]), learning_rate=1e-2)
    run = Recorded(method, preference(), monkeypatch=monkeypatch)
    assert any(".reference." in n for n in run.all_names)
    run.assert_trains_exactly(lora("policy"))


def test_dpo_from_a_peft_adapter_with_a_saved_module_trains_its_copy_of_the_module(tmp_path, monkeypatch):
    """An adapter saved with ``modules_to_save`` (TRL's SFT with new tokens trains the LM head that way) trains
    the policy's copy of the module, as peft and TRL's DPO do; the reference's copy and the original stay."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = tmp_path / "sft"
    get_peft_model(AutoModelForCausalLM.from_pretrained(TOY_BASE), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])).save_pretrained(start)
    method = DPO(bank=bank(adapters=[AdapterSpec("policy", path=str(start))]), learning_rate=1e-2)
    run = Recorded(method, preference(), monkeypatch=monkeypatch)
    assert {n for n in run.all_names if "lm_head.modules_to_save." in n} == {
        "model.base_model.model.lm_head.modules_to_save.policy.weight",
        "model.base_model.model.lm_head.modules_to_save.reference.weight"}
    run.assert_trains_exactly(either(lora("policy"), lambda n: n.endswith("lm_head.modules_to_save.policy.weight")))


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_tr_dpo_reference_moves_only_by_its_sync_rule(train_mode, monkeypatch):
    alpha = 0.25
    method = DPO(bank=bank(train_mode), learning_rate=1e-2 if train_mode == "lora" else 1e-3,
                 sync_ref_model=True, ref_model_mixup_alpha=alpha, ref_model_sync_steps=STEPS)
    run = Recorded(method, preference(), monkeypatch=monkeypatch)
    policy = lora("policy") if train_mode == "lora" else whole_base
    reference = lora("policy_reference") if train_mode == "lora" else (lambda n: n.startswith("reference_model."))
    # The reference is not trained: the optimizer and clipping hold the policy only.
    assert run.optimized == {n for n in run.all_names if policy(n)}
    assert all(seen == run.optimized for seen in run.clipped)
    params = dict(run.method.bank.named_parameters())
    synced = 0
    for name in run.all_names:
        if not reference(name):
            continue
        twin = (name.replace(".policy_reference.", ".policy.") if train_mode == "lora"
                else "model." + name.removeprefix("reference_model."))
        # It started as the starting policy and mixed once, at step STEPS: ref = α policy + (1-α) start.
        torch.testing.assert_close(params[name], alpha * params[twin] + (1 - alpha) * run.before[twin])
        synced += 1
    assert synced
    assert not (run.moved - run.optimized - {n for n in run.all_names if reference(n)})


# -- online methods -----------------------------------------------------------------------------------

SAMPLING = SamplingConfig(max_new_tokens=6)


def online(cls, *, adapters=(), train_mode="lora", **kwargs):
    kwargs.setdefault("update_epochs", 1)
    kwargs.setdefault("num_mini_batches", 2)
    kwargs.setdefault("num_samples_per_prompt", 2)
    kwargs.setdefault("max_grad_norm", 1.0)
    method = make_online(cls, adapters=adapters, train_mode=train_mode, max_new_tokens=6,
                         learning_rate=1e-2 if train_mode != "full" else 1e-3, **kwargs)
    method.bank_spec.lora.r, method.bank_spec.lora.alpha = 4, 8
    return method


def reward_adapter(tmp_path) -> tuple[list[AdapterSpec], list[RewardSpec]]:
    path = saved_random_adapter(tmp_path / "rm", "reward", head="score")
    return [AdapterSpec("reward", path=path, trainable=False, head="score")], [RewardSpec("adapter", adapter="reward")]


def test_ppo_trains_policy_value_adapter_and_value_head_only(tmp_path, monkeypatch):
    adapters, rewards = reward_adapter(tmp_path)
    sft_start = saved_random_adapter(tmp_path / "sft", "policy")
    method = online(PPO, adapters=[*adapters, AdapterSpec("policy", path=sft_start)], rewards=rewards)
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    assert any(".reference." in n for n in run.all_names) and any(".reward." in n for n in run.all_names)
    run.assert_trains_exactly(either(lora("policy", "value"), heads("value")))
    assert set(run.groups) == {"policy", "value", "value.head"}


def test_ppo_shared_critic_trains_the_value_head_on_the_policy(tmp_path, monkeypatch):
    adapters, rewards = reward_adapter(tmp_path)
    method = online(PPO, critic="shared", adapters=adapters, rewards=rewards)
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    run.assert_trains_exactly(either(lora("policy"), heads("policy")))


def test_ppo_shared_critic_from_a_loaded_sft_policy_trains_a_fresh_value_head(tmp_path, monkeypatch):
    """The usual start, an SFT adapter, carries no value head: the critic's head starts fresh (the frozen
    starting copy, the reference, has none)."""
    sft_start = saved_random_adapter(tmp_path / "sft", "policy")
    method = online(PPO, critic="shared", adapters=[AdapterSpec("policy", path=sft_start)])
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    assert any(".reference." in n for n in run.all_names)
    run.assert_trains_exactly(either(lora("policy"), heads("policy")))


def test_a_frozen_adapter_missing_its_head_is_refused(tmp_path):
    path = saved_random_adapter(tmp_path / "rm", "reward")  # saved without a head
    method = online(PPO, adapters=[AdapterSpec("reward", path=path, trainable=False, head="score")],
                    rewards=[RewardSpec("adapter", adapter="reward")])
    with pytest.raises(FileNotFoundError, match="needs a score head"):
        method.configure_model()


def test_ppo_full_mode_shared_critic_keeps_its_reference_copy_still(monkeypatch):
    method = online(PPO, critic="shared", train_mode="full")
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    assert any(n.startswith("reference_model.") for n in run.all_names)
    run.assert_trains_exactly(either(whole_base, heads("policy")))


@pytest.mark.parametrize("cls", [RLOO, GRPO, OnlineDPO, BestOfN], ids=lambda c: c.__name__)
def test_online_methods_train_the_policy_only_beside_a_frozen_reward_adapter(cls, tmp_path, monkeypatch):
    adapters, rewards = reward_adapter(tmp_path)
    method = online(cls, adapters=adapters, rewards=rewards)
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    run.assert_trains_exactly(lora("policy"))


@pytest.mark.parametrize("cls", [RLOO, GRPO], ids=lambda c: c.__name__)
def test_online_methods_in_full_mode_keep_the_reference_copy_still(cls, monkeypatch):
    method = online(cls, train_mode="full", **({"beta": 0.05} if cls is GRPO else {}))
    run = Recorded(method, prompts(), monkeypatch=monkeypatch)
    assert any(n.startswith("reference_model.") for n in run.all_names)
    run.assert_trains_exactly(whole_base)


# -- distillation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", ["separate", "base"])
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_gkd_trains_the_student_only(teacher, train_mode, monkeypatch):
    spec = bank(train_mode, teacher=TeacherSpec(model=TOY_TEACHER) if teacher == "separate" else None)
    method = GKD(bank=spec, lmbda=0.0, learning_rate=1e-2 if train_mode == "lora" else 1e-3, sampling=SAMPLING)
    run = Recorded(method, sft(), monkeypatch=monkeypatch)
    if teacher == "separate":
        assert any(n.startswith("teacher_model.") for n in run.all_names)
    elif train_mode == "full":
        assert any(n.startswith("reference_model.") for n in run.all_names)  # the base as loaded teaches
    run.assert_trains_exactly(lora("policy") if train_mode == "lora" else whole_base)


# -- quantized bases ----------------------------------------------------------------------------------


def test_qlora_trains_the_adapter_on_a_frozen_4bit_base(monkeypatch):
    method = DPO(bank=bank("qlora"), learning_rate=1e-2)
    run = Recorded(method, preference(), monkeypatch=monkeypatch)
    run.assert_trains_exactly(lora("policy"))


def test_gkd_with_a_4bit_teacher_trains_the_student_only(monkeypatch):
    """bitsandbytes repacks a 4-bit weight for CPU inference at its first eval forward (the teacher only ever
    runs in eval mode), so its stored bytes change: the teacher is checked by what it computes instead."""
    spec = bank(teacher=TeacherSpec(model=TOY_TEACHER, quantization="4bit"))
    method = GKD(bank=spec, lmbda=0.0, learning_rate=1e-2, sampling=SAMPLING)
    method.configure_model()
    ids = torch.arange(5, 17).view(2, 6)
    with torch.no_grad():
        teacher_before = method.bank.teacher_model(ids).logits
    run = Recorded(method, sft(), monkeypatch=monkeypatch)
    repacked = {n for n in run.moved if n.startswith("teacher_model.")}
    run.moved -= repacked
    run.assert_trains_exactly(lora("policy"))
    with torch.no_grad():
        torch.testing.assert_close(method.bank.teacher_model(ids).logits, teacher_before)


# -- weight decay ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dpo-full", "reward-lora"])
def test_weight_decay_spares_biases_and_norm_weights(case, monkeypatch):
    """As transformers' Trainer (and TRL): decay on matrices only, none on biases and norm gains (1-D)."""
    make = {"dpo-full": lambda: DPO(bank=bank("full"), learning_rate=1e-3, weight_decay=0.1),
            "reward-lora": lambda: RewardModeling(bank=bank(), learning_rate=1e-2, weight_decay=0.1)}[case]
    run = Recorded(make(), preference(), monkeypatch=monkeypatch)
    groups = run.method.trainer.optimizers[0].param_groups
    one_d = [p for g in groups for p in g["params"] if p.ndim < 2]
    assert one_d  # RMSNorm gains in full mode; the score head's bias with LoRA
    for group in groups:
        assert group["weight_decay"] == (0.0 if all(p.ndim < 2 for p in group["params"]) else 0.1), group["name"]
        assert len({p.ndim < 2 for p in group["params"]}) == 1, group["name"]  # no group mixes the two
    # Still one group per role (plus its no-decay part), and every trained tensor in exactly one of them.
    assert sum(len(g["params"]) for g in groups) == len(run.optimized)


# -- resume ----------------------------------------------------------------------------------------------


def test_a_resumed_run_restores_each_tensors_optimizer_state_to_the_same_tensor(tmp_path, monkeypatch):
    """PPO's groups (policy, value, value.head and their no-decay parts) come back in the same order, so
    each tensor's Adam moments land on that tensor, not on a same-shaped neighbour."""

    def ppo():
        return online(PPO, weight_decay=0.1)

    first = Recorded(ppo(), prompts(), monkeypatch=monkeypatch, gradient_clip_val=None,
                     default_root_dir=tmp_path)
    first.method.trainer.save_checkpoint(tmp_path / "last.ckpt")

    def state_by_name(method):
        optimizer = method.trainer.optimizers[0]
        names = {id(p): n for n, p in method.bank.named_parameters()}
        groups = [(g["name"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
        return groups, {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    groups, state = state_by_name(first.method)
    assert {g[0] for g in groups} == {"policy", "value", "value.head", "value.head.no_decay"}

    pl.seed_everything(0)
    method = ppo()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, max_steps=first.steps)
    trainer.fit(method, prompts(), ckpt_path=tmp_path / "last.ckpt")  # already at max_steps: restores, trains nothing
    resumed_groups, resumed_state = state_by_name(method)
    assert resumed_groups == groups
    assert set(resumed_state) == set(state) == {n for g in groups for n in g[2]}
    for name, values in state.items():
        for key, value in values.items():
            assert torch.equal(resumed_state[name][key], value), (name, key)


# -- adapter names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model", "mlp", "q_proj"])
def test_a_trainable_adapter_named_like_a_module_trains_only_itself(name, tmp_path, monkeypatch):
    """An adapter's name is matched where peft puts it (after ``lora_X``), not anywhere in the module path."""
    adapters, _ = reward_adapter(tmp_path)
    method = SFT(bank=bank(adapters=adapters), policy_adapter=name, learning_rate=1e-2)
    run = Recorded(method, sft(), monkeypatch=monkeypatch)
    run.assert_trains_exactly(lambda n: f".lora_A.{name}." in n or f".lora_B.{name}." in n)
