"""Build the embedded toy assets: tokenizer, datasets, a pre-trained tiny base model and a GKD teacher.

    python -m lit_rlhf.toy.build assets/toy
    python -m lit_rlhf.toy.build assets/toy --teacher-only   # the teacher alone (assets/toy/teacher)

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


def pretrain_base(
    tokenizer,
    seed: int = 0,
    steps: int = 1500,
    hidden_size: int = 64,
    num_layers: int = 2,
    sentiment: float | None = None,
):
    """A tiny Llama trained as a plain LM on toy text, by default of neutral sentiment (each
    completion's sentiment uniform in [-1, 1]), so it is fluent but unaligned; ``sentiment``
    fixes the sentiment every completion is sampled with instead."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, hidden_size, num_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train_prompts, _ = toy.split_prompts(seed)
    model.train()
    for _ in range(steps):
        texts = [
            f"{rng.choice(train_prompts)} "
            f"{toy.sample_completion(rng, rng.uniform(-1, 1) if sentiment is None else sentiment)} </s>"
            for _ in range(32)
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    return model, loss.item()


def build_teacher(tokenizer, seed: int = 0, steps: int = 1500, hidden_size: int = 128, num_layers: int = 3):
    """The distillation teacher (GKD, KD, SeqKD): a larger tiny Llama with the base's tokenizer,
    pre-trained on positive-leaning toy text (sentiment 0.7, like the SFT demonstrations), so it
    differs from the neutral base and distilling from it moves a student measurably."""
    return pretrain_base(tokenizer, seed, steps, hidden_size, num_layers, sentiment=0.7)


def save_teacher(out: Path, seed: int = 0) -> float:
    """Build the teacher alone and write it (model and tokenizer) to ``out / "teacher"``."""
    tokenizer = build_tokenizer()
    model, final_loss = build_teacher(tokenizer, seed)
    model.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    return final_loss


def build(out: Path, seed: int = 0) -> None:
    tokenizer = build_tokenizer()
    model, final_loss = pretrain_base(tokenizer, seed)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    build_datasets(out / "data", seed)
    teacher_loss = save_teacher(out, seed)
    print(f"wrote {out} (base LM final loss {final_loss:.3f}, teacher LM final loss {teacher_loss:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("assets/toy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-only", action="store_true", help="build only the GKD teacher (<out>/teacher)")
    args = parser.parse_args()
    if args.teacher_only:
        print(f"wrote {args.out / 'teacher'} (teacher LM final loss {save_teacher(args.out, args.seed):.3f})")
        return
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
