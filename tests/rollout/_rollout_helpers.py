"""Plain helpers of the rollout and online-method tests (imported by name, not a fixture)."""

import torch

from lit_rlhf.rollout import truncate_at_stop


def make_rollout(tokenizer, prompts, completions, ended=None):
    """A Rollout of the given texts on ``tokenizer``: left-padded prompts, responses (+ EOS where ``ended``)."""
    ended = [True] * len(prompts) if ended is None else ended
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if e else [])
            for c, e in zip(completions, ended)]
    width = max(len(r) for r in rows)
    response = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        response[i, : len(r)] = torch.tensor(r)
    rollout = truncate_at_stop(enc["input_ids"], enc["attention_mask"], response, [tokenizer.eos_token_id],
                               tokenizer.pad_token_id)
    # Rows without an EOS were padded on the right: mask their padding (a real engine stops at max_new_tokens).
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return rollout._replace(response_mask=mask, ended=torch.tensor(ended))


def gpt2_reward_model(out, tokenizer, positions: int):
    """A random one-label GPT-2 sequence classifier with ``positions`` learned positions and ``tokenizer``, saved to ``out``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
