"""Padding-free forwards: a padded batch's real tokens run as rows of packed sequences.

The layout is the one ``PackingCollator`` gives SFT: sequences concatenated into rows (``pack_rows``: one
row, or rows of at most ``row_width`` tokens), ``position_ids`` restarting at 0 for each, no attention mask, no KV
cache. transformers (5.x) then keeps attention inside each sequence: its mask builder detects the
restarts in ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask for sdpa and eager attention; flash-attention runs varlen on one row.
No token is spent on padding, so the forward costs the batch's real tokens only.

Not every model honours that: OPT and BLOOM (5.x) build their mask without ``position_ids``, so packed
sequences would attend to each other. :func:`packing_supported` finds out by running the model
once on a tiny packed row, rather than trusting a list of model types that goes stale. Falcon-RW's
ALiBi biases count positions along the whole row, in bfloat16: what no short probe row shows, its
config does (:func:`packing_unsupported`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.losses.logprobs import PackedLayout
from lit_rlhf.models.bank import eval_mode


class PackedRows(NamedTuple):
    """The real tokens of a padded batch as padding-free rows.

    Attributes:
        input_ids: ``(rows, width)``, the batch's sequences one after another, in order; a row's
            tail, if any, is padding that forms a sequence of its own (no loss reads it).
        position_ids: ``(rows, width)``, restarting at 0 at each sequence (and at the tail).
        layout: where the real tokens sit, for ``losses.unpack_tokens`` and the log-prob functions.
        last_tokens: ``(batch,)`` long, each sequence's last token as an index into the flattened
            ``rows * width`` slots (where a reward head reads its score).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: PackedLayout
    last_tokens: torch.Tensor


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, row_width: int | None = None) -> PackedRows:
    """The attended tokens of ``input_ids`` ``(batch, seq)`` (any padding side) packed in order, greedily,
    into rows of at most ``row_width`` tokens (a longer sequence gets a row of its own); ``None``: one row."""
    token_mask = attention_mask.bool()
    lengths = token_mask.sum(dim=1).tolist()
    limit = sum(lengths) if row_width is None else row_width
    rows: list[list[int]] = [[]]
    for length in lengths:
        if rows[-1] and sum(rows[-1]) + length > limit:
            rows.append([])
        rows[-1].append(length)
    width = max(sum(row) for row in rows)
    positions = []
    for row in rows:
        # The tail's positions restart too: it is a sequence of its own, never attended to by a real one.
        positions.append(torch.cat([torch.arange(n) for n in row + [width - sum(row)]]))
    device = input_ids.device
    position_ids = torch.stack(positions).to(device)
    slot_mask = (torch.arange(width)[None] < torch.tensor([sum(row) for row in rows])[:, None]).to(device)
    packed_ids = torch.zeros(slot_mask.shape, dtype=input_ids.dtype, device=device)
    packed_ids[slot_mask] = input_ids[token_mask]
    slots = slot_mask.flatten().nonzero().squeeze(-1)
    last_tokens = slots[torch.tensor(lengths, device=device).cumsum(0) - 1]
    return PackedRows(packed_ids, position_ids, PackedLayout(token_mask, slot_mask), last_tokens)


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


def packing_unsupported(bank) -> str | None:
    """Why padding-free rows would give the bank's active role other log-probs than the padded batch, or
    ``None`` where they give the same.

    A model whose mask ignores ``position_ids`` (OPT, BLOOM) is found by :func:`packing_supported`, in eval
    mode (no dropout). A model adding ALiBi biases (Falcon-RW, ``alibi: true``) counts each token's place in
    the whole row: exact by shift invariance, but Falcon computes the biases in bfloat16 whatever the model's
    dtype, so a sequence packed after 256 tokens of others reads coarser positions than alone (its logits
    off by 2e-2 at an offset of 3000 on the tiny model, in float32), past any short probe row's reach."""
    if getattr(bank.active_config(), "alibi", False) is True:
        return ("its ALiBi biases count positions along the whole packed row, in bfloat16 (alibi: true, as "
                "Falcon-RW's): past 256 tokens a packed sequence reads other biases than alone")

    def forward(input_ids, attention_mask, position_ids):
        return bank(input_ids, attention_mask, position_ids).logits

    embeddings = bank.model.get_input_embeddings()  # a LoRA embedding lacks num_embeddings
    with eval_mode(bank):
        if packing_supported(forward, embeddings.weight.shape[0], embeddings.weight.device):
            return None
    return "its attention mask ignores position_ids (as OPT's and BLOOM's do): packed sequences attend to each other"
