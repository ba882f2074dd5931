"""The Trainer's precision (``bf16-mixed``, ``bf16-true``) on the bank: the float32 parts stay float32.

Lightning's ``bf16-true`` casts the whole LightningModule and every float tensor of a batch to bf16;
``bf16-mixed`` runs linear layers under autocast. Neither may reach the scalar heads (scores, values),
the LoRA adapters (AdamW's steps would fall below bf16's rounding) or the precomputed reference
log-probs a batch carries."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.methods import DPO, RewardModeling
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.models.heads import ScalarHead

from tests.methods.test_real_setups import TRAIN, quiet_trainer
from tests.paths import TOY_BASE


def test_scalar_head_is_float32_under_bf16_autocast_and_with_bf16_weights():
    torch.manual_seed(0)
    head = ScalarHead(16, "score")
    hidden = torch.randn(2, 3, 16).bfloat16() * 8  # large scores: bf16 keeps 8 significant bits of them
    expected = head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(hidden)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=0, rtol=0)
    # DeepSpeed's bf16 mode casts the whole module, the head's weights included (its masters stay float32).
    head.bfloat16()
    assert head(hidden).dtype == torch.float32


def test_reward_model_trains_under_bf16_true_with_float32_adapter_and_head(tmp_path):
    pl.seed_everything(0)
    method = RewardModeling(learning_rate=1e-3, bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4)))
    trainer = quiet_trainer(tmp_path, max_steps=2, precision="bf16-true")
    trainer.fit(method, PreferenceDataModule(train=TRAIN, batch_size=4, max_length=64))
    dtypes = {name: p.dtype for name, p in method.bank.named_parameters()}
    assert dtypes["model.base_model.model.model.embed_tokens.weight"] == torch.bfloat16  # the base: what it is for
    trained = method.bank.trainable_names()
    assert any(n.startswith("heads.") for n in trained) and any("lora_A" in n for n in trained)
    assert all(dtypes[n] == torch.float32 for n in trained), {n: dtypes[n] for n in trained if dtypes[n] != torch.float32}
    assert torch.isfinite(trainer.callback_metrics["loss"])


class ReferenceSeen(DPO):
    """DPO that records the precomputed reference log-probs its training steps receive."""

    def training_step(self, batch, batch_idx):
        self.seen = batch["ref_chosen_logps"]
        return super().training_step(batch, batch_idx)


def test_precomputed_reference_logps_reach_the_step_in_float32_under_bf16_true(tmp_path):
    pl.seed_everything(0)
    method = ReferenceSeen(learning_rate=1e-3, precompute_ref_logps=True, bank=BankSpec(model=TOY_BASE, lora=LoraSpec(r=4)))
    quiet_trainer(tmp_path, max_steps=1, precision="bf16-true").fit(
        method, PreferenceDataModule(train=TRAIN, batch_size=4, max_length=64))
    precomputed = set(method._ref_cache["train"][:, 0].tolist())
    assert method.seen.dtype == torch.float32
    assert set(method.seen.tolist()) <= precomputed  # bit for bit (bf16 rounds -21.8 to -21.75)
