"""Collators: lists of tokenised examples -> batches of tensors.

Masks always come from the examples' lengths, never from comparing ids with the pad id
(the pad id may equal eos). Training batches are right-padded; prompt batches for
generation are left-padded. ``completion_mask`` is 1 on the tokens a loss is taken over.
"""

from __future__ import annotations

import torch

from lit_rlhf.data.tokenize import Example


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (a stated fallback: padding never enters a mask)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token")


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad int lists to one ``(len(sequences), max_len)`` long tensor."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            start = width - len(s) if left else 0
            out[i, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, completion_only: bool = True,
               prompt_masks: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows with their attention and completion masks; with
    ``completion_only``, ``prompt_masks`` (else 0s) is the loss mask over each prompt."""
    ids = [p + c for p, c in zip(prompts, completions)]
    if not completion_only:
        prompt_masks = [[1] * len(p) for p in prompts]
    elif prompt_masks is None:
        prompt_masks = [[0] * len(p) for p in prompts]
    masks = [m + [1] * len(c) for m, c in zip(prompt_masks, completions)]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "completion_mask": pad(masks, 0),
    }


def _prompt_loss_mask(example: Example) -> list[int]:
    """The loss mask over an SFT example's prompt under ``completion_only_loss``: its earlier assistant
    turns (``prompt_loss_mask``, on multi-turn ``messages`` rows), else nothing."""
    return example.get("prompt_loss_mask") or [0] * len(example["prompt_ids"])


def _trains_earlier_turns(examples: list[Example], completion_only: bool) -> bool:
    """Whether a batch's loss mask holds earlier assistant turns (and so needs ``earlier_turns_mask``)."""
    return completion_only and any("prompt_loss_mask" in e for e in examples)


def _earlier_turns(example: Example) -> list[int]:
    """1 on an example's earlier assistant turns, over prompt + completion."""
    return _prompt_loss_mask(example) + [0] * len(example["completion_ids"])


class PreferenceCollator:
    """Preference pairs, chosen and rejected stacked so one forward pass covers both.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: ``(2 * batch, seq)``,
    right-padded; rows ``[:batch]`` are prompt + chosen, rows ``[batch:]`` prompt + rejected.
    Examples carrying precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` add them as
    ``(batch,)`` float tensors; a ``margin`` field (reward modelling) adds ``margin`` ``(batch,)``,
    0 for rows without one.

    Args:
        pad_token_id: the id padding is filled with.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples] * 2
        completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = _sequences(prompts, completions, self.pad_token_id)
        # Reference log-probs precomputed once by a method travel with their examples.
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        # A row without a margin in data that has some states no preference strength: margin 0.
        if any("margin" in e for e in examples):
            batch["margin"] = torch.tensor([e.get("margin", 0.0) for e in examples], dtype=torch.float32)
        return batch


class SFTCollator:
    """Demonstrations, right-padded.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: ``(batch, seq)``; and, when an
    example has earlier assistant turns in its loss (``prompt_loss_mask``), ``earlier_turns_mask``
    ``(batch, seq)``: 1 on those turns' tokens, so that ``completion_mask - earlier_turns_mask`` is
    the last turn alone (what distillation reads, see ``lit_rlhf.methods.gkd``).

    Args:
        pad_token_id: the id padding is filled with.
        completion_only_loss: take the loss on completion tokens (and on a ``messages`` row's earlier
            assistant turns) only; when False (and for ``text`` rows, which have no prompt) every
            non-pad token is in ``completion_mask``.
    """

    def __init__(self, pad_token_id: int, completion_only_loss: bool = True):
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["completion_ids"] for e in examples]
        batch = _sequences(prompts, completions, self.pad_token_id, self.completion_only_loss,
                           [_prompt_loss_mask(e) for e in examples])
        if _trains_earlier_turns(examples, self.completion_only_loss):
            batch["earlier_turns_mask"] = pad([_earlier_turns(e) for e in examples], 0)
        return batch


def _packed_mask(example: Example, completion_only: bool) -> list[int]:
    """An example's loss mask inside a packed row. Its first token is never a target: in a
    packed row it would be "predicted" from the previous example's last token."""
    prompt = _prompt_loss_mask(example) if completion_only else [1] * len(example["prompt_ids"])
    mask = prompt + [1] * len(example["completion_ids"])
    if mask:
        mask[0] = 0
    return mask


class PackingCollator:
    """Padding-free packing: examples concatenated into rows, without an attention mask.

    Each example's ``position_ids`` restart at 0; transformers models detect the packed
    sequences from that (when ``attention_mask`` is absent) and keep attention inside each
    example, so the result equals the padded batch token for token. Call the model with
    ``use_cache=False``: transformers only looks for packed sequences when there is neither an
    attention mask nor a KV cache (and eval-mode models build a cache by default). With ``max_length``,
    consecutive examples are packed greedily into rows of at most ``max_length`` tokens and
    the rows are right-padded; the padding is a sequence of its own (positions from 0) that
    ``completion_mask`` excludes.

    Returns ``input_ids``, ``position_ids``, ``completion_mask`` (and ``earlier_turns_mask``, as in
    :class:`SFTCollator`): ``(rows, seq)``, one row when ``max_length`` is None.

    Args:
        pad_token_id: the id padding is filled with.
        completion_only_loss: as in :class:`SFTCollator`.
        max_length: the longest packed row; None packs the whole batch into one row.
    """

    def __init__(self, pad_token_id: int, completion_only_loss: bool = True, max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss
        self.max_length = max_length

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        rows: list[list[Example]] = [[]]
        used = 0
        for e in examples:
            n = len(e["prompt_ids"]) + len(e["completion_ids"])
            if self.max_length is not None and rows[-1] and used + n > self.max_length:
                rows.append([])
                used = 0
            rows[-1].append(e)
            used += n
        ids, positions, masks = [], [], []
        for row in rows:
            ids.append([t for e in row for t in e["prompt_ids"] + e["completion_ids"]])
            positions.append([i for e in row for i in range(len(e["prompt_ids"]) + len(e["completion_ids"]))])
            masks.append([m for e in row for m in _packed_mask(e, self.completion_only_loss)])
        width = max(len(r) for r in ids)
        positions = [p + list(range(width - len(p))) for p in positions]
        batch = {"input_ids": pad(ids, self.pad_token_id), "position_ids": pad(positions, 0),
                 "completion_mask": pad(masks, 0)}
        if _trains_earlier_turns(examples, self.completion_only_loss):
            batch["earlier_turns_mask"] = pad([[m for e in row for m in _earlier_turns(e)] for row in rows], 0)
        return batch


class UnpairedCollator:
    """Unpaired (KTO) examples plus the mismatched batch KTO estimates its KL term from.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: ``(batch, seq)``;
    ``labels``: ``(batch,)`` bool (True = desirable); ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_completion_mask``: ``(batch, kl_seq)``, row ``i`` is prompt
    ``i`` with completion ``(i + 1) % batch``, or with the example's own ``kl_completion_ids`` when it
    carries them (a pairing fixed in the data, which precomputed reference log-probs of the KL rows
    need); ``ref_logps`` and ``ref_kl_logps``: ``(batch,)`` float, when the examples carry
    precomputed reference log-probs.

    Args:
        pad_token_id: the id padding is filled with.
        max_length: the longest KL row: a mismatched completion is cut on the right to fit after its
            prompt (as TRL's collator cuts it), since a long prompt with another row's long completion
            may exceed what tokenization bounded each row to, and the model's positions. None: no limit.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["completion_ids"] for e in examples]
        batch = _sequences(prompts, completions, self.pad_token_id)
        if "kl_completion_ids" in examples[0]:
            mismatched = [e["kl_completion_ids"] for e in examples]
        elif len(examples) < 2:
            # One row would be paired with its own completion: the "KL" would be its matched log-ratio.
            raise ValueError(f"a KTO batch needs at least 2 rows to pair prompts with other rows' completions, "
                             f"got {len(examples)}: use batch_size >= 2 (UnpairedDataModule drops a 1-row remainder)")
        else:
            mismatched = completions[1:] + completions[:1]
        if self.max_length is not None:
            mismatched = [c[: max(self.max_length - len(p), 0)] for p, c in zip(prompts, mismatched)]
        kl = _sequences(prompts, mismatched, self.pad_token_id)
        batch["labels"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        # Reference log-probs precomputed once by a method travel with their examples.
        for key in ("ref_logps", "ref_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch


class PromptCollator:
    """Prompts for generation, left-padded so every row ends where generation starts.

    Returns ``prompt_input_ids``, ``prompt_attention_mask``: ``(batch, seq)``;
    ``prompts``: the rendered prompt strings; ``raw_prompts``: the original ``prompt``
    fields (strings or message lists), e.g. for reward functions.

    Args:
        pad_token_id: the id padding is filled with.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict:
        ids = [e["prompt_ids"] for e in examples]
        return {
            "prompt_input_ids": pad(ids, self.pad_token_id, left=True),
            "prompt_attention_mask": pad([[1] * len(s) for s in ids], 0, left=True),
            "prompts": [e["prompt_text"] for e in examples],
            "raw_prompts": [e["prompt"] for e in examples],
        }
