"""How many positions a model reads well, from its transformers config (``lit_rlhf.methods.lengths`` checks a
run's rows against it before any weights load; the reward scorer and ``generate`` keep the end of what would
run past it).

The rule, per rope type (as ``transformers.modeling_rope_utils`` reads each; the configs as released):

- learned tables (GPT-2 ``n_positions``, OPT) and plain rope: the config's ``max_position_embeddings``.
- ``yarn``, ``longrope``: ``original_max_position_embeddings x factor`` (transformers' default factor is
  ``max_position_embeddings / original``), or the config's own length if longer. Qwen2.5 ships 32768 and
  asks users to add YaRN factor 4 over 32768: 131072; DeepSeek-V2/V3 4096 x 40 = 163840 (``mscale`` scales
  attention, not length); Phi-3/3.5 (no factor, long/short factor lists): 131072.
- ``linear``, ``dynamic``: ``max_position_embeddings x factor``; they are added by users over the length the
  model was trained at (Vicuna v1.5 16k: 4096 x linear 4).
- ``llama3``: ``max_position_embeddings``. Its factor divides only the low frequencies and is no length
  ratio (transformers requires ``original < max_position_embeddings``, the config states the length):
  Llama 3.2's factor 32 over 8192 would claim 262144 positions, its card says 128K = 131072.
- rope per layer type (Gemma 3's ``{"full_attention": {linear, factor 8}, "sliding_attention": {...}}``):
  ``max_position_embeddings``, which Gemma 3 already states at its stretched 131072 (its card's 128K); the
  full-attention factor 8 on top would claim a million.
- ALiBi (BLOOM, Falcon-RW ``alibi: true``): ``None``, no positions to run out of; Falcon-RW never reads the
  ``max_position_embeddings`` its config class fills in (2048, which refused longer runs).

Too low a limit refuses runs the model reads well; too high lets a rotary model run silently at positions it
was never trained at.
"""

from __future__ import annotations

STRETCH_OVER_ORIGINAL = ("yarn", "longrope")
STRETCH_OVER_STATED = ("linear", "dynamic")


def position_limit(config) -> tuple[str, int] | None:
    """``(config key, number of positions)`` of a transformers config, ``None`` when it states none (see the
    module docstring for the rule)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "alibi", False) is True:
        return None
    key = "n_positions" if "n_positions" in vars(config) else "max_position_embeddings"
    limit = getattr(config, key, None)
    if not isinstance(limit, int):
        return None
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return key, max(limit, stretched(scaling, limit)) if isinstance(scaling, dict) else limit


def stretched(scaling: dict, stated: int) -> int:
    """Positions a flat rope-scaling dict reads well over a config that states ``stated`` (a nested, per layer
    type dict has no ``rope_type`` at its top: ``stated``)."""
    rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if rope_type in STRETCH_OVER_ORIGINAL:
        original = scaling.get("original_max_position_embeddings") or stated
        return int(original * factor) if isinstance(factor, (int, float)) else stated
    if rope_type in STRETCH_OVER_STATED and isinstance(factor, (int, float)):
        return int(stated * factor)
    return stated
