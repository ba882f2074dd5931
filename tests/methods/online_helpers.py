"""What the online-method tests (PPO, RLOO, GRPO, best-of-n) share: a small method on the toy base,
the prompt data, a short Trainer, a policy moved off the reference, and a batch padded with garbage."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lit_rlhf import toy
from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, LoraSpec
from lit_rlhf.rollout import RewardSpec, SamplingConfig

from tests.paths import TOY_BASE, TOY_DATA

TOY_REWARD = RewardSpec("function", function="lit_rlhf.toy:reward")


def flat_for_the_prompts(prompts, completions):
    """1.0 for every completion of a prompt starting with "the", the toy score otherwise."""
    return [1.0 if p.startswith("the ") else toy.score(c) for p, c in zip(prompts, completions)]


def flat(prompts, completions):
    return [0.25] * len(completions)


def make_online(cls, *, rewards=(TOY_REWARD,), max_new_tokens=8, adapters=(), train_mode="lora", **kwargs):
    """``cls`` on the toy base with small LoRA adapters and the options the tests share."""
    defaults = dict(learning_rate=3e-3, update_epochs=2, num_mini_batches=2, num_samples_per_prompt=4,
                    log_samples_every_n_rollouts=0, sampling=SamplingConfig(max_new_tokens=max_new_tokens))
    defaults.update(kwargs)
    bank = BankSpec(model=TOY_BASE, train_mode=train_mode, adapters=list(adapters))
    bank.lora.r, bank.lora.alpha = 8, 16
    return cls(bank=bank, rewards=list(rewards), **defaults)


def prompts(batch_size=4) -> PromptDataModule:
    return PromptDataModule(train=f"{TOY_DATA}/prompt_train.jsonl", val=f"{TOY_DATA}/prompt_val.jsonl",
                            batch_size=batch_size, max_length=32)


def trainer(rollouts: int, root=None, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=rollouts, limit_val_batches=0,
                   num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root)
    options.update(kwargs)
    return pl.Trainer(**options)


def perturbed(method):
    """Configure the bank and move the policy's LoRA off zero, so the policy differs from the reference."""
    method.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in method.bank.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.normal_(0, 0.05)
    return method


def lora_off_zero(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Draw every LoRA B of ``module`` from N(0, scale^2) (one seeded generator, parameter order), so that a
    fresh adapter stops being the base and "which adapter ran" shows in what it computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def first_batch(method, batch_size=4) -> dict:
    return next(iter(prompts(batch_size).prepare(method.tokenizer).train_dataloader()))


def held_out_sampled_score(method, adapter: str | None = "policy", *, seeds: int = 8, max_new_tokens: int = 10) -> float:
    """Mean ground-truth score of sampled completions of the held-out prompts, over ``seeds`` samplings."""
    from lit_rlhf.toy.evaluate import mean_score

    _, held_out = toy.split_prompts()
    scores = [mean_score(method.bank, method.tokenizer, held_out, adapter=adapter, do_sample=True, seed=s,
                         max_new_tokens=max_new_tokens) for s in range(seeds)]
    return sum(scores) / len(scores)


def train_and_measure(method, *, rollouts: int = 6, batch_size: int = 8) -> tuple[float, float, float, float]:
    """``(score before, score after, last objective/kl, training seconds)`` of a short fit on the toy prompts."""
    import time

    method.configure_model()
    before = held_out_sampled_score(method)
    fit = trainer(rollouts=rollouts)
    start = time.perf_counter()
    fit.fit(method, datamodule=prompts(batch_size=batch_size))
    seconds = time.perf_counter() - start
    return before, held_out_sampled_score(method), float(fit.callback_metrics["objective/kl"]), seconds


def saved_random_adapter(path, name: str, *, head: str | None = None) -> str:
    """Save a LoRA adapter (and head) of the toy base moved off zero: a trained stage's output stand-in."""
    torch.manual_seed(0)
    bank = AdapterBank(BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16)), require=[AdapterSpec(name, head=head)])
    with torch.no_grad():
        for param_name, p in bank.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.1)
    bank.save_adapter(name, path)
    return str(path)


