"""The load-balancing loss of mixtures of experts: Switch Transformer's auxiliary loss (Fedus et al. 2021,
arXiv 2101.03961, eqs. 4-6), as transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE compute it
(``load_balancing_loss_func``), over the tokens a mask names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E · Σ_e f_e · P_e`` over every MoE layer's routing of the counted tokens, pooled across layers:
    ``f_e`` the fraction of (token, layer) routings that give one of their ``top_k`` slots to expert ``e``
    (``Σ_e f_e = top_k``), ``P_e`` the mean router probability of ``e``, ``E`` the number of experts. Balanced
    routing gives ``top_k``; the gradient reaches the routers through ``P_e``.

    Padding must not count: the padded and the padding-free forward of one batch then give the same loss
    (transformers' own ``aux_loss`` counts every slot of a padding-free row).

    Args:
        router_logits: one ``(tokens, experts)`` tensor per MoE layer, the batch's positions flattened row-major.
        top_k: experts per token (``num_experts_per_tok``).
        token_mask: the positions that count, any shape flattening to ``tokens``; ``None``: all of them. A
            count per position (not only 0/1) counts a position that many times: a prompt run once for the
            ``k`` rows sharing it (``models.prefix``) counts ``k`` times, as in the ``k`` whole rows.
    """
    weight = None if token_mask is None else token_mask.reshape(-1).float()
    routed, probs, rows = 0.0, 0.0, 0.0
    for logits in router_logits:
        p = logits.float().softmax(dim=-1)
        picked = F.one_hot(p.topk(top_k, dim=-1).indices, p.shape[-1]).sum(dim=1).float()
        if weight is None:
            routed, probs, rows = routed + picked.sum(dim=0), probs + p.sum(dim=0), rows + p.shape[0]
        else:
            w = weight.to(p.device)[:, None]
            routed, probs, rows = routed + (w * picked).sum(dim=0), probs + (w * p).sum(dim=0), rows + w.sum()
    return p.shape[-1] * ((routed / rows) * (probs / rows)).sum()
