"""What the offline methods on a fixed dataset (the DPO family, KTO, reward modelling) share: the
forward over a padded batch, run padding-free where the model keeps packed sequences apart.

The collators keep building padded batches (their ``attention_mask`` says which tokens are real);
the forward packs those tokens into rows (``models.packing``) and the per-token results go back
to the padded layout (``losses.unpack_tokens``), so everything after the forward, the losses and
the precomputed reference log-probs, reads the same tensors either way. The LM head runs only where a
completion token is predicted (``models.head``); those logits, too, go back to the padded layout.
"""

from __future__ import annotations

import logging

import torch

from lit_rlhf.losses import PackedLayout
from lit_rlhf.methods.base import BankMethod
from lit_rlhf.models import eval_mode
from lit_rlhf.models.head import head_on, head_selection_supported
from lit_rlhf.models.packing import PackedRows, bank_supports_packing, pack_rows

log = logging.getLogger("lit_rlhf.methods")


class OfflineMethod(BankMethod):
    """Base of the methods trained on a fixed dataset; adds the padding-free forward.

    Args:
        padding_free: run each batch's real tokens as one packed row (``position_ids`` restarting
            per sequence, no attention mask) instead of the padded batch: the same log-probs, no
            compute or activation memory spent on padding. ``None`` (default): on when the model
            keeps packed sequences apart (checked once, on a tiny packed row, at the first forward),
            else padded, with the reason logged. ``True``: on, and an error where the model does not
            support it (e.g. OPT). ``False``: always padded.
        **kwargs: optimizer and bank arguments of ``BankMethod``.
    """

    def __init__(self, *, padding_free: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.padding_free = padding_free
        self._packing: bool | None = None if padding_free is not False else False
        self._head_selection: bool | None = None

    def uses_packing(self) -> bool:
        """Whether forwards run padding-free: ``padding_free`` resolved against the model, once."""
        if self._packing is None:
            supported = bank_supports_packing(self.bank)
            model = type(self.bank.model.get_base_model() if self.bank.is_peft else self.bank.model).__name__
            attention = self.bank.model.config._attn_implementation
            if self.padding_free and not supported:
                raise ValueError(
                    f"padding_free: true, but {model} ({attention} attention) lets packed sequences attend to each "
                    "other (its attention mask ignores position_ids): set padding_free: false, or null to fall back "
                    "to padding automatically"
                )
            log.info("padding-free forward %s for %s (%s attention)", "on" if supported else
                     "off (the model lets packed sequences attend to each other): padded batches", model, attention)
            self._packing = supported
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

    def uses_head_selection(self) -> bool:
        """Whether the LM head runs only where a completion token is predicted (``models.head``):
        checked once, on a tiny batch, at the first forward; else full logits, with the reason logged."""
        if self._head_selection is None:
            def forward(input_ids):
                return self.bank(input_ids, torch.ones_like(input_ids)).logits

            embeddings = self.bank.model.get_input_embeddings()
            with eval_mode(self.bank):
                supported = head_selection_supported(forward, self.bank.output_embeddings(),
                                                     embeddings.num_embeddings, embeddings.weight.device)
            log.info("LM head %s", "on completion-predicting positions only" if supported else
                     "on every position (the model's forward does not run its head on the selected hidden states)")
            self._head_selection = supported
        return self._head_selection

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, PackedLayout | None]:
        """Logits of the active role on a padded batch, at least where a completion token is predicted,
        and their layout.

        Returns:
            ``(logits, layout)``: with the LM head on the completion-predicting positions only
            (:meth:`uses_head_selection`), ``(1, kept, vocab)`` logits; else padding-free ``(rows, width,
            vocab)`` logits; and where their positions sit in the padded batch. Padded and every position:
            ``(batch, seq, vocab)`` logits and ``None``. ``losses.sequence_logps`` and
            ``completion_token_logps`` take any of them.
        """
        position_ids, layout = None, None
        if self.uses_packing():
            packed = self.packed(input_ids, attention_mask)
            input_ids, attention_mask, position_ids, layout = packed.input_ids, None, packed.position_ids, packed.layout
        # Position t predicts token t + 1: the head runs where that token is a completion token.
        predicts = torch.cat([completion_mask[:, 1:], torch.zeros_like(completion_mask[:, :1])], dim=1).bool()
        # No completion token at all: full logits keep the loss attached to the graph (a zero gradient).
        if not self.uses_head_selection() or not predicts.any():
            return self.bank(input_ids, attention_mask, position_ids).logits, layout
        keep = predicts
        if layout is not None:
            keep = torch.zeros_like(layout.slot_mask)
            keep[layout.slot_mask] = predicts[layout.token_mask]
        with head_on(self.bank.output_embeddings(), keep) as applied:
            logits = self.bank(input_ids, attention_mask, position_ids).logits
        if not applied:  # a role's model the first check did not see: its full logits are still right
            return logits, layout
        return logits, PackedLayout(predicts, torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device))

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str) -> torch.Tensor:
        """``adapter``'s score head at each row's last real token, ``(batch,)`` float32, padding-free
        where the model supports it."""
        if not self.uses_packing():
            return self.bank.score(input_ids, attention_mask, adapter=adapter)
        packed = self.packed(input_ids, attention_mask)
        return self.bank.score(packed.input_ids, None, adapter=adapter, position_ids=packed.position_ids,
                               token_index=packed.last_tokens)
