"""Padding-free forwards: a padded batch's real tokens run as one row of packed sequences.

The layout is the one ``PackingCollator`` gives SFT: sequences concatenated into one
``(1, total_tokens)`` row, ``position_ids`` restarting at 0 for each, no attention mask, no KV
cache. transformers (5.x) then keeps attention inside each sequence: its mask builder detects the
restarts in ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask for sdpa and eager attention; flash-attention runs varlen on one row.
No token is spent on padding, so the forward costs the batch's real tokens only.

Not every model honours that: OPT (5.x) builds its mask without ``position_ids``, so packed
sequences would attend to each other. :func:`packing_supported` finds out by running the model
once on a tiny packed row, rather than trusting a list of model types that goes stale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.models.bank import eval_mode


class PackedRows(NamedTuple):
    """The real tokens of a padded batch as one padding-free row.

    Attributes:
        input_ids: ``(1, total_tokens)``, the rows' tokens in row-major order.
        position_ids: ``(1, total_tokens)``, restarting at 0 at each row's first token.
        token_mask: ``(batch, seq)`` bool, where each packed token sits in the padded batch
            (``losses.unpack_tokens`` puts per-token values back there).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    token_mask: torch.Tensor


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """The attended tokens of ``input_ids`` ``(batch, seq)`` packed into one row (any padding side)."""
    token_mask = attention_mask.bool()
    positions = attention_mask.long().cumsum(dim=1) - 1
    return PackedRows(input_ids[token_mask][None], positions[token_mask][None], token_mask)


# Two sequences of different lengths, long enough that attention leaking across them shows.
_PROBE_LENGTHS = (7, 5)


@torch.no_grad()
def packing_supported(forward, vocab_size: int, device: torch.device) -> bool:
    """Whether ``forward(input_ids, attention_mask, position_ids) -> logits`` keeps packed sequences apart.

    Runs one packed row ``[a, b]`` (positions restarting at ``b``) and one ordinary batch
    ``[[a, b], [b, a]]``: with a working packed mask, ``b``'s logits in the packed row equal those of
    ``b`` alone (the ``[b, a]`` row, causal); without one they sit as far from them as in the
    ``[a, b]`` row, where ``b`` attends to ``a``. The test is relative, so bf16 rounding does not
    read as a leak. Token ids come from a private generator: no global RNG is consumed.
    """
    generator = torch.Generator().manual_seed(0)
    length_a, length_b = _PROBE_LENGTHS
    a = torch.randint(0, vocab_size, (length_a,), generator=generator).to(device)
    b = torch.randint(0, vocab_size, (length_b,), generator=generator).to(device)
    packed_positions = torch.cat([torch.arange(length_a), torch.arange(length_b)]).to(device)[None]
    packed = forward(torch.cat([a, b])[None], None, packed_positions)[0, length_a:].float()
    plain = forward(torch.stack([torch.cat([a, b]), torch.cat([b, a])]), None, None).float()
    alone, leaked = plain[1, :length_b], plain[0, length_a:]
    packed_error = (packed - alone).abs().max()
    leak_size = (leaked - alone).abs().max()
    return bool(packed_error <= 0.05 * leak_size)


def bank_supports_packing(bank) -> bool:
    """:func:`packing_supported` for the bank's active role, in eval mode (no dropout)."""
    def forward(input_ids, attention_mask, position_ids):
        return bank(input_ids, attention_mask, position_ids).logits

    embeddings = bank.model.get_input_embeddings()
    with eval_mode(bank):
        return packing_supported(forward, embeddings.num_embeddings, embeddings.weight.device)
