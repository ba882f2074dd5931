"""What the offline methods on a fixed dataset (the DPO family, KTO, reward modelling) share: the
forward over a padded batch, run padding-free where the model keeps packed sequences apart.

The collators keep building padded batches (their ``attention_mask`` says which tokens are real);
the forward packs those tokens into rows (``models.packing``) and the per-token results go back
to the padded layout (``losses.unpack_tokens``), so everything after the forward, the losses and
the precomputed reference log-probs, reads the same tensors either way. The LM head runs only where a
completion token is predicted (``models.head``), and where the model does nothing after its head, the
head's weight is fused into the log-probs (``losses.head_token_logps``): no logits tensor at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import NamedTuple

import torch
from lightning.pytorch.trainer.states import TrainerFn

from lit_rlhf.losses import (
    PackedLayout,
    SequenceLogps,
    completion_token_logps,
    head_token_logps,
    load_balancing_loss,
    log_sum_squared_chunk,
    log_sum_squared_probs,
    unpack_tokens,
)
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.models.head import head_on
from lit_rlhf.models.packing import PackedRows, pack_rows, packing_unsupported

log = logging.getLogger("lit_rlhf.methods")


class CompletionLogps(NamedTuple):
    """Per-token completion log-probs of a padded batch, aligned with the positions that predict them.

    Attributes:
        per_token: ``(batch, seq)`` float32, position ``t`` holds ``log p(input_ids[b, t+1] | ...)`` where
            that token is a completion token, else 0.
        mask: ``(batch, seq)`` bool, the positions predicting a completion token.
        log_sum_sq: ``(batch, seq)`` float32 ``log Σ_v p(v)²`` (WPO) without gradient, when asked for.
    """

    per_token: torch.Tensor
    mask: torch.Tensor
    log_sum_sq: torch.Tensor | None


class CompletionLogpsForward:
    """The forward of a ``BankMethod`` that returns per-token completion log-probs, with the LM head run
    only where a completion token is predicted (``models.head``) and, where the model allows, fused with
    the log-probs (``losses.head_token_logps``): no logits tensor. Each is checked once per model, at
    the first forward, and logged; where not allowed, the logits are made (of the kept positions, or of
    every position) and reduced by ``losses.completion_token_logps``. The checks are ``BankMethod``'s
    (``uses_head_selection``, ``uses_fused_head``): the online methods' forwards read them too.

    On a mixture of experts, each loss forward of the trained role (:meth:`trained_role`, in training and in
    evaluation) also gives the router load-balancing loss of its real tokens (``losses.load_balancing_loss``),
    which the step adds to its loss with weight ``router_aux_loss_coef`` (:meth:`add_router_aux_loss`), as TRL
    (1.16) does, its evaluation loss included.

    Args:
        router_aux_loss_coef: the weight of the load-balancing loss in the training loss; ``None``: the model
            config's ``router_aux_loss_coef`` (transformers' defaults: Mixtral, Qwen2/3-MoE 0.001, OLMoE 0.01),
            whatever its ``output_router_logits`` says; ``0``: off. A model
            that is no mixture of experts has none (a non-zero value is refused).
        **kwargs: the arguments of the next class (``BankMethod``'s).
    """

    adds_router_aux_loss = True

    def __init__(self, *, router_aux_loss_coef: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.keep_router_aux_loss_coef(router_aux_loss_coef, "its forward reads no language-model output")
        self._router_aux_losses: list[torch.Tensor] = []
        self._in_loss_forward = False

    @contextmanager
    def trained_role(self):
        """The trained role active for the loss's forward of it (in training, the one with gradients): on a
        mixture of experts its load-balancing loss counts, the reference's and no-grad passes' (KTO's KL
        estimate) do not."""
        with self.bank.role(self.trained_adapter):
            previous, self._in_loss_forward = self._in_loss_forward, True
            try:
                yield
            finally:
                self._in_loss_forward = previous

    def _logits(self, forward_args: tuple, real_tokens: torch.Tensor | None) -> torch.Tensor:
        """The active role's logits; in a loss forward (:meth:`trained_role`) on a mixture of experts whose
        load-balancing loss is weighted, that loss over ``real_tokens`` (the forward's positions holding a token;
        ``None``: all) kept for the step."""
        if not (self._router_aux_weight and self._in_loss_forward):
            return self.bank(*forward_args).logits
        out = self.bank(*forward_args, output_router_logits=True)
        self._router_aux_losses.append(load_balancing_loss(out.router_logits, self._router_top_k, real_tokens))
        return out.logits

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._router_aux_losses.clear()  # nothing kept from a step that did not take its own

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._router_aux_losses.clear()

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._router_aux_losses.clear()

    def take_router_aux_loss(self) -> torch.Tensor | None:
        """The mean load-balancing loss of the loss forwards since the last call, or ``None`` where none was taken."""
        if not self._router_aux_losses:
            return None
        aux = torch.stack(self._router_aux_losses).mean()
        self._router_aux_losses.clear()
        return aux

    def add_router_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss + router_aux_loss_coef · aux``, ``aux`` the mean load-balancing loss of this training step's
        loss forwards (logged as ``aux_loss``, TRL's name); ``loss`` itself where there is none."""
        aux = self.take_router_aux_loss()
        if aux is None:
            return loss
        self.log("aux_loss", aux.detach(), sync_dist=True)  # the mean over ranks, as TRL gathers it
        return loss + self._router_aux_weight * aux

    def evaluation_router_aux_loss(self, loss: torch.Tensor, metrics: dict, weight) -> torch.Tensor:
        """An evaluation batch's ``loss`` plus ``router_aux_loss_coef · aux``, as TRL's evaluation loss counts it,
        and ``aux_loss`` added to ``metrics`` as ``(aux, weight)``; ``loss`` itself where there is none."""
        aux = self.take_router_aux_loss()
        if aux is None:
            return loss
        metrics["aux_loss"] = (aux, weight)
        return loss + self._router_aux_weight * aux

    def forward_logps(self, forward_args: tuple, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                      layout: PackedLayout | None = None, *, with_log_sum_sq: bool = False) -> CompletionLogps:
        """Per-token completion log-probs of the active role, from one forward.

        Args:
            forward_args: ``(input_ids, attention_mask, position_ids)`` of the model's forward: the batch
                itself, or padding-free rows of its real tokens that ``layout`` places.
            input_ids, completion_mask: ``(batch, seq)`` the batch (padded, or rows packed by a collator
                whose completion mask leaves each sequence's first token out).
            layout: where the real tokens of padding-free ``forward_args`` sit; ``None`` for the batch itself.
            with_log_sum_sq: also WPO's ``log Σ_v p(v)²`` per position.
        """
        real_tokens = forward_args[1] if layout is None else layout.slot_mask
        # Position t predicts token t + 1: the head runs where that token is a completion token.
        predicts = torch.cat([completion_mask[:, 1:], torch.zeros_like(completion_mask[:, :1])], dim=1).bool()
        # No completion token at all: full logits keep the loss attached to the graph (a zero gradient).
        if self.uses_head_selection() and predicts.any():
            keep = predicts
            if layout is not None:
                keep = torch.zeros_like(layout.slot_mask)
                keep[layout.slot_mask] = predicts[layout.token_mask]
            head, fused = self.bank.output_embeddings(), self.uses_fused_head()
            with head_on(head, keep, passthrough=fused) as selected:
                logits = self._logits(forward_args, real_tokens)
            if selected:  # else a role's model the first check did not see: its full logits are still right
                slots = torch.ones(1, int(predicts.sum()), dtype=torch.bool, device=predicts.device)
                layout = PackedLayout(predicts, slots)
                if fused:
                    labels = input_ids[:, 1:][predicts[:, :-1]]
                    logps, log_sum_sq = head_token_logps(selected[0][0], head.weight, head.bias, labels,
                                                         statistic=log_sum_squared_chunk if with_log_sum_sq else None)
                    return CompletionLogps(unpack_tokens(logps[None], layout), predicts,
                                           None if log_sum_sq is None else unpack_tokens(log_sum_sq[None], layout))
        else:
            logits = self._logits(forward_args, real_tokens)
        per_token, mask = completion_token_logps(logits, input_ids, completion_mask, layout)
        log_sum_sq = None
        if with_log_sum_sq:
            log_sum_sq = log_sum_squared_probs(logits)
            log_sum_sq = log_sum_sq if layout is None else unpack_tokens(log_sum_sq, layout)
        return CompletionLogps(per_token, mask, log_sum_sq)


def check_packed_batches(method: BankMethod, roles: dict[str, Callable[[], AbstractContextManager]]) -> None:
    """Refuse packed batches (``SFTDataModule(packing=True)``) where a model reading them gives other log-probs
    than on the padded rows (``models.packing.packing_unsupported``): OPT (5.x) builds its mask and its learned
    positions without ``position_ids``, so its packed SFT loss was silently another (4.186 for the padded 4.182
    on a toy batch). Checked once per method, at its first packed batch, for every role in ``roles`` (name ->
    context that makes the bank run that model)."""
    if getattr(method, "_packed_batches_checked", False):
        return
    for role, context in roles.items():
        with context():
            reason = packing_unsupported(method.bank)
        if reason is not None:
            raise ValueError(f"packing: true, but the {role} model cannot read packed rows ({reason}): set packing: "
                             "false in the data module (data.init_args.packing)")
    method._packed_batches_checked = True


class OfflineMethod(CompletionLogpsForward, BankMethod):
    """Base of the methods trained on a fixed dataset; adds the padding-free forward.

    Args:
        padding_free: run each batch's real tokens as one packed row (``position_ids`` restarting
            per sequence, no attention mask) instead of the padded batch: the same log-probs, no
            compute or activation memory spent on padding. ``None`` (default): on when the model
            reads packed rows as it reads the padded batch (``models.packing.packing_unsupported``:
            checked once, at the first forward), else padded, with the reason logged. ``True``: on, and
            an error where the model does not support it (e.g. OPT, BLOOM, Falcon-RW). ``False``: always
            padded.
        **kwargs: optimizer and bank arguments of ``BankMethod``, and ``router_aux_loss_coef`` of
            ``CompletionLogpsForward``.
    """

    def __init__(self, *, padding_free: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.padding_free = padding_free
        self._packing: bool | None = None if padding_free is not False else False

    def attach_precomputed_reference(self) -> None:
        """Write the precomputed reference log-probs into the rows (``precompute_ref_logps``); by default none."""

    def on_fit_start(self) -> None:
        self.attach_precomputed_reference()

    def on_validation_start(self) -> None:
        # trainer.validate runs no on_fit_start: without the rows' precomputed log-probs the loss would fall
        # back to bank.reference(), which such a bank does not keep (adapters off: the pre-SFT base).
        if self.trainer.state.fn != TrainerFn.FITTING:
            self.attach_precomputed_reference()

    def uses_packing(self) -> bool:
        """Whether forwards run padding-free: ``padding_free`` resolved against the model, once."""
        if self._packing is None:
            reason = packing_unsupported(self.bank)
            model = type(self.bank.model.get_base_model() if self.bank.is_peft else self.bank.model).__name__
            attention = self.bank.model.config._attn_implementation
            if self.padding_free and reason is not None:
                raise ValueError(f"padding_free: true, but {model} ({attention} attention) cannot run padding-free "
                                 f"rows ({reason}): set padding_free: false, or null to fall back to padding "
                                 "automatically")
            log.info("padding-free forward %s for %s (%s attention)", "on" if reason is None else
                     f"off ({reason}): padded batches", model, attention)
            self._packing = reason is None
        return self._packing

    def packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
        """The batch's real tokens in padding-free rows.

        flash-attention runs varlen over one row. sdpa and eager compute each row's attention densely
        under a ``(width x width)`` block-diagonal mask, so a row of the whole batch would cost
        ``tokens²``: their rows are ``seq * slots / tokens`` wide (the padded width over the fill
        ratio), where ``tokens * width``, the packed attention work, equals the padded batch's
        ``slots * seq``; every other layer then costs the real tokens only.
        """
        if "flash" in (self.bank.model.config._attn_implementation or ""):
            return pack_rows(input_ids, attention_mask)
        tokens = max(int(attention_mask.sum()), 1)
        return pack_rows(input_ids, attention_mask, row_width=input_ids.shape[1] * input_ids.numel() // tokens)

    def completion_token_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               completion_mask: torch.Tensor, *, with_log_sum_sq: bool = False) -> CompletionLogps:
        """Per-token completion log-probs of a padded batch under the active role (and WPO's
        ``log Σ_v p(v)²`` when asked), from one forward run padding-free where the model allows."""
        if not self.uses_packing():
            return self.forward_logps((input_ids, attention_mask, None), input_ids, completion_mask,
                                      with_log_sum_sq=with_log_sum_sq)
        packed = self.packed(input_ids, attention_mask)
        return self.forward_logps((packed.input_ids, None, packed.position_ids), input_ids, completion_mask,
                                  packed.layout, with_log_sum_sq=with_log_sum_sq)

    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       completion_mask: torch.Tensor) -> SequenceLogps:
        """Summed completion log-probs of each row under the active role, and their token counts."""
        per_token, mask, _ = self.completion_token_logps(input_ids, attention_mask, completion_mask)
        return SequenceLogps(per_token.sum(dim=-1), mask.sum(dim=-1))

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str) -> torch.Tensor:
        """``adapter``'s score head at each row's last real token, ``(batch,)`` float32, padding-free
        where the model supports it."""
        if not self.uses_packing():
            return self.bank.score(input_ids, attention_mask, adapter=adapter)
        packed = self.packed(input_ids, attention_mask)
        return self.bank.score(packed.input_ids, None, adapter=adapter, position_ids=packed.position_ids,
                               token_index=packed.last_tokens)
