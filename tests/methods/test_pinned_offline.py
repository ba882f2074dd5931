"""Pinned per-step training losses of the offline methods: a refactor is checked by numbers.

Each case trains a fresh rank-4 LoRA on the toy base for three optimizer steps from fixed seeds
(the model's LoRA init, the data order) and compares the ``loss`` the method logged at every
step with the value this code logged when the pin was taken, as torchtune's recipe tests pin
``_get_expected_loss_values``. A change that is meant to change the numbers (a new default, a
different reduction) re-pins them in the same commit and says why; anything else that moves
them is a regression.

The tolerance is relative 1e-5: well above float32 reordering noise (a padding-free batch moves
these losses by ~1e-6 at most), well below what one optimizer step changes (1e-3 or more).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
from lit_rlhf.methods import CPO, DPO, KTO, ORPO, SFT, RewardModeling, SimPO
from lit_rlhf.models import BankSpec, LoraSpec

from tests.paths import TOY_BASE, TOY_DATA

STEPS = 3
PREFERENCE = str(TOY_DATA / "preference_val.jsonl")
SFT_DATA = str(TOY_DATA / "sft_val.jsonl")
UNPAIRED = str(TOY_DATA / "unpaired_val.jsonl")


class LossPerStep(pl.Callback):
    """The ``loss`` a method logged in each training step, as a Python float."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["loss"]))


def _bank() -> BankSpec:
    return BankSpec(model=TOY_BASE, lora=LoraSpec(r=4, alpha=8))


def _data(kind: str):
    if kind == "preference":
        return PreferenceDataModule(train=PREFERENCE, batch_size=8, max_length=64, seed=1)
    if kind == "sft":
        return SFTDataModule(train=SFT_DATA, batch_size=8, max_length=64, seed=1)
    return UnpairedDataModule(train=UNPAIRED, batch_size=8, max_length=64, seed=1)


#: name -> (method, data format, expected loss of each of the STEPS optimizer steps). A fresh LoRA is
#: the reference policy, so the first DPO, IPO and KTO losses are their values at a zero implicit
#: reward (log 2, 1, the weighted 1/2); the steps after it carry the pin.
CASES = {
    "sft": (lambda: SFT(bank=_bank(), learning_rate=1e-2), "sft",
        [2.653008460998535, 2.7158100605010986, 2.563776969909668]),
    "reward": (lambda: RewardModeling(bank=_bank(), learning_rate=1e-2, normalize_on=None), "preference",
        [1.119452714920044, 1.1479530334472656, 0.6539638042449951]),
    "dpo_sigmoid": (lambda: DPO(bank=_bank(), learning_rate=1e-2, beta=0.5), "preference",
        [0.6931471824645996, 0.7175774574279785, 0.6694639325141907]),
    "dpo_ipo": (lambda: DPO(bank=_bank(), learning_rate=1e-2, beta=0.5, loss_type="ipo"), "preference",
        [1.0, 1.0262731313705444, 0.9744376540184021]),
    "simpo": (lambda: SimPO(bank=_bank(), learning_rate=1e-2), "preference",
        [1.176941990852356, 1.6640897989273071, 1.3695003986358643]),
    "cpo": (lambda: CPO(bank=_bank(), learning_rate=1e-2), "preference",
        [3.201835870742798, 3.8599586486816406, 3.5040249824523926]),
    "orpo": (lambda: ORPO(bank=_bank(), learning_rate=1e-2), "preference",
        [2.7048230171203613, 2.9254226684570312, 2.7853951454162598]),
    "kto": (lambda: KTO(bank=_bank(), learning_rate=1e-2, desirable_weight=2.5), "unpaired",
        [0.59375, 0.7804747819900513, 0.6839277148246765]),
}


def logged_losses(name: str, tmp_path) -> list[float]:
    make_method, data_format, _ = CASES[name]
    pl.seed_everything(0)
    recorder = LossPerStep()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[recorder],
    )
    trainer.fit(make_method(), _data(data_format))
    return recorder.losses


@pytest.mark.parametrize("name", list(CASES))
def test_logged_loss_per_step_is_pinned(name, tmp_path):
    expected = CASES[name][2]
    losses = logged_losses(name, tmp_path)
    assert len(losses) == STEPS
    assert losses == pytest.approx(expected, rel=1e-5, abs=0)
