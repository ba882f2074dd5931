"""How many positions a model reads well, from its transformers config (``lit_rlhf.methods.lengths`` checks a
run's rows against it before any weights load; the reward scorer and ``generate`` keep the end of what would
run past it)."""

from __future__ import annotations


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
