"""PPO on the bank: what one step touches, the critic options, log-probs, checkpoints, the CLI,
4-bit with one base copy, and the toy task's ground-truth score going up."""


import lightning.pytorch as pl
import pytest
import torch
from peft import PeftModel

from lit_rlhf.methods.ppo import PPO
from lit_rlhf.models import AdapterSpec, BankSpec, load_base
from lit_rlhf.rollout import RewardSpec, SamplingConfig

from tests.methods.online_helpers import (
    TOY_REWARD, assert_step_gradient_is_split_invariant, fit_shipped_config, make_online, perturbed, prompts,
    saved_random_adapter, train_and_measure, trainer,
)
from tests.paths import TOY_BASE


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory) -> str:
    """A saved (random, non-trivial) score adapter on the toy base: the reward stage's output stand-in."""
    return saved_random_adapter(tmp_path_factory.mktemp("reward") / "adapter", "reward", head="score")


def make_ppo(adapters=(), **kwargs) -> PPO:
    kwargs.setdefault("num_samples_per_prompt", 2)
    kwargs.setdefault("log_samples_every_n_rollouts", 1)
    return make_online(PPO, adapters=adapters, **kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"p:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"b:{n}": b.detach().clone() for n, b in module.named_buffers()})
    return state


def test_one_step_changes_only_policy_value_and_heads(reward_adapter):
    pl.seed_everything(0)
    method = make_ppo([AdapterSpec("policy"), AdapterSpec("value"), AdapterSpec("reward", path=reward_adapter)],
                      rewards=[RewardSpec("adapter", adapter="reward"), TOY_REWARD])
    method.configure_model()
    bank = method.bank
    assert bank.adapters["reward"].trainable is False  # a judge is frozen even if the config forgets to say so
    before = snapshot(method)

    # The reward adapter runs inside the rollout; the policy is the active adapter afterwards.
    batch = next(iter(prompts().prepare(method.tokenizer).train_dataloader()))
    with bank.role("policy"):
        scored = method.rollout_and_score(batch)
        assert bank.active == "policy"
    assert set(scored.per_source) == {"reward_0", "reward_1"}  # same-named sources get their index
    assert scored.rollout.response_ids.shape[0] == 2 * len(batch["prompts"])  # k = 2 samples per prompt, consecutive
    assert scored.prompts[0] == scored.prompts[1] == batch["prompts"][0]

    trainer(rollouts=1).fit(method, datamodule=prompts())
    assert method.global_step == 4  # update_epochs x num_mini_batches optimizer steps for one rollout
    assert bank.active == "policy"

    changed = {"policy": False, "value": False, "heads.value": False}
    for key, old in before.items():
        new = snapshot_value(method, key)
        name = key[2:]
        trained = ("lora_" in name and (".policy." in name or ".value." in name)) or name.startswith("bank.heads.value.")
        if trained:
            for group in changed:
                if f".{group}." in f".{name}.":
                    changed[group] |= not torch.equal(old, new)
        else:  # the base, the reward adapter and its score head: bit-identical
            assert torch.equal(old, new), f"{name} changed but is not trainable"
    assert all(changed.values()), changed
    trainable = {id(p) for p in bank.trainable_parameters()}
    optimized = {id(p) for group in method.optimizers().param_groups for p in group["params"]}
    assert optimized == trainable
    assert not any("reward" in n for n in bank.trainable_names())


def snapshot_value(module, key):
    kind, name = key[:2], key[2:]
    source = dict(module.named_parameters()) if kind == "p:" else dict(module.named_buffers())
    return source[name].detach()


class CountingPPO(PPO):
    """PPO recording its manual-optimization calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def manual_backward(self, loss, *args, **kwargs):
        self.calls.append("backward")
        super().manual_backward(loss, *args, **kwargs)

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.calls.append(f"clip {gradient_clip_val} {gradient_clip_algorithm}")
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_accumulation_and_clipping_under_manual_optimization():
    pl.seed_everything(0)
    bank = BankSpec(model=TOY_BASE)
    method = CountingPPO(bank=bank, rewards=[TOY_REWARD], sampling=SamplingConfig(max_new_tokens=6), update_epochs=2,
                         num_mini_batches=2, gradient_accumulation_steps=2, max_grad_norm=0.5,
                         num_samples_per_prompt=2, warmup_steps=100, learning_rate=1e-3)
    trainer(rollouts=1).fit(method, datamodule=prompts())
    # 2 epochs x 2 mini-batches = 4 optimizer steps, each after 2 backward passes and one clip.
    assert method.global_step == 4
    assert method.calls == ["backward", "backward", "clip 0.5 norm"] * 4
    # The scheduler is stepped by hand once per optimizer step: warmup factor (4 + 1) / 100.
    assert method.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 5 / 100)


def test_micro_batches_of_unequal_lengths_give_the_gradient_of_the_whole_step():
    """The policy and value losses are token means over the optimizer step (``MiniBatch.step_tokens``):
    split into micro-batches holding different token counts (or across DDP ranks), the step's gradient
    is that of one micro-batch with every row. Per-micro-batch means weighted by rows would not be."""
    pl.seed_everything(0)
    assert_step_gradient_is_split_invariant(perturbed(make_ppo(max_new_tokens=8)))


def test_behaviour_logprobs_equal_the_sampler_distribution():
    """The recomputed log-probs (left padding, positions, temperature) match what generate sampled from."""
    method = make_ppo(sampling=SamplingConfig(max_new_tokens=6, temperature=0.7))
    method.configure_model()
    bank, tok = method.bank.eval(), method.tokenizer
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.normal_(0, 0.05)
    enc = tok(["the book was", "i think the park is", "my review of the coffee :"], return_tensors="pt",
              padding=True, padding_side="left")
    torch.manual_seed(0)
    with bank.role("policy"), torch.no_grad():
        out = bank.model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  output_scores=True, return_dict_in_generate=True, use_cache=True)
    from lit_rlhf.rollout import truncate_at_stop

    rollout = truncate_at_stop(enc["input_ids"], enc["attention_mask"], out.sequences[:, enc["input_ids"].shape[1]:],
                               [tok.eos_token_id], tok.pad_token_id)
    with torch.no_grad():
        ours = method.policy_forward(rollout).logprobs
    # generate's scores are the logits after temperature warping: their log-softmax is the sampler's distribution.
    sampler = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(ours[mask], sampler[mask], atol=1e-4, rtol=1e-4)


def test_shared_critic_one_forward_and_the_policy_still_exports_as_a_peft_lm_adapter(tmp_path):
    pl.seed_everything(0)
    method = make_ppo(critic="shared")
    trainer(rollouts=1).fit(method, datamodule=prompts())
    bank = method.bank
    assert bank.adapters["policy"].head == "value" and "value" not in bank.adapters
    assert bank.heads["policy"].linear.weight.requires_grad
    path = method.export(tmp_path / "policy")
    assert (path / "head.safetensors").exists()
    lm = PeftModel.from_pretrained(load_base(BankSpec(model=TOY_BASE)), str(path))  # loads as a plain LM adapter
    assert lm(torch.tensor([[2, 58, 44]])).logits.shape[-1] == bank.model.config.vocab_size


def test_reward_adapter_without_a_path_is_a_clear_error():
    method = make_ppo(rewards=[RewardSpec("adapter", adapter="reward")])
    with pytest.raises(ValueError, match="declare it with the path"):
        method.configure_model()


# The resumed Trainer deliberately lacks the checkpoint callback: only the checkpoint's own state may matter.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_adaptive_kl_controller_round_trips_through_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    method = make_ppo(adaptive_kl=True, kl_coef=0.2, kl_target=0.5, kl_horizon=50, update_epochs=1, num_mini_batches=1)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(rollouts=1, callbacks=[checkpoints], enable_checkpointing=True).fit(method, datamodule=prompts())
    assert method.kl_controller.value != 0.2
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["kl_controller"]["value"] == pytest.approx(method.kl_controller.value)
    assert saved["lit_rlhf_online"]["rollout_count"] == 1
    assert not any(".base_layer." in k or "embed_tokens" in k for k in saved["state_dict"])  # trainable state only

    class Seen(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.value, self.rollouts = module.kl_controller.value, module.rollout_count

    seen = Seen()
    resumed = make_ppo(adaptive_kl=True, kl_coef=0.2, kl_target=0.5, kl_horizon=50, update_epochs=1, num_mini_batches=1)
    trainer(rollouts=1, max_epochs=2, callbacks=[seen]).fit(resumed, datamodule=prompts(), ckpt_path=tmp_path / "last.ckpt")
    assert seen.value == pytest.approx(saved["kl_controller"]["value"])
    assert seen.rollouts == 1
    assert resumed.rollout_count == 2
    assert resumed.kl_controller.value != pytest.approx(seen.value)  # and it keeps adapting from there


def test_cli_fit_with_the_shipped_config(tmp_path):
    events = fit_shipped_config("configs/ppo.yaml", tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1")
    scalars = set(events.Tags()["scalars"])
    expected = {"val/score", "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "policy/clipfrac", "policy/approxkl", "policy/entropy",
                "value/clipfrac", "value/vpred", "value/error", "value/explained_variance", "response_length",
                "rollout/count", "lr"}
    assert expected <= scalars, expected - scalars
    assert "samples/text_summary" in events.Tags()["tensors"]  # the table of sample completions


def base_tensors(module: torch.nn.Module):
    """(name, tensor) of every base parameter and buffer, every reference to it (no de-duplication)."""
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        if "lora_" not in name and ".heads." not in f".{name}":
            yield name, t


def test_qlora_ppo_runs_with_one_copy_of_the_base():
    pl.seed_everything(0)
    method = make_ppo(train_mode="qlora")
    trainer(rollouts=2).fit(method, datamodule=prompts())
    assert method.global_step == 8
    # Generation runs in eval mode; bitsandbytes' CPU inference repacking would make later training
    # forwards drop the gradient through the 4-bit layers (gemv_4bit has no autograd): it must not happen.
    states = [m.weight.quant_state for m in method.modules() if type(m).__name__ == "Linear4bit"]
    assert states and not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    tensors = list(base_tensors(method))
    by_storage: dict[int, list[str]] = {}
    for name, t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    assert all(len(names) == 1 for names in by_storage.values()), [n for n in by_storage.values() if len(n) > 1]
    assert any(t.dtype == torch.uint8 for _, t in tensors), "the base should be 4-bit (packed uint8) weights"
    one_model = load_base(BankSpec(model=TOY_BASE, train_mode="qlora"))
    one_model_bytes = sum(t.numel() * t.element_size() for t in list(one_model.parameters()) + list(one_model.buffers()))
    assert sum(t.numel() * t.element_size() for _, t in tensors) == one_model_bytes


def test_ppo_raises_the_ground_truth_score_on_held_out_prompts():
    """Six rollouts of 8 prompts x 2 samples (a few seconds on 2 idle CPU cores) move the sampled held-out score
    from about 0 to about 0.7; the test asserts a margin of 0.4."""
    pl.seed_everything(0)
    method = make_ppo(max_new_tokens=10)
    before, after, kl, seconds = train_and_measure(method)
    print(f"held-out sampled score {before:.3f} -> {after:.3f}, KL to reference {kl:.3f} nats/response, {seconds:.1f} s")
    assert after - before >= 0.4
    assert 0.0 < kl < float("inf")  # reported, not bounded: 2-11 nats per response over seeds 0-4