def assert_step_gradient_is_split_invariant(method) -> None:
    """The step's gradient with all rows in one micro-batch equals that of two micro-batches holding
    different token counts (token means over ``MiniBatch.step_tokens``, the whole step's tokens)."""
    scored = method.rollout_and_score(first_batch(method))
    data = method.compute_advantages(scored)
    mask = scored.rollout.response_mask
    rows = torch.arange(mask.shape[0])
    halves = [rows[:1], rows[1:]]  # one row, then the rest: different token counts
    assert mask[halves[0]].sum() != mask[halves[1]].sum()  # else the split proves nothing
    params = list(method.bank.trainable_parameters())

    def step_gradient(micros):
        for p in params:
            p.grad = None
        for micro in micros:
            batch = method.select(scored, data, micro, step_rows=rows.numel(), step_tokens=mask.sum().float())
            loss, _ = method.policy_loss(batch)
            (loss * method.accumulation_weight(batch)).backward()
        return [p.grad.clone() for p in params]

    method.bank.eval()
    for whole, split in zip(step_gradient([rows]), step_gradient(halves)):
        torch.testing.assert_close(split, whole)


def greedy_and_sampled_scores(method) -> tuple[float, float, float, float]:
    """Held-out ground-truth scores ``(greedy reference, greedy policy, sampled reference, sampled policy)``
    (sampled: each prompt four times)."""
    from lit_rlhf.toy.evaluate import mean_score

    _, held_out = toy.split_prompts()
    bank, tokenizer = method.bank, method.tokenizer
    return (mean_score(bank, tokenizer, held_out, adapter=None), mean_score(bank, tokenizer, held_out, adapter="policy"),
            mean_score(bank, tokenizer, held_out * 4, adapter=None, do_sample=True),
            mean_score(bank, tokenizer, held_out * 4, adapter="policy", do_sample=True))


def padded(batch, extra: int):
    """The same rows with ``extra`` more response columns and garbage in every padded position of the
    ids and the old and reference log-probs (a reference that is ``None`` stays ``None``)."""
    rollout = batch.rollout
    rows = rollout.response_ids.shape[0]
    response_ids = torch.cat([rollout.response_ids, torch.randint(5, 50, (rows, extra))], dim=1)
    mask = torch.cat([rollout.response_mask, torch.zeros(rows, extra, dtype=torch.long)], dim=1)
    response_ids = torch.where(mask.bool(), response_ids, torch.randint(5, 50, response_ids.shape))

    def junk(t):
        if t is None:
            return None
        t = torch.cat([t, torch.zeros(rows, extra)], dim=1)
        return torch.where(mask.bool(), t, torch.empty_like(t).uniform_(-6.0, 3.0))

    return batch._replace(rollout=rollout._replace(response_ids=response_ids, response_mask=mask),
                          old_logprobs=junk(batch.old_logprobs), ref_logprobs=junk(batch.ref_logprobs))


def loss_and_grads(method, batch):
    """The policy loss of ``batch`` and the gradient of every parameter it reaches."""
    method.bank.zero_grad(set_to_none=True)
    loss, _ = method.policy_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.bank.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def fit_shipped_config(config: str, root, *overrides: str):
    """``lit-rlhf fit --config <config>`` into ``root`` with ``overrides``; checks the run exported its
    adapter and kept ``last.ckpt``, and returns its TensorBoard events (loaded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_rlhf.cli import main as cli_main

    cli_main(["fit", "--config", config, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
              *overrides])
    run = root / "lightning_logs" / "version_0"
    assert (run / "export" / "adapter" / "adapter_config.json").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    events = EventAccumulator(str(run))
    events.Reload()
    return events
