"""Build the embedded toy assets: tokenizer, datasets and a pre-trained tiny base model.

    python -m lit_rlhf.toy.build assets/toy

Deterministic for a given seed; the repository ships its output under ``assets/toy`` so
that the quickstart and the tests need neither a network nor this build.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lit_rlhf import toy

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
# Roles become words, so the prompt/response boundary of a rendered chat is a token boundary.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(toy.vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL[4:]),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_datasets(out: Path, seed: int = 0) -> None:
    """Prompt, preference, unpaired and SFT splits over disjoint train / held-out prompts."""
    train_prompts, val_prompts = toy.split_prompts(seed)
    for split, prompts, n in (("train", train_prompts, 512), ("val", val_prompts, 96)):
        rng = random.Random(f"{seed}-{split}")
        prefs, unpaired, sft = [], [], []
        while len(prefs) < n:
            prompt = rng.choice(prompts)
            a = toy.sample_completion(rng, rng.uniform(-1, 1))
            b = toy.sample_completion(rng, rng.uniform(-1, 1))
            if toy.score(a) == toy.score(b):
                continue
            chosen, rejected = (a, b) if toy.score(a) > toy.score(b) else (b, a)
            prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        for _ in range(n):
            prompt = rng.choice(prompts)
            completion = toy.sample_completion(rng, rng.uniform(-1, 1))
            unpaired.append({"prompt": prompt, "completion": completion, "label": toy.score(completion) > 0})
            # Demonstrations lean positive: SFT moves the model towards them.
            sft.append({"prompt": prompt, "completion": toy.sample_completion(rng, 0.7)})
        _write_jsonl(out / f"preference_{split}.jsonl", prefs)
        _write_jsonl(out / f"unpaired_{split}.jsonl", unpaired)
        _write_jsonl(out / f"sft_{split}.jsonl", sft)
        _write_jsonl(out / f"prompt_{split}.jsonl", [{"prompt": p} for p in prompts])


def pretrain_base(tokenizer, seed: int = 0, steps: int = 1500, hidden_size: int = 64, num_layers: int = 2):
    """A tiny Llama trained as a plain LM on neutral-sentiment toy text, so it is fluent but unaligned."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, hidden_size, num_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train_prompts, _ = toy.split_prompts(seed)
    model.train()
    for _ in range(steps):
        texts = [f"{rng.choice(train_prompts)} {toy.sample_completion(rng, rng.uniform(-1, 1))} </s>" for _ in range(32)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    return model, loss.item()


def build(out: Path, seed: int = 0) -> None:
    tokenizer = build_tokenizer()
    model, final_loss = pretrain_base(tokenizer, seed)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    build_datasets(out / "data", seed)
    print(f"wrote {out} (base LM final loss {final_loss:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("assets/toy"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
