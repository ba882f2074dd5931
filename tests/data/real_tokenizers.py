"""Small offline tokenizers with the conventions of real model families, for tests.

The toy tokenizer (assets/toy) is word-level with a template whose turn end is its EOS, so it
cannot show what real families do differently: a template that writes ``{{ bos_token }}`` while
the tokenizer also adds one (Llama-3, Gemma, Mistral), no BOS at all (Qwen2.5, GPT-2), an
end-of-turn token that is not the tokenizer's EOS (Llama-3 ``<|eot_id|>`` with the original
release's EOS ``<|end_of_text|>``, Gemma ``<end_of_turn>``, ChatML ``<|im_end|>`` on the Qwen2.5 base
tokenizer whose EOS is ``<|endoftext|>``), pad == EOS (GPT-2, Qwen2.5 base, Llama-3 after
``load_tokenizer``'s pad rule), byte-level BPE that merges a leading space into the next word,
and a default system prompt the template injects (Qwen2.5).

Each family here is a BPE trained in milliseconds on a small corpus (byte-level like GPT-2,
Llama-3 and Qwen2.5, or sentencepiece-style with ``▁`` like Llama-2, Mistral and Gemma), with the
family's special tokens under their real names, its bos/eos/pad/unk, whether it adds a BOS
itself, and the published ``chat_template`` of its instruct model (written out from the models'
``tokenizer_config.json``; the tool-calling branches of Qwen2.5's are left out, they need
``tools``). The tokenizer is saved and loaded back through ``lit_rlhf.models.load_tokenizer``, so
it carries the pad rule real runs apply.

``build_family(name, root)`` -> the loaded tokenizer; ``FAMILIES`` lists the names.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lit_rlhf.models import BankSpec, load_tokenizer

CORPUS = [
    "the movie was great fun and the actors were good .",
    "what is the capital of france ? the capital of france is paris .",
    "hello there , how are you today ? i am fine , thank you .",
    "Question : what is two plus two ? Answer : four .",
    "please write a short poem about the sea and the sky .",
    "You are a helpful assistant . Be kind and answer well .",
    "a cat sat on the mat while the dog slept in the sun .",
    "numbers like 12 and 345 appear in text : 6789 !",
    "[INST] say hi [/INST] hi </s>",
]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

#: name -> how the family tokenizes: ``byte_level`` (else ``▁`` sentencepiece style, ``prefix_space``
#: saying whether a space is prepended to the text), its special tokens (bos, eos, pad, unk, others),
#: whether the tokenizer adds its BOS itself, the chat template, and its end-of-turn token.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(byte_level=True, bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None,
                 extra=[], adds_bos=False, template=None, end_of_turn=None),
    "llama3": dict(byte_level=True, bos="<|begin_of_text|>", eos="<|end_of_text|>", unk=None, pad=None,
                   extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], adds_bos=True,
                   template=LLAMA3_TEMPLATE, end_of_turn="<|eot_id|>"),
    "qwen2.5": dict(byte_level=True, bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>",
                    extra=["<|im_start|>"], adds_bos=False, template=QWEN25_TEMPLATE, end_of_turn="<|im_end|>"),
    # The base model's tokenizer ships the same ChatML template, with EOS (and pad) <|endoftext|>.
    "qwen2.5_base": dict(byte_level=True, bos=None, eos="<|endoftext|>", unk=None, pad="<|endoftext|>",
                         extra=["<|im_start|>", "<|im_end|>"], adds_bos=False, template=QWEN25_TEMPLATE,
                         end_of_turn="<|im_end|>"),
    "gemma2": dict(byte_level=False, prefix_space=False, bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>",
                   extra=["<start_of_turn>", "<end_of_turn>"], adds_bos=True, template=GEMMA_TEMPLATE,
                   end_of_turn="<end_of_turn>"),
    "mistral": dict(byte_level=False, prefix_space=True, bos="<s>", eos="</s>", unk="<unk>", pad=None, extra=[],
                    adds_bos=True, template=MISTRAL_TEMPLATE, end_of_turn="</s>"),
    "llama2": dict(byte_level=False, prefix_space=True, bos="<s>", eos="</s>", unk="<unk>", pad=None, extra=[],
                   adds_bos=True, template=LLAMA2_TEMPLATE, end_of_turn="</s>"),
}

#: The families with a chat template.
CHAT_FAMILIES = [name for name, f in FAMILIES.items() if f["template"]]


def _specials(family: dict) -> list[str]:
    named = [family[k] for k in ("bos", "eos", "pad", "unk") if family[k]]
    return list(dict.fromkeys(named + family["extra"]))


def _backend(family: dict) -> Tokenizer:
    """A BPE trained on ``CORPUS`` with the family's pre-tokenisation, decoder and BOS rule."""
    tok = Tokenizer(models.BPE(unk_token=family["unk"] if not family["byte_level"] else None))
    specials = _specials(family)
    if family["byte_level"]:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = "first" if family["prefix_space"] else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set(string.printable.replace(" ", "▁")) - set("\t\r\x0b\x0c"))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if family["adds_bos"]:
        bos = family["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    elif family["byte_level"]:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_family(name: str, root: str | Path):
    """The tokenizer of family ``name``, saved under ``root/name`` and loaded back with ``load_tokenizer``."""
    family = FAMILIES[name]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_backend(family),
        bos_token=family["bos"], eos_token=family["eos"], pad_token=family["pad"], unk_token=family["unk"],
        # Llama-3 lists its turn tokens only as special added tokens, not as additional special tokens.
        additional_special_tokens=(family["extra"] or None) if name != "llama3" else None,
    )
    if family["template"]:
        fast.chat_template = family["template"]
    out = Path(root) / name
    fast.save_pretrained(out)
    return load_tokenizer(BankSpec(model=str(out)))
