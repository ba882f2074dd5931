"""Tiny random models of the transformers families users bring, built offline from a config.

One Llama never shows what breaks on GPT-2 (Conv1D layers, absolute positions, dropout 0.1 in
its config), GPT-NeoX (a ``gpt_neox`` trunk), OPT (float dropout rates read at call time, a
learned position offset), Gemma 2 (soft-capped logits, tied embeddings, sliding windows), Gemma 3
(sliding and full layers with their own rope; from 4B up released with a vision tower, ``MULTIMODAL``),
Phi-3 (fused projections), BLOOM and Falcon-RW
(ALiBi biases from the attention mask), Falcon (dropout read from its config, layers bitsandbytes
does not quantize), Cohere and Granite (logits scaled after the head), Phi-2 and GPT-J (partial
rotary, an LM head with a bias), or the mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE: experts stored as 3-D parameters, not linear layers; a top-k router; Mixtral's router
jitter noise in training; Llama 4: a sigmoid router with no load-balancing loss). Each model here
speaks the toy tokenizer's vocabulary, so every
method and config runs on it unchanged: ``--model.init_args.bank.model <dir>``.

    python -m lit_rlhf.toy.families OUT_DIR        # one directory per family
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from lit_rlhf.models import BankSpec, load_tokenizer

TOY_TOKENIZER = "assets/toy/base"
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 32, 2, 4, 2, 64, 128
#: Two experts per token (of four, each 16 wide).
EXPERTS = dict(num_experts_per_tok=2)

#: family -> config fields of a tiny model (vocabulary and special ids are added from the tokenizer); the
#: family is the config's model_type unless a ``model_type`` field names it (a variant of one model type).
FAMILIES: dict[str, dict] = {
    "llama": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS),
    "qwen2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                  tie_word_embeddings=True),
    "qwen3": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, head_dim=8,
                  num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                  tie_word_embeddings=True),
    "mistral": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                    sliding_window=16),
    "gemma2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, head_dim=8,
                   num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                   sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   query_pre_attn_scalar=8),
    "phi3": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                 original_max_position_embeddings=POSITIONS, resid_pdrop=0.1, embd_pdrop=0.1),
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS),
    "gpt_neox": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN, max_position_embeddings=POSITIONS, rotary_pct=0.5,
                     hidden_dropout=0.1, attention_dropout=0.1),
    "opt": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN, dropout=0.1,
                attention_dropout=0.1),
    # ALiBi biases built from the attention mask, no position ids: no positions table, no packing.
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.1, attention_dropout=0.1),
    # Falcon 40B/180B's layout (grouped KV, rotary) and Falcon-RW's (ALiBi, one KV head, sequential blocks).
    "falcon": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                   new_decoder_architecture=True, max_position_embeddings=POSITIONS, hidden_dropout=0.1,
                   attention_dropout=0.1),
    "falcon_alibi": dict(model_type="falcon", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         alibi=True, multi_query=True, parallel_attn=False, bias=True,
                         max_position_embeddings=POSITIONS),
    # Gemma 3's text model: sliding and full layers with their own rope, q/k norms, no soft-capping (as shipped).
    "gemma3_text": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, head_dim=8,
                        num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=8),
    # Logits multiplied by logit_scale after the head (tied): a fused head would skip it.
    "cohere": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                   logit_scale=0.25),
    # Logits divided by logits_scaling; embeddings, residuals and attention scaled by multipliers.
    "granite": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                    logits_scaling=4.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.125, attention_dropout=0.1),
    # Phi-2: partial rotary, an LM head with a bias, three dropout rates.
    "phi": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                max_position_embeddings=POSITIONS, partial_rotary_factor=0.5, resid_pdrop=0.1, embd_pdrop=0.1,
                attention_dropout=0.1),
    "gptj": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS, rotary_dim=4,
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    "stablelm": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                     partial_rotary_factor=0.25, hidden_dropout=0.1, attention_dropout=0.1),
    "olmo2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                  attention_dropout=0.1),
    # Mixtral's training-mode router jitter (multiplicative noise on the router's input) is on, as dropout is above.
    "mixtral": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, intermediate_size=16, max_position_embeddings=POSITIONS,
                    num_local_experts=4, router_jitter_noise=0.1, **EXPERTS),
    # A shared expert beside the routed ones, with its own sigmoid gate (a linear layer).
    "qwen2_moe": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=FFN, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, max_position_embeddings=POSITIONS, num_experts=4,
                      **EXPERTS),
    "qwen3_moe": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, head_dim=8,
                      num_key_value_heads=KV_HEADS, intermediate_size=FFN, moe_intermediate_size=16,
                      max_position_embeddings=POSITIONS, num_experts=4, **EXPERTS),
    "olmoe": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=16, max_position_embeddings=POSITIONS,
                  num_experts=4, **EXPERTS),
    # Llama 4's text decoder: a router that is an nn.Linear returning (scores, logits), sigmoid routing, a shared
    # expert, layers without rope; MoE on every layer (the release alternates). No load-balancing loss in transformers.
    "llama4": dict(model_type="llama4_text", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, head_dim=8, intermediate_size=16, intermediate_size_mlp=FFN,
                   max_position_embeddings=POSITIONS, num_local_experts=4, num_experts_per_tok=1,
                   interleave_moe_layer_step=1),
}

#: The mixture-of-experts families of ``FAMILIES``.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama4")


#: family -> a multimodal checkpoint around the text family's decoder (``text``) and a tiny vision tower, saved as
#: the release is (Gemma 3 4B/12B/27B: ``Gemma3ForConditionalGeneration``). The image token sits past the text
#: vocabulary, as Gemma 3's soft image token does: the logits are one wider than the tokenizer.
MULTIMODAL: dict[str, dict] = {
    "gemma3": dict(text="gemma3_text", mm_tokens_per_image=1,
                   vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14)),
}


def build_tiny(family: str, out: str | Path, *, seed: int = 0) -> Path:
    """Save a random tiny ``family`` model with the toy tokenizer to ``out`` (safetensors)."""
    tokenizer = load_tokenizer(BankSpec(model=TOY_TOKENIZER))
    fields = dict(FAMILIES[family])
    config = AutoConfig.for_model(
        fields.pop("model_type", family),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    return _save(AutoModelForCausalLM.from_config(config), tokenizer, out)


def build_tiny_multimodal(family: str, out: str | Path, *, seed: int = 0) -> Path:
    """Save a random tiny multimodal ``family`` checkpoint (``MULTIMODAL``) with the toy tokenizer to ``out``."""
    tokenizer = load_tokenizer(BankSpec(model=TOY_TOKENIZER))
    fields = dict(MULTIMODAL[family])
    text = fields.pop("text")
    image_token = len(tokenizer)
    text_config = dict(FAMILIES[text], vocab_size=image_token + 1, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(family, text_config=text_config, image_token_index=image_token,
                                  boi_token_index=tokenizer.bos_token_id, eoi_token_index=tokenizer.eos_token_id,
                                  **fields)
    torch.manual_seed(seed)
    return _save(AutoModelForImageTextToText.from_config(config), tokenizer, out)


def _save(model, tokenizer, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m lit_rlhf.toy.families OUT_DIR")
    for family in FAMILIES:
        print(build_tiny(family, Path(argv[0]) / family))
    for family in MULTIMODAL:
        print(build_tiny_multimodal(family, Path(argv[0]) / f"{family}_multimodal"))


if __name__ == "__main__":
    main()
