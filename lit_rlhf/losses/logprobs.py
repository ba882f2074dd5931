"""Log-probabilities and entropies of language-model outputs, without a full float32 log-softmax.

A causal LM produces logits of shape ``(batch, seq, vocab)``; for a 150k vocabulary, a
float32 ``log_softmax`` of a whole batch costs ``4 * batch * seq * vocab`` bytes, often
more than the model. Every function here works on chunks of rows (``chunk_size`` positions
of the flattened ``batch * seq``), upcasting one chunk at a time to float32.

This module is the single place where log-probs of tokens are computed; methods call it, they
do not re-derive it, so a fix or a memory saving here reaches every method at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "PackedLayout",
    "SequenceLogps",
    "completion_token_logps",
    "entropy_chunk",
    "entropy_from_logits",
    "head_token_logps",
    "log_sum_squared_chunk",
    "log_sum_squared_probs",
    "sequence_logps",
    "token_logps",
    "unpack_tokens",
]


class SequenceLogps(NamedTuple):
    """Summed completion log-probs of each sequence.

    Attributes:
        logps: ``(batch,)`` float32, sum of ``log p(token)`` over completion tokens.
        num_tokens: ``(batch,)`` int64, number of completion tokens summed (the length used by
            length-normalised losses: IPO, SimPO, CPO-SimPO).
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor


class PackedLayout(NamedTuple):
    """Where the positions of a padding-free or reduced forward sit: the ``token_mask`` positions of a
    padded ``(batch, seq)`` batch, in row-major order, fill the ``True`` slots of ``(rows, width)``
    rows in the same order: the real tokens in packed rows (``models.packing.pack_rows``), or the
    positions the LM head ran on in one ``(1, kept)`` row (``models.head``).

    Attributes:
        token_mask: ``(batch, seq)`` bool, the padded batch's positions held.
        slot_mask: ``(rows, width)`` bool, the slots holding them (the rest is padding).
    """

    token_mask: torch.Tensor
    slot_mask: torch.Tensor


CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32: the largest upcast a default chunk makes


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many rows as fit in ``CHUNK_ELEMENTS``.

    A fixed row count would make the float32 chunk grow with the vocabulary (1024 rows of a
    128k vocabulary are 512 MiB), so the default is sized by elements instead.
    """
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, vocab))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return chunk_size


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log p(label)`` computed and differentiated chunk by chunk.

    A plain autograd graph would keep every chunk's float32 copy alive for the backward of
    ``logsumexp`` (so the full float32 tensor would exist after all). Here only the logits
    (already alive in their own dtype) and one float32 logsumexp per row are saved; the
    softmax is recomputed per chunk in backward, where
    ``d log p(y) / d logits = onehot(y) - softmax(logits)``.
    """

    @staticmethod
    def forward(ctx, logits_2d: torch.Tensor, labels_1d: torch.Tensor, chunk_size: int) -> torch.Tensor:
        rows = logits_2d.size(0)
        logps = torch.empty(rows, dtype=torch.float32, device=logits_2d.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits_2d.device)
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            chunk = logits_2d[start:end].float()
            lse[start:end] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, labels_1d[start:end, None]).squeeze(-1)
            logps[start:end] = picked - lse[start:end]
        ctx.save_for_backward(logits_2d, labels_1d, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: torch.Tensor):
        logits_2d, labels_1d, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        grad_logits = torch.empty_like(logits_2d)
        grad_logps = grad_logps.float()
        for start in range(0, logits_2d.size(0), chunk_size):
            end = min(start + chunk_size, logits_2d.size(0))
            g = grad_logps[start:end, None]
            softmax = torch.exp(logits_2d[start:end].float() - lse[start:end, None])
            chunk_grad = softmax.mul_(-g)
            chunk_grad.scatter_add_(-1, labels_1d[start:end, None], g)
            grad_logits[start:end] = chunk_grad.to(grad_logits.dtype)
        return grad_logits, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Log-probability of each label under the logits.

    ``log p(y_t) = logits[t, y_t] - logsumexp_v logits[t, v]``, computed on chunks of
    ``chunk_size`` rows of the flattened ``(batch * seq, vocab)`` logits, each upcast to
    float32 on its own; the full-vocabulary float32 log-softmax of the batch never exists,
    neither in forward nor in backward.

    Args:
        logits: ``(batch, seq, vocab)``, any float dtype, already aligned so that
            ``logits[:, t]`` predicts ``labels[:, t]`` (shift before calling, or use
            :func:`sequence_logps`).
        labels: ``(batch, seq)`` integer token ids. Ignored positions (``-100``, pad) are
            clamped to id 0 for the gather; their values are meaningless and the caller masks
            them.
        chunk_size: rows upcast to float32 at once; ``None`` sizes chunks to about 64 MiB of
            float32 whatever the vocabulary. Trades peak memory for kernel launches.

    Returns:
        ``(batch, seq)`` float32 log-probabilities (differentiable with respect to ``logits``).
    """
    chunk_size = resolve_chunk_size(chunk_size, logits.size(-1))
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: expected "
            "logits (batch, seq, vocab) and labels (batch, seq), aligned position by position."
        )
    vocab = logits.size(-1)
    if labels.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    logits_2d = logits.reshape(-1, vocab)
    labels_1d = labels.reshape(-1).long().clamp(min=0)
    return _ChunkedTokenLogps.apply(logits_2d, labels_1d, chunk_size).view(labels.shape)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc`` without rounding the product to the inputs' dtype first: a
    bf16 weight gradient summed chunk by chunk in bf16 would lose what one matmul over every row keeps."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # fp32 output of a half GEMM: CUDA only
    else:
        acc.addmm_(a.float(), b.float())


class _FusedHeadTokenLogps(torch.autograd.Function):
    """``log p(label)`` of ``hidden @ weight.T + bias``, chunk by chunk over the rows, without the
    ``(rows, vocab)`` logits ever existing whole (TRL's ``ChunkedLogProbFunction`` does the same with
    vocabulary tiles and Triton folds).

    Each chunk's logits are made in the compute dtype (the model's, or autocast's), upcast to float32 for
    the logsumexp, and dropped; only the inputs, one float32 logsumexp per row and the last chunk's logits
    (a chunk exists in backward anyway; a batch of one chunk then costs no recompute) are saved. Backward
    recomputes each other chunk's logits, forms ``d log p(y) / d logits = onehot(y) - softmax`` in float32,
    rounds it to the compute dtype (as the logits' gradient is rounded on the unfused path), and
    multiplies it into the hidden states' gradient and, when the weight is trained, into a float32 weight
    gradient. A frozen weight (LoRA) costs no weight gradient at all.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, statistic):
        # Under autocast (bf16-mixed) the chunks are made as F.linear would make them; backward, which runs
        # outside autocast, casts the same way so that it recomputes the forward's logits.
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        rows = hidden.size(0)
        logps = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        stats = torch.empty(rows, dtype=torch.float32, device=hidden.device) if statistic is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            last_logits = None
            for start in range(0, rows, chunk_size):
                end = min(start + chunk_size, rows)
                last_logits = F.linear(hidden[start:end].to(dtype), w, b)
                chunk = last_logits.float()
                lse[start:end] = torch.logsumexp(chunk, dim=-1)
                logps[start:end] = chunk.gather(-1, labels[start:end, None]).squeeze(-1) - lse[start:end]
                if stats is not None:
                    stats[start:end] = statistic(chunk)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, last_logits)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return logps, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_stats):
        hidden, weight, bias, labels, lse, last_logits = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        grad_logps = grad_logps.float()
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            rows = hidden.size(0)
            for start in range(0, rows, chunk_size):
                end = min(start + chunk_size, rows)
                h = hidden[start:end].to(dtype)
                g = grad_logps[start:end, None]
                logits = last_logits if end == rows else F.linear(h, w, b)
                chunk_grad = torch.exp(logits.float() - lse[start:end, None]).mul_(-g)
                chunk_grad = chunk_grad.scatter_add_(-1, labels[start:end, None], g).to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (chunk_grad @ w).to(hidden.dtype)
                if grad_weight is not None:
                    _add_product_fp32(grad_weight, chunk_grad.t(), h)
                if grad_bias is not None:
                    grad_bias += chunk_grad.sum(dim=0, dtype=torch.float32)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None)


