"""GRPO on the online seam: its advantages on a real rollout are ``group_advantages`` of the scores,
beta=0 skips the reference, padding is inert, equal-reward groups are counted (``frac_reward_zero_std``)
and never give NaN, rule-based rewards plug in by name, the shipped config fits through the CLI, and the
toy task's ground-truth score goes up."""


import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from lit_rlhf.losses import group_advantages, grpo_loss
from lit_rlhf.methods.grpo import GRPO
from lit_rlhf.models import BankSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig
from lit_rlhf.toy.rules import positive_check

from tests.methods.online_helpers import (
    first_batch, fit_shipped_config, loss_and_grads, make_online, padded, perturbed, prompts,
    train_and_measure, trainer,
)
from tests.paths import TOY_BASE

RULE_REWARD = RewardSpec("function", function="lit_rlhf.toy.rules:positive_check")


def make_grpo(**kwargs) -> GRPO:
    return make_online(GRPO, **kwargs)



@pytest.mark.parametrize("scale_rewards", [True, False, "batch"])
def test_advantages_on_a_real_rollout_are_group_advantages_of_the_scores(scale_rewards):
    pl.seed_everything(0)
    method = make_grpo(scale_rewards=scale_rewards, eps=1e-4)
    method.configure_model()
    scored = method.rollout_and_score(first_batch(method))
    advantages = method.compute_advantages(scored).advantages
    expected = group_advantages(scored.scores, 4, scale_rewards=scale_rewards, eps=1e-4).advantages
    torch.testing.assert_close(advantages, expected)
    assert advantages.abs().max() > 0
    assert scored.prompts[0:4] == [scored.prompts[0]] * 4 and scored.prompts[4] != scored.prompts[0]


