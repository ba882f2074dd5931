"""Distillation: GKD (on-policy), supervised KD and SeqKD, one method with two knobs.

Generalized Knowledge Distillation, Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv 2306.13649 (Algorithm 1). Each training
batch takes its completions from one source:

- with probability ``lmbda``: the student itself (on-policy), sampled through the rollout
  engine from the student adapter given the batch's prompts;
- otherwise, with ``seq_kd``: the teacher's samples for the same prompts (sequence-level KD,
  Kim & Rush 2016, arXiv 1606.07947);
- otherwise: the dataset's completions (supervised KD).

The loss is the generalised Jensen-Shannon divergence ``lit_rlhf.losses.generalized_jsd_loss``
(``beta``: 0 forward KL, 1 reverse KL, between: JSD(β)) between the teacher's and the student's
next-token distributions at ``temperature``, averaged over the completion tokens. So

    lmbda = 0, seq_kd = false   supervised KD              (configs/kd.yaml)
    lmbda = 0, seq_kd = true    SeqKD                      (configs/seqkd.yaml)
    lmbda = 1                   pure on-policy GKD
    0 < lmbda < 1               the paper's mixture        (configs/gkd.yaml)

The teacher is a role of the bank (``bank.teacher()``; the engine samples it with
``teacher=True``): the separate frozen model of ``BankSpec.teacher`` (its own dtype, optionally
4/8-bit), or, when that is ``None``, the base without adapters (distilling the base back into an
adapter). The bank checks that teacher and
student share a tokenizer when it is built, before any step.

Optimization is AUTOMATIC, unlike the online methods that also generate inside the step: GKD
makes exactly one optimizer step per batch (no update epochs over a rollout), so generating under
``no_grad`` inside ``training_step`` and returning a normal loss is all it needs, and it keeps
the Trainer's ``gradient_clip_val``, ``accumulate_grad_batches``, precision plugins and LR
scheduler stepping working unchanged (manual optimization would have to re-implement them).

Data: an ``SFTDataModule`` of prompt + completion rows (``completion_only_loss: true``); the
prompts for generation are the tokens before each row's completion, left-padded here. Of a multi-turn
``messages`` row only the last assistant turn is distilled (SFT trains every assistant turn): the
earlier turns are context, as they are when the last turn is generated. Packed
batches work for supervised KD only (generation needs unpacked prompts). A
``PromptDataModule`` works when every batch is generated (``lmbda: 1`` or ``seq_kd: true``).

Metrics: ``loss``; ``on_policy`` (the fraction of training batches so far that were
on-policy); ``completion_length``; ``val/loss`` (the same divergence on the validation set's
dataset completions) and ``val/kl_teacher`` (forward KL(teacher ‖ student) at temperature 1,
averaged over every completion token of the validation set), both token-weighted over the epoch.
"""

from __future__ import annotations

import random
from typing import Literal, NamedTuple

import torch

from lit_rlhf.data.collate import pad, pad_token_id_of
from lit_rlhf.distributed import global_mean_loss, global_means
from lit_rlhf.losses import generalized_jsd_loss
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.offline import check_packed_batches
from lit_rlhf.models import eval_mode
from lit_rlhf.rollout import Rollout, SamplingConfig, build_engine

CompletionSource = Literal["dataset", "student", "teacher"]


class DistillBatch(NamedTuple):
    """Prompt + completion rows that student and teacher both read.

    Attributes:
        input_ids: ``(batch, seq)`` long.
        attention_mask: ``(batch, seq)`` long, or ``None`` for a packed batch.
        position_ids: ``(batch, seq)`` long, or ``None`` (positions 0..seq-1).
        completion_mask: ``(batch, seq)``, 1 on the completion TOKENS the loss is taken over
            (the logits at position ``t - 1`` predict token ``t``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    completion_mask: torch.Tensor


def last_turn_mask(batch: dict) -> torch.Tensor:
    """An SFT batch's loss mask without a ``messages`` row's earlier assistant turns: the completion alone.
    Distillation reads the last turn only: on-policy and SeqKD rows regenerate it, so supervised KD
    distils the same tokens."""
    if "earlier_turns_mask" in batch:
        return batch["completion_mask"] * (1 - batch["earlier_turns_mask"])
    return batch["completion_mask"]


def dataset_batch(batch: dict) -> DistillBatch:
    """The dataset's completions of an SFT batch (padded or packed)."""
    return DistillBatch(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                        last_turn_mask(batch))


def rollout_batch(rollout: Rollout) -> DistillBatch:
    """Generated completions: left-padded prompt, response, right padding; loss on the response tokens."""
    completion_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    return DistillBatch(rollout.input_ids, rollout.attention_mask, rollout.position_ids, completion_mask)


