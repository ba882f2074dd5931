"""The longest sequence a run will feed its model, checked against the model's positions before any
weights load.

Past its last position a model with learned absolute positions (GPT-2, OPT) fails with an
``IndexError`` deep in its forward, at whichever step first meets the long row; a rotary model
(Llama, Qwen, Mistral, Gemma) runs on at positions it was never trained at, and its log-probs are
silently off. Either way the data and the settings already tell, so the run stops before it starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import AutoConfig

from lit_rlhf.errors import InvalidArgument

#: Example keys holding token ids that follow the prompt (see ``lit_rlhf.data.tokenize``).
COMPLETION_KEYS = ("completion_ids", "chosen_ids", "rejected_ids")


def position_limit(config) -> tuple[str, int] | None:
    """``(config key, number of positions)`` of a transformers config, ``None`` when it states none.

    A rope scaling ``factor`` (YaRN, linear, dynamic) stretches the positions the model reads well:
    Qwen2.5 ships ``max_position_embeddings: 32768`` and asks users to add YaRN with factor 4.
    ALiBi models have no positions to run out of: BLOOM states none, and Falcon-RW (``alibi: true``) never
    reads the ``max_position_embeddings`` its config class fills in (2048, which refused longer runs).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "alibi", False) is True:
        return None
    key = "n_positions" if "n_positions" in vars(config) else "max_position_embeddings"
    limit = getattr(config, key, None)
    if not isinstance(limit, int):
        return None
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and isinstance(scaling.get("factor"), (int, float)):
        original = scaling.get("original_max_position_embeddings") or limit
        limit = max(limit, int(original * scaling["factor"]))
    return key, limit


def longest_sequence(examples: Iterable[dict], new_tokens: int) -> tuple[int, int]:
    """``(longest prompt + what follows it, that row's prompt length)`` over tokenised ``examples``: the
    longest completion of the row, or ``new_tokens`` generated after it, whichever is longer."""
    longest, prompt = 0, 0
    for example in examples:
        follows = max([new_tokens] + [len(example[key]) for key in COMPLETION_KEYS if key in example])
        if len(example["prompt_ids"]) + follows > longest:
            longest, prompt = len(example["prompt_ids"]) + follows, len(example["prompt_ids"])
    return longest, prompt


def check_positions(models: Sequence[tuple[str, str, bool]], examples: Iterable[dict], *, new_tokens: int) -> None:
    """Refuse a run whose longest sequence is past a model's last position.

    Args:
        models: ``(role, model directory or hub id, trust_remote_code)`` of each model that reads the rows.
        examples: every tokenised example the run trains or validates on.
        new_tokens: tokens sampled after each prompt (``sampling.max_new_tokens``), 0 when nothing is generated.
    """
    longest, prompt = longest_sequence(examples, new_tokens)
    for role, model, trust_remote_code in models:
        found = position_limit(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
        if found is None or longest <= found[1]:
            continue
        key, limit = found
        problem = (f"the longest sequence of this run is {longest} tokens, past the {limit} positions of the {role} "
                   f"model {model!r} ({key}={limit}): a model with learned positions fails there with an index error, "
                   "a rotary one reads positions it was never trained at")
        if new_tokens and longest == prompt + new_tokens:
            raise InvalidArgument("sampling", f"{problem}. It is a {prompt}-token prompt + sampling.max_new_tokens="
                                  f"{new_tokens}: lower max_new_tokens, or cap the prompts with the data module's "
                                  "max_prompt_length (truncation: truncate keeps their end)")
        raise ValueError(f"{problem}. It is a {prompt}-token prompt and its completion: cap the rows with the data "
                         "module's max_length (data.init_args.max_length; truncation: truncate cuts the completion and "
                         "keeps the end of the prompt)")
