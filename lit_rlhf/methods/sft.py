"""Supervised fine-tuning: causal-LM loss on demonstrations, of an adapter or of the full model.

The loss is the mean negative log-likelihood over the tokens of ``completion_mask``: the
completion only when the DataModule knows the prompt and ``completion_only_loss`` is on,
every token otherwise; under data parallelism, over the loss tokens of every rank together (as
one process holding the global batch). With ``accumulate_grad_batches > 1`` Lightning averages the
micro-batches' losses, so a step's loss is the mean of its micro-batches' token means (TRL divides by
the token count of the whole step: the same when micro-batches hold equally many loss tokens). The
per-token log-probs come from the offline methods' forward (``CompletionLogpsForward``): the LM head
only where a loss token is predicted and, where the model allows, fused with the log-probs, so no
logits tensor exists. Packed batches
(``SFTDataModule(packing=True)``) carry ``position_ids`` and no attention mask; the loss is the
same as on the padded batch.

On a mixture of experts the training and evaluation losses add the router load-balancing loss of the policy's
forward, ``router_aux_loss_coef · aux`` (TRL's SFT does too; ``loss`` and ``val/loss`` are logged with it, ``ppl``
is of the NLL alone); with ``packing: true`` the padding of a packed batch's last row counts in ``aux`` (the batch
has no attention mask to leave it out).

Perplexity is token-weighted: ``ppl = exp(total NLL / total tokens)``, per step in training
and over the whole epoch in validation (not a mean of per-batch perplexities).
"""

from __future__ import annotations

import math

import torch

from lit_rlhf.distributed import global_mean_loss, global_sum
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.offline import CompletionLogpsForward, check_packed_batches


class SFT(CompletionLogpsForward, BankMethod):
    """Supervised fine-tuning (causal LM loss) of the ``policy`` adapter, or of the base in ``full`` mode.

    Logs ``loss``, ``ppl`` and ``num_tokens`` per training step, and ``val/loss`` and ``val/ppl``
    (token-weighted over the validation epoch).

    Args:
        **kwargs: optimizer, bank and ``policy_adapter`` arguments of ``BankMethod``; ``router_aux_loss_coef``,
            the weight of a mixture of experts' router load-balancing loss in the training loss
            (``CompletionLogpsForward``; TRL's rule). The weighted load-balancing loss is added to the loss
            optimized and to the logged ``loss`` (as TRL logs it); ``ppl`` is the NLL's; ``aux_loss`` is logged too.
    """

    def nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll_sum, num_tokens)`` of the policy on a padded or packed SFT batch: ``-Σ m·log p`` over the
        loss tokens ``m`` (``completion_mask``), and ``Σ m``."""
        forward_args = (batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        if forward_args[1] is None:
            check_packed_batches(self, {"policy": lambda: self.bank.role(self.trained_adapter)})
        with self.trained_role():
            per_token, mask, _ = self.forward_logps(forward_args, batch["input_ids"], batch["completion_mask"])
        return -per_token.sum(), mask.sum()

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL over the batch's loss tokens, and their number."""
        nll_sum, num_tokens = self.nll(batch)
        if num_tokens == 0:
            # Nothing to learn from (e.g. every completion truncated away): a zero loss with a graph.
            return nll_sum * 0.0, num_tokens
        return nll_sum / num_tokens, num_tokens

    def training_step(self, batch: dict, batch_idx: int):
        nll_sum, num_tokens = self.nll(batch)
        # The mean over the loss tokens of every data-parallel rank, as one process holding the global batch takes it.
        nll_loss, mean_nll = global_mean_loss(nll_sum, num_tokens)
        loss = self.add_router_aux_loss(nll_loss)
        self.log("loss", mean_nll + (loss - nll_loss).detach(), prog_bar=True)  # the objective, as TRL logs it
        self.log("ppl", torch.exp(mean_nll))
        self.log("num_tokens", global_sum(num_tokens.float()), reduce_fx="sum")  # the step's, every rank's
        return self.skip_if_nonfinite(loss)

    def _log_epoch(self, prefix: str) -> None:
        """``loss``: the mean NLL over the epoch's tokens, plus ``router_aux_loss_coef`` times the epoch's mean
        load-balancing loss on a mixture of experts (as TRL's evaluation loss counts it; the NLL alone is then
        logged as ``nll``); ``ppl``: of the NLL alone."""
        means = self.log_evaluation_means(prefix, prog_bar=("loss",) if prefix == "val" else ())
        nll = means.get(f"{prefix}/nll", means.get(f"{prefix}/loss"))
        if nll is None:  # an epoch without loss tokens logs neither
            return
        if f"{prefix}/nll" in means:
            loss = nll + self._router_aux_weight * means.get(f"{prefix}/aux_loss", 0.0)
            self.log_global(f"{prefix}/loss", loss, prog_bar=prefix == "val")
        self.log_global(f"{prefix}/ppl", math.exp(nll))

    def _accumulate(self, batch: dict) -> None:
        loss, num_tokens = self.compute_loss(batch)  # weighted by the batch's loss tokens
        aux = self.take_router_aux_loss()
        if aux is None:
            self.accumulate_evaluation_means({"loss": (loss, num_tokens)})
        else:  # weighted by rows, as transformers' evaluation loop averages TRL's batch losses
            self.accumulate_evaluation_means({"nll": (loss, num_tokens), "aux_loss": (aux, batch["input_ids"].shape[0])})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
