"""Validation metrics are what one pass over the validation rows computes by hand: the reference a
validation-only run reads, KTO's margin over the epoch, and every row counted once under DDP."""

import lightning.pytorch as pl
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule, UnpairedDataModule
from lit_rlhf.methods import DPO, KTO
from lit_rlhf.models import AdapterSpec, BankSpec, LoraSpec

from tests.methods.online_helpers import saved_random_adapter
from tests.paths import TOY_BASE, TOY_DATA


def validate(method, data, **kwargs) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         **kwargs)
    return trainer.validate(method, data, verbose=False)[0]


@pytest.mark.parametrize("cls", [DPO, KTO])
def test_validate_alone_reads_the_precomputed_reference_of_a_loaded_policy(cls, tmp_path):
    """``trainer.validate`` (no fit, so no ``on_fit_start``) with ``precompute_ref_logps``: before any step the
    policy is its reference, so every implicit reward is 0. Reading the base with adapters off instead (the
    reference a precomputing bank does not keep) gave DPO rewards -0.005 and 0.009."""
    spec = BankSpec(model=TOY_BASE, lora=LoraSpec(r=8, alpha=16),
                    adapters=[AdapterSpec("policy", path=saved_random_adapter(tmp_path / "sft", "policy"))])
    rows = ("preference" if cls is DPO else "unpaired")
    data_cls = PreferenceDataModule if cls is DPO else UnpairedDataModule
    data = data_cls(str(TOY_DATA / f"{rows}_val.jsonl"), val=str(TOY_DATA / f"{rows}_val.jsonl"), batch_size=8,
                    max_length=64)
    logged = validate(cls(bank=spec, precompute_ref_logps=True), data, limit_val_batches=2)
    assert logged["val/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logged["val/rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