def test_beta_zero_skips_the_reference_forward_and_beta_adds_the_k3_term():
    pl.seed_everything(0)
    method = perturbed(make_grpo(beta=0.0))
    method.reference_logprobs = lambda rollout: pytest.fail("beta=0 must not run the reference")
    scored = method.rollout_and_score(first_batch(method))
    assert scored.ref_logprobs is None
    data = method.compute_advantages(scored)
    rows = torch.arange(scored.scores.shape[0])
    method.bank.eval()
    loss, metrics = method.policy_loss(method.select(scored, data, rows))
    assert "objective/kl" not in metrics

    with_kl = perturbed(make_grpo(beta=0.1, epsilon_high=0.28, loss_type="bnpo"))
    scored = with_kl.rollout_and_score(first_batch(with_kl))
    assert scored.ref_logprobs is not None
    batch = with_kl.select(scored, with_kl.compute_advantages(scored), rows)
    with_kl.bank.eval()
    loss, metrics = with_kl.policy_loss(batch)
    with torch.no_grad():
        logprobs = with_kl.policy_forward(batch.rollout).logprobs
    expected = grpo_loss(logprobs, batch.old_logprobs, batch.targets.advantages, batch.rollout.response_mask,
                         epsilon=0.2, epsilon_high=0.28, beta=0.1, ref_logprobs=batch.ref_logprobs, loss_type="bnpo")
    torch.testing.assert_close(loss.detach(), expected.loss)
    assert metrics["objective/kl"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_masked_padding_contributes_nothing(loss_type):
    pl.seed_everything(0)
    method = perturbed(make_grpo(beta=0.1, loss_type=loss_type))
    scored = method.rollout_and_score(first_batch(method))
    assert (scored.rollout.response_mask == 0).any()  # some responses are shorter than others
    data = method.compute_advantages(scored)
    batch = method.select(scored, data, torch.arange(scored.scores.shape[0]))
    method.bank.eval()
    loss, grads = loss_and_grads(method, batch)
    loss_padded, grads_padded = loss_and_grads(method, padded(batch, 3))
    torch.testing.assert_close(loss_padded, loss)
    assert grads and grads.keys() == grads_padded.keys()
    for name in grads:
        torch.testing.assert_close(grads_padded[name], grads[name], atol=1e-6, rtol=1e-5)


class RecordingGRPO(GRPO):
    def compute_advantages(self, scored):
        self.seen_scores = scored.scores.clone()
        self.seen_advantages = super().compute_advantages(scored)
        return self.seen_advantages


def recording(rewards, **kwargs) -> RecordingGRPO:
    bank = BankSpec(model=TOY_BASE)
    return RecordingGRPO(bank=bank, rewards=rewards, sampling=SamplingConfig(max_new_tokens=8),
                         log_samples_every_n_rollouts=0, **kwargs)


def test_frac_reward_zero_std_counts_the_flat_groups():
    pl.seed_everything(0)
    method = recording([RewardSpec("function", function="tests.methods.online_helpers:flat_for_the_prompts")])
    fit = trainer(rollouts=1)
    fit.fit(method, datamodule=prompts(batch_size=8))
    grouped = method.seen_scores.view(-1, 4)
    zero_std = (grouped == grouped[:, :1]).all(dim=1)
    assert 0 < zero_std.sum() < zero_std.numel()  # the batch has "the ..." prompts (flat) and others
    assert float(fit.callback_metrics["frac_reward_zero_std"]) == pytest.approx(zero_std.float().mean().item())
    advantages = method.seen_advantages.advantages.view(-1, 4)
    assert (advantages[zero_std] == 0).all() and torch.isfinite(advantages).all()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_all_flat_groups_log_one_and_put_no_nan_anywhere(loss_type):
    pl.seed_everything(0)
    method = recording([RewardSpec("function", function="tests.methods.online_helpers:flat")], beta=0.04,
                       loss_type=loss_type)
    fit = trainer(rollouts=1)
    fit.fit(method, datamodule=prompts())
    assert float(fit.callback_metrics["frac_reward_zero_std"]) == 1.0
    assert float(fit.callback_metrics["reward_std"]) == 0.0
    assert (method.seen_advantages.advantages == 0).all()
    assert torch.isfinite(fit.callback_metrics["loss/policy"])
    assert "train/skipped_nonfinite" not in fit.callback_metrics
    assert all(torch.isfinite(p).all() for p in method.bank.trainable_parameters())


def test_the_rule_based_example_reward():
    completions = ["good great .", "good great bad .", "good it was .", "love it love it", "", "very nice fun"]
    assert positive_check(["p"] * 6, completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_rule_based_reward_by_name_trains_and_reports_flat_groups():
    pl.seed_everything(0)
    method = recording([RULE_REWARD], learning_rate=3e-3, num_samples_per_prompt=4)
    fit = trainer(rollouts=3)
    fit.fit(method, datamodule=prompts(batch_size=8))
    assert set(method.seen_scores.tolist()) <= {0.0, 1.0}
    grouped = method.seen_scores.view(-1, 4)
    expected = (grouped == grouped[:, :1]).all(dim=1).float().mean().item()
    assert float(fit.callback_metrics["frac_reward_zero_std"]) == pytest.approx(expected)


def test_a_linear_learning_rate_decays_over_the_optimizer_steps_the_run_takes():
    # max_steps counts optimizer steps, update_epochs x num_mini_batches = 2 of them per rollout, and the run stops
    # after the rollout that reaches it: max_steps=3 takes 2 rollouts, 4 steps, and the decay spans those 4.
    lrs = []

    class Seen(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    method = make_grpo(learning_rate=1e-3, lr_scheduler="linear", update_epochs=2, num_mini_batches=1,
                       num_samples_per_prompt=2, max_new_tokens=4)
    trainer(rollouts=10, max_steps=3, callbacks=[Seen()]).fit(method, datamodule=prompts(batch_size=2))
    assert lrs == pytest.approx([1e-3 * (1 - step / 4) for step in range(4)])


def test_needs_a_group_and_valid_options():
    with pytest.raises(ValueError, match="num_samples_per_prompt >= 2"):
        make_grpo(num_samples_per_prompt=1)
    with pytest.raises(ValueError, match="loss_type"):
        make_grpo(loss_type="sum")
    for kwargs, message in ((dict(loss_type="cispo"), "epsilon_high"),
                            (dict(importance_sampling_level="prompt"), "token, sequence"),
                            (dict(delta=1.1), "delta"),
                            (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
                            (dict(scale_rewards="rank"), "group, batch, none")):
        with pytest.raises(ValueError, match=message):
            make_grpo(**kwargs)


@pytest.mark.report_pngs  # the online methods' report: one PNG per metric group and the samples table
def test_cli_fit_with_the_shipped_config(tmp_path):
    events = fit_shipped_config("configs/grpo.yaml", tmp_path, "--trainer.max_steps=8", "--trainer.val_check_interval=2",
                                "--trainer.limit_val_batches=1")
    scalars = set(events.Tags()["scalars"])
    expected = {"val/score", "objective/kl", "objective/entropy", "objective/scores", "frac_reward_zero_std",
                "reward_std", "policy/clipfrac", "policy/approxkl", "loss/policy", "response_length",
                "rollout/count", "lr"}
    assert expected <= scalars, expected - scalars
    assert events.Scalars("rollout/count")[-1].value == 2  # max_steps 8 = 2 rollouts x 2 epochs x 2 mini-batches
    report = tmp_path / "lightning_logs" / "version_0" / "report"
    for name in ("loss", "rewards", "kl", "response_length", "learning_rate", "other"):
        with Image.open(report / f"{name}.png") as image:
            image.verify()  # a truncated or non-PNG file raises
    assert "## Samples (last logged rollout)\n\n| prompt | completion | score |" in (report / "summary.md").read_text()


def test_grpo_raises_the_ground_truth_score_on_held_out_prompts():
    """Six rollouts of 8 prompts x 4 samples move the sampled held-out score from about 0 to about 0.75
    (0.75-0.77 over seeds 0-4 with beta 0.04, about a second of training on one CPU thread); the test asserts a margin of 0.4."""
    pl.seed_everything(0)
    method = make_grpo(max_new_tokens=10, beta=0.04)
    before, after, kl, seconds = train_and_measure(method)
    print(f"GRPO held-out sampled score {before:.3f} -> {after:.3f}, k3 KL {kl:.3f} nats/token, {seconds:.1f} s")
    assert after - before >= 0.4
    assert 0.0 < kl < float("inf")


class FirstStepGradients(pl.Callback):
    """The trainable gradients at the first optimizer step, and the response-token count of each micro-batch."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.bank.named_parameters() if p.grad is not None}


def first_step_gradients(loss_type: str, accumulation: int, seed: int = 0):
    pl.seed_everything(seed)
    method = make_grpo(loss_type=loss_type, gradient_accumulation_steps=accumulation, update_epochs=1,
                       num_mini_batches=1, max_grad_norm=None)
    tokens = []
    policy_loss = method.policy_loss
    method.policy_loss = lambda batch: (tokens.append(int(batch.rollout.response_mask.sum())), policy_loss(batch))[1]
    grads = FirstStepGradients()
    trainer(rollouts=1, callbacks=[grads]).fit(method, datamodule=prompts(batch_size=4))
    return grads.grads, tokens


def _max_difference(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_dapo_normalises_by_the_whole_step_under_gradient_accumulation_bnpo_does_not():
    """dapo: one micro-batch or two give the same gradient (every token of the step weighs the same).
    bnpo divides each micro-batch by its own tokens, so with uneven micro-batches it differs."""
    # The first seed whose rollout splits into micro-batches of uneven token counts: else the test proves nothing.
    for seed in range(10):
        dapo_two, tokens = first_step_gradients("dapo", 2, seed)
        if len(tokens) == 2 and tokens[0] != tokens[1]:
            break
    assert tokens[0] != tokens[1], tokens
    dapo_one, _ = first_step_gradients("dapo", 1, seed)
    bnpo_one, _ = first_step_gradients("bnpo", 1, seed)
    bnpo_two, _ = first_step_gradients("bnpo", 2, seed)
    scale = max(v.abs().max().item() for v in dapo_one.values())
    assert _max_difference(dapo_one, bnpo_one) < 1e-6 * scale  # one micro-batch: the same loss
    assert _max_difference(dapo_two, dapo_one) < 1e-5 * scale
    assert _max_difference(bnpo_two, bnpo_one) > 1e-3 * scale


@pytest.mark.parametrize("options", [
    dict(loss_type="cispo", epsilon_high=5.0),
    dict(importance_sampling_level="sequence", delta=3.0),
    dict(loss_type="bnpo", entropy_coef=0.01, top_entropy_quantile=0.3),
    dict(loss_type="dapo", mask_truncated_completions=True),
])
def test_grpo_options_reach_the_loss(options):
    """Each option's policy_loss on a real rollout is grpo_loss with that option (the formulas are
    checked by hand in tests/losses); truncated responses leave the loss mask."""
    pl.seed_everything(0)
    method = perturbed(make_grpo(beta=0.05, max_new_tokens=8, **options))
    scored = method.rollout_and_score(first_batch(method))
    data = method.compute_advantages(scored)
    mask = scored.rollout.response_mask
    if options.get("mask_truncated_completions"):
        assert (~scored.rollout.ended).any() and scored.rollout.ended.any()
        expected_mask = mask * scored.rollout.ended.unsqueeze(1)
        torch.testing.assert_close(method.loss_mask(scored.rollout), expected_mask)
        mask = expected_mask
    rows = torch.arange(scored.scores.shape[0])
    method.bank.eval()
    batch = method.select(scored, data, rows, step_tokens=mask.sum().float())
    loss, _ = method.policy_loss(batch)
    with torch.no_grad():
        out = method.policy_forward(batch.rollout, with_entropy=True)
    grpo_options = {k: v for k, v in options.items() if k != "mask_truncated_completions"}
    expected = grpo_loss(out.logprobs, batch.old_logprobs, data.advantages, mask, beta=0.05,
                         ref_logprobs=batch.ref_logprobs, num_tokens=mask.sum().float(), entropy=out.entropy,
                         max_completion_length=8, **grpo_options)
    torch.testing.assert_close(loss.detach(), expected.loss)
