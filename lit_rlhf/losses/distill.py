"""Token-level distillation divergences (GKD)."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from lit_rlhf.losses.logprobs import resolve_chunk_size

__all__ = ["JSD_REDUCTIONS", "generalized_jsd_loss"]

JSD_REDUCTIONS = ("mean", "sum", "batchmean", "none")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _jsd_chunk(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    # The endpoints are special-cased: the mixture formula tends to 0 there, not to a KL.
    if beta == 0.0:
        return _kl_rows(log_t, log_s)
    if beta == 1.0:
        return _kl_rows(log_s, log_t)
    # log m = log(β e^{log_t} + (1-β) e^{log_s}), stable in log space.
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * _kl_rows(log_t, log_m) + (1 - beta) * _kl_rows(log_s, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between teacher and student, per token.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), arXiv 2306.13649. With ``T`` the teacher's and ``S`` the
    student's next-token distributions (``softmax(logits / temperature)``):

        β = 0:      KL(T ‖ S)                         (forward KL, supervised KD)
        β = 1:      KL(S ‖ T)                         (reverse KL)
        0 < β < 1:  β KL(T ‖ M) + (1-β) KL(S ‖ M),    M = β T + (1-β) S

    The mixture convention ``M = β T + (1-β) S`` is the paper's (its ``JSD(β)`` with ``P =
    T``, ``Q = S``) and TRL's current ``GKDTrainer.generalized_jsd_loss`` (older TRL releases
    weighted the mixture the other way). As β → 0 or 1 this mixture divergence tends to 0, so
    like TRL the two endpoints are defined as the full KLs above rather than as limits; β =
    0.5 is the ordinary Jensen-Shannon divergence. No ``temperature²`` factor is applied (as
    in TRL).

    The teacher is a fixed target: ``teacher_logits`` are detached. Rows of the flattened
    ``(batch * seq, vocab)`` logits are processed ``chunk_size`` at a time, each upcast to
    float32 on its own, and recomputed in backward (activation checkpointing), so the float32
    copy of the whole batch's vocabulary never exists.

    Args:
        student_logits: ``(batch, seq, vocab)``.
        teacher_logits: ``(batch, seq, vocab)``, aligned with the student's positions and
            sharing its vocabulary.
        mask: ``(batch, seq)``, 1 on positions that count (completion tokens).
        beta: interpolation β in ``[0, 1]``.
        temperature: softmax temperature > 0 applied to both logits.
        reduction: ``"mean"`` (over masked tokens), ``"sum"``, ``"batchmean"`` (sum divided by
            ``batch``; note TRL's ``batchmean`` divides by the token count, which is our
            ``"mean"``), or ``"none"`` (``(batch, seq)`` with 0 at masked positions).
        chunk_size: rows upcast to float32 at once; ``None`` sizes chunks to about 64 MiB.

    Returns:
        scalar float32 tensor, or ``(batch, seq)`` for ``reduction="none"``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if reduction not in JSD_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid names are {', '.join(JSD_REDUCTIONS)}.")
    chunk_size = resolve_chunk_size(chunk_size, student_logits.size(-1))
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(
            "expected student_logits and teacher_logits (batch, seq, vocab) and mask (batch, seq); got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(mask.shape)}."
        )
    beta = float(beta)
    vocab = student_logits.size(-1)
    student_rows = torch.split(student_logits.reshape(-1, vocab), chunk_size)
    teacher_rows = torch.split(teacher_logits.detach().reshape(-1, vocab), chunk_size)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    pieces = []
    for s, t in zip(student_rows, teacher_rows):
        if needs_grad:
            pieces.append(checkpoint(_jsd_chunk, s, t, beta, temperature, use_reentrant=False))
        else:
            pieces.append(_jsd_chunk(s, t, beta, temperature))
    if pieces:
        per_token = torch.cat(pieces).view(mask.shape)
    else:
        per_token = student_logits.new_zeros(mask.shape, dtype=torch.float32)
    valid = mask.bool()
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))

    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "batchmean":
        return per_token.sum() / max(mask.size(0), 1)
    return per_token.sum() / valid.sum().clamp(min=1)
