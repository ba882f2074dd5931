"""Llama 4's text decoder (``Llama4ForCausalLM``): its router is an ``nn.Linear`` returning ``(scores, logits)``.
peft's ``all-linear`` (0.21, as TRL 1.16 uses it) wraps it in a LoRA layer that failed in the first forward
(``'tuple' object has no attribute 'dtype'``); the bank's ``all-linear`` leaves it out, and a LoRA named on it is
refused before any forward. transformers gives Llama 4 no load-balancing loss: none is added, none may be asked for."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lit_rlhf.data import SFTDataModule
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods import SFT
from lit_rlhf.models import BankSpec, LoraSpec
from lit_rlhf.toy.families import build_tiny
from tests.paths import TOY_DATA


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> str:
    return str(build_tiny("llama4", tmp_path_factory.mktemp("llama4") / "llama4"))


def sft(model: str, **lora) -> SFT:
    # target_parameters=[]: the experts stay frozen (peft does not remap Llama 4's), without the bank's warning.
    return SFT(bank=BankSpec(model=model, lora=LoraSpec(r=4, alpha=8, target_parameters=[], **lora)),
               learning_rate=1e-2)


def test_all_linear_lora_trains_without_the_router(llama4, tmp_path):
    method = sft(llama4)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
               callbacks=[Record()]).fit(method, SFTDataModule(str(TOY_DATA / "sft_train.jsonl"), batch_size=4,
                                                               max_length=48))
    adapted = {n.split(".lora_")[0].split(".layers.")[-1].split(".", 1)[-1] for n in method.bank.trainable_names()}
    assert adapted == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"feed_forward.shared_expert.{p}_proj"
                                                                for p in ("gate", "up", "down")}
    assert method._router_aux_weight == 0.0  # transformers' Llama 4 has no load-balancing loss
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_a_lora_on_the_router_or_a_router_aux_loss_is_refused_before_any_forward(llama4):
    method = sft(llama4, target_modules=["q_proj", "router"])
    with pytest.raises(InvalidArgument, match=r"'.*layers\.0\.feed_forward\.router'.*Llama4Router layers return more"):
        method.configure_model()
    method = SFT(bank=BankSpec(model=llama4, lora=LoraSpec(r=4, alpha=8, target_parameters=[])),
                 router_aux_loss_coef=0.01)
    with pytest.raises(InvalidArgument, match="Llama4TextConfig is no mixture of experts with a router load-balancing"):
        method.configure_model()