def head_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
    chunk_size: int | None = None, statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label under an LM head's logits, the head fused in: ``log p(y_n) =
    z[n, y_n] - logsumexp_v z[n, v]`` with ``z = hidden @ weight.T + bias``, computed and differentiated
    ``chunk_size`` rows at a time, so that neither the ``(rows, vocab)`` logits nor their gradient exist
    whole: what :func:`token_logps` on the head's output gives, without that output.

    Args:
        hidden: ``(rows, hidden)`` the head's input at the positions wanted.
        weight: ``(vocab, hidden)`` the head's weight; its gradient is computed only when it requires one.
        bias: ``(vocab,)`` or ``None``.
        labels: ``(rows,)`` token ids, each in ``[0, vocab)``.
        chunk_size: rows whose logits exist at once; ``None`` sizes chunks like :func:`token_logps`.
        statistic: a per-row value of a float32 ``(chunk, vocab)`` logits chunk, computed alongside without
            gradient (WPO's :func:`log_sum_squared_probs` normaliser, an entropy metric: :func:`entropy_chunk`).

    Returns:
        ``(logps, stats)``: ``(rows,)`` float32 log-probs (differentiable with respect to ``hidden``,
        ``weight``, ``bias``) and ``(rows,)`` float32 ``statistic`` values, or ``None`` without one.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.dim() != 2 or weight.size(1) != hidden.size(1):
        raise ValueError(f"expected hidden (rows, hidden), weight (vocab, hidden) and labels (rows,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}")
    chunk_size = resolve_chunk_size(chunk_size, weight.size(0))
    return _FusedHeadTokenLogps.apply(hidden, weight, bias, labels.long(), chunk_size, statistic)


def unpack_tokens(values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Per-token values of padding-free rows put back in their padded batch: ``(rows, width)`` ->
    ``(batch, seq)`` float32, 0 off the real tokens (differentiable)."""
    out = values.new_zeros(layout.token_mask.shape, dtype=torch.float32)
    return out.masked_scatter(layout.token_mask, values[layout.slot_mask].float())


def completion_token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
    layout: PackedLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens, aligned with the logits that predict them.

    Position ``t`` holds ``log p(input_ids[b, t+1] | input_ids[b, <=t])`` (read from
    ``logits[b, t]``) where ``input_ids[b, t+1]`` is a completion token, else 0.

    Args:
        logits: ``(batch, seq, vocab)``; or, with ``layout``, ``(rows, width, vocab)`` of a
            padding-free forward over the real tokens of ``input_ids`` (``models.packing.pack_rows``).
        input_ids: ``(batch, seq)``.
        completion_mask: ``(batch, seq)``, 1 on completion tokens.
        layout: where the tokens of padding-free ``logits`` sit; None for padded logits.

    Returns:
        ``(per_token, mask)``: ``(batch, seq)`` float32 log-probs (0 off the completion) and the
        ``(batch, seq)`` bool mask of the positions that predict a completion token.
    """
    # Shift the labels rather than slicing logits[:, :-1]: the slice is not contiguous and
    # would force a copy of the whole logits tensor. The last position predicts nothing and
    # gets label 0 with mask 0.
    pad_col = torch.zeros_like(input_ids[:, :1])
    labels = torch.cat([input_ids[:, 1:], pad_col], dim=1)
    mask = torch.cat([completion_mask[:, 1:], torch.zeros_like(completion_mask[:, :1])], dim=1).bool()
    if layout is None:
        per_token = token_logps(logits, labels)
    else:
        # Labels taken in the padded layout: a sequence's last token "predicts" padding there, never the
        # next packed sequence's first token, and the completion mask drops it either way.
        packed_labels = torch.zeros_like(layout.slot_mask, dtype=labels.dtype)
        packed_labels[layout.slot_mask] = labels[layout.token_mask]
        per_token = unpack_tokens(token_logps(logits, packed_labels), layout)
    return torch.where(mask, per_token, torch.zeros_like(per_token)), mask


def log_sum_squared_chunk(chunk: torch.Tensor) -> torch.Tensor:
    """``log Σ_v p(v)²`` of each row of a ``(rows, vocab)`` logits chunk, float32 (see
    :func:`log_sum_squared_probs`; also :func:`head_token_logps`' ``statistic``)."""
    return torch.logsumexp(2 * torch.log_softmax(chunk.float(), dim=-1), dim=-1)


def entropy_chunk(chunk: torch.Tensor) -> torch.Tensor:
    """``-Σ_v p(v) log p(v)`` of each row of a ``(rows, vocab)`` logits chunk, float32 (see
    :func:`entropy_from_logits`; also :func:`head_token_logps`' ``statistic``)."""
    logp = torch.log_softmax(chunk.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def log_sum_squared_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log Σ_v p(v)²`` at every position, ``(batch, seq)`` float32, without gradient: the
    normaliser of WPO's sampling weights (Zhou et al. 2024, arXiv 2406.11827, eq. 2). Chunked like
    :func:`token_logps`: no float32 copy of the whole logits tensor."""
    rows = logits.reshape(-1, logits.size(-1))
    chunk_size = resolve_chunk_size(None, logits.size(-1))
    out = [log_sum_squared_chunk(chunk) for chunk in rows.split(chunk_size)]
    return torch.cat(out).view(logits.shape[:-1]) if out else rows.new_zeros(logits.shape[:-1], dtype=torch.float32)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
    layout: PackedLayout | None = None,
) -> SequenceLogps:
    """Summed log-probability of each sequence's completion under a causal LM.

    ``logps[b] = sum_{t >= 1} completion_mask[b, t] * log p(input_ids[b, t] | input_ids[b, <t])``,
    where ``p(. | input_ids[b, <t])`` is read from ``logits[b, t - 1]`` (the causal shift is
    done here).

    Args:
        logits: ``(batch, seq, vocab)`` logits of a causal LM run on ``input_ids``.
        input_ids: ``(batch, seq)`` token ids.
        completion_mask: ``(batch, seq)``, 1 on completion tokens of ``input_ids`` and 0 on
            prompt and padding tokens.
        layout: with padding-free ``(rows, width, vocab)`` logits, where their tokens sit (see
            :func:`completion_token_logps`).

    Returns:
        :class:`SequenceLogps` with ``logps`` ``(batch,)`` float32 and ``num_tokens``
        ``(batch,)`` int64.
    """
    tokens = input_ids.shape if layout is None else layout.slot_mask.shape
    if input_ids.shape != completion_mask.shape or logits.shape[:-1] != tokens:
        raise ValueError(
            f"expected logits (batch, seq, vocab) (or (rows, width, vocab) with layout) and input_ids, "
            f"completion_mask (batch, seq); got {tuple(logits.shape)}, {tuple(input_ids.shape)}, "
            f"{tuple(completion_mask.shape)}."
        )
    per_token, mask = completion_token_logps(logits, input_ids, completion_mask, layout)
    logps = per_token.sum(dim=-1)
    return SequenceLogps(logps=logps, num_tokens=mask.sum(dim=-1))


def entropy_from_logits(logits: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of the predictive distribution at each position.

    ``H_t = -sum_v p_t(v) log p_t(v)``, ``p_t = softmax(logits[:, t])``, computed on chunks of
    ``chunk_size`` rows upcast to float32 one at a time. When gradients are needed, each chunk
    is recomputed in backward (activation checkpointing) so its float32 intermediates are not
    kept for the whole batch.

    Args:
        logits: ``(batch, seq, vocab)``.
        chunk_size: rows upcast to float32 at once; ``None`` sizes chunks to about 64 MiB.

    Returns:
        ``(batch, seq)`` float32 entropies in nats.
    """
    chunk_size = resolve_chunk_size(chunk_size, logits.size(-1))
    batch_shape = logits.shape[:-1]
    if logits.numel() == 0:
        return logits.new_zeros(batch_shape, dtype=torch.float32)
    rows = logits.reshape(-1, logits.size(-1))
    # torch.split (not indexing) so that backward assembles one gradient with a single cat.
    chunks = torch.split(rows, chunk_size, dim=0)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    out = [checkpoint(entropy_chunk, c, use_reentrant=False) if needs_grad else entropy_chunk(c) for c in chunks]
    return torch.cat(out).view(batch_shape)