def dataset_prompts(batch: dict, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of a batch, for generation. ``(batch, prompt_len)`` ids and mask.

    A prompt batch (``PromptCollator``) already has them; in a right-padded SFT batch a row's
    prompt is its tokens before the first completion token.
    """
    if "prompt_input_ids" in batch:
        return batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if batch.get("attention_mask") is None:
        raise ValueError(
            "GKD cannot generate for a packed batch (on-policy lmbda > 0 or seq_kd): set packing: false in the data"
        )
    prompts = []
    for ids, attention, completion in zip(
        batch["input_ids"].tolist(), batch["attention_mask"].tolist(), last_turn_mask(batch).tolist()
    ):
        start = completion.index(1) if 1 in completion else sum(attention)
        if start == 0:
            raise ValueError(
                "GKD generates completions for the dataset's prompts (lmbda > 0 or seq_kd), but a row's "
                "completion_mask starts at its first token, so its prompt is unknown: use prompt + completion "
                "(or messages) rows with completion_only_loss: true"
            )
        prompts.append(ids[:start])
    device = batch["input_ids"].device
    return (pad(prompts, pad_token_id, left=True).to(device),
            pad([[1] * len(p) for p in prompts], 0, left=True).to(device))


class GKD(BankMethod):
    """Generalized knowledge distillation of the ``policy`` adapter (or the full base) from a teacher.

    Args:
        lmbda: probability that a training batch uses student-generated completions
            (on-policy); 0 is supervised KD / SeqKD, 1 pure on-policy GKD.
        beta: interpolation of the generalised JSD: 0 forward KL(teacher ‖ student), 1 reverse
            KL(student ‖ teacher), 0.5 the Jensen-Shannon divergence.
        temperature: softmax temperature of both distributions in the loss (sampling has its own,
            ``sampling.temperature``; TRL's GKD ``temperature`` is the sampling one, its loss at 1).
        seq_kd: replace the dataset's completions by the teacher's samples (SeqKD) in the batches
            that are not on-policy.
        sampling: how student and teacher completions are sampled (``max_new_tokens``,
            ``temperature``, ``top_k``, ``top_p``).
        engine: the rollout engine's registered name (``auto``: ``hf_static`` on CUDA; ``hf``, ``hf_static``, ...).
        chunk_size: token rows of the vocabulary upcast to float32 at once in the loss; ``None``
            sizes chunks to about 64 MiB of float32.
        **kwargs: optimizer, bank and ``policy_adapter`` (the student) arguments of ``BankMethod``; the
            teacher is ``bank.teacher``.
    """

    def __init__(
        self,
        *,
        lmbda: float = 0.5,
        beta: float = 0.5,
        temperature: float = 1.0,
        seq_kd: bool = False,
        sampling: SamplingConfig | None = None,
        engine: str = "auto",
        chunk_size: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda is a probability, in [0, 1]; got {lmbda}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL); got {beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lmbda = lmbda
        self.beta = beta
        self.temperature = temperature
        self.seq_kd = seq_kd
        self.sampling = sampling or SamplingConfig()
        self.store_plain_hparams(sampling=self.sampling)
        self.engine = build_engine(engine)
        self.chunk_size = chunk_size
        self.distill_batches = 0
        self.on_policy_batches = 0

    def needs_reference(self) -> bool:
        # Without a separate teacher the teacher is the base as loaded: in full mode, a frozen copy of it.
        return self.bank_spec.teacher is None and self.bank_spec.train_mode == "full"

    @property
    def generates(self) -> bool:
        """Whether training ever samples completions (on-policy or SeqKD)."""
        return self.lmbda > 0 or self.seq_kd

    def generates_during_training(self) -> bool:
        return self.generates

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.generates and getattr(datamodule, "packing", False):
            raise ValueError(
                "GKD with lmbda > 0 or seq_kd generates completions for the dataset's prompts, which a packed "
                "batch does not keep apart: set packing: false in the SFTDataModule"
            )
        if getattr(datamodule, "format", None) == "prompt" and not (self.lmbda == 1.0 or self.seq_kd):
            raise ValueError(
                f"GKD reads prompts only (a {type(datamodule).__name__}), so every batch must be generated: set "
                "lmbda: 1 or seq_kd: true, or train on prompt + completion rows (SFTDataModule)"
            )

    # -- where a batch's completions come from ----------------------------------------------------

    def choose_source(self) -> CompletionSource:
        """Student with probability ``lmbda``, else teacher (``seq_kd``) or dataset.

        Drawn from Python's ``random``: seeded alike on every rank by ``seed_everything`` and
        untouched by generation, so ranks agree, and saved with checkpoints (``rng_states``).
        """
        if self.lmbda > 0 and random.random() < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "dataset"

    @torch.no_grad()
    def generate(self, batch: dict, source: CompletionSource, sampling: SamplingConfig) -> Rollout:
        """Complete the batch's prompts with the student adapter or the teacher, in eval mode (no
        dropout; the KV cache stays on under gradient checkpointing)."""
        prompt_ids, prompt_mask = dataset_prompts(batch, pad_token_id_of(self.tokenizer))
        with eval_mode(self.bank):
            if source == "student":
                return self.engine.generate(self.bank, self.policy_adapter, prompt_ids, prompt_mask, sampling)
            return self.engine.generate(self.bank, None, prompt_ids, prompt_mask, sampling, teacher=True)

    def training_sequences(self, batch: dict) -> tuple[DistillBatch, CompletionSource]:
        """This step's rows and where their completions came from."""
        source = self.choose_source()
        if source == "dataset":
            if "input_ids" not in batch:
                raise ValueError("this batch has prompts only, no completions: set lmbda: 1 or seq_kd: true")
            return dataset_batch(batch), source
        return rollout_batch(self.generate(batch, source, self.sampling.resolved(self.tokenizer, self.bank.model))), source

    # -- the loss -------------------------------------------------------------------------------

    def aligned_logits(self, rows: DistillBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student logits (with gradient), teacher logits (without) and the loss mask, aligned so
        that position ``t`` predicts token ``t + 1``. ``(batch, seq - 1, vocab)`` twice and ``(batch, seq - 1)``."""
        args = (rows.input_ids, rows.attention_mask)
        if rows.attention_mask is None:
            check_packed_batches(self, {"student": lambda: self.bank.role(self.policy_adapter),
                                        "teacher": self.bank.teacher})
        with self.bank.role(self.policy_adapter):
            student = self.bank(*args, position_ids=rows.position_ids).logits
        with self.bank.teacher():
            teacher = self.bank(*args, position_ids=rows.position_ids).logits
        mask = rows.completion_mask
        if rows.position_ids is not None and rows.attention_mask is None:
            # Packed: a token at position 0 starts a new sequence and is not predicted by the previous one.
            mask = mask * (rows.position_ids != 0).to(mask.dtype)
        # The bank checked that both tokenizers agree; logits widths may still differ by padding columns.
        width = min(student.shape[-1], teacher.shape[-1])
        return student[:, :-1, :width], teacher[:, :-1, :width], mask[:, 1:]

    def divergence(self, student, teacher, mask, *, beta: float, temperature: float) -> torch.Tensor:
        """Mean generalised JSD over the masked tokens (scalar float32)."""
        return generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature,
                                    reduction="mean", chunk_size=self.chunk_size)

    def training_step(self, batch: dict, batch_idx: int):
        rows, source = self.training_sequences(batch)
        student, teacher, mask = self.aligned_logits(rows)
        divergence_sum = generalized_jsd_loss(student, teacher, mask, beta=self.beta, temperature=self.temperature,
                                              reduction="sum", chunk_size=self.chunk_size)
        # The mean over the loss tokens of every data-parallel rank, as one process holding the global batch
        # takes it (ranks' completions differ in length, on-policy ones above all).
        loss, mean_divergence = global_mean_loss(divergence_sum, mask.sum())
        self.distill_batches += 1
        self.on_policy_batches += source == "student"
        size = rows.input_ids.shape[0]
        self.log("loss", mean_divergence, prog_bar=True, batch_size=size)
        self.log("on_policy", self.on_policy_batches / self.distill_batches, prog_bar=True, batch_size=size)
        self.log_means(global_means({"completion_length": (mask.sum() / size, size)}, self.device))  # every rank's rows
        return self.skip_if_nonfinite(loss)

    # -- validation and test: the dataset's completions, token-weighted over the epoch -----------

    def evaluation_sequences(self, batch: dict) -> DistillBatch:
        if "input_ids" in batch:
            return dataset_batch(batch)
        # Prompt-only data: measure on the teacher's greedy completions.
        return rollout_batch(self.generate(batch, "teacher", self.sampling.resolved(self.tokenizer, self.bank.model).greedy()))

    @torch.no_grad()
    def _accumulate(self, batch: dict) -> None:
        student, teacher, mask = self.aligned_logits(self.evaluation_sequences(batch))
        num_tokens = mask.sum()
        if num_tokens == 0:  # still every name, weight 0: each rank's sums hold the same ones
            self.accumulate_evaluation_means({"loss": (0.0, 0), "kl_teacher": (0.0, 0)})
            return
        self.accumulate_evaluation_means({
            "loss": (self.divergence(student, teacher, mask, beta=self.beta, temperature=self.temperature), num_tokens),
            "kl_teacher": (self.divergence(student, teacher, mask, beta=0.0, temperature=1.0), num_tokens)})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation_means("val", prog_bar=("loss", "kl_teacher"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation_means("test")

    # -- checkpoints: the on-policy counters ----------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_rlhf_gkd"] = {"distill_batches": self.distill_batches,
                                      "on_policy_batches": self.on_policy_batches}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lit_rlhf_gkd")
        if state is not None:
            self.distill_batches = int(state["distill_batches"])
            self.on_policy_batches = int(state["on_policy_batches"])
