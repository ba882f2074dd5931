"""Rollouts for the online methods: generation engines and reward sources.

- :mod:`.engine`: ``SamplingConfig``, the ``Rollout`` tuple, the ``RolloutEngine`` protocol and
  its registry (``hf``: transformers ``generate``; ``hf_static``: our decode loop over a static KV
  cache, compiled on CUDA; ``hf_compiled``: the same compiled on every device; ``auto``: ``hf_static`` on CUDA,
  an eager ``hf_static`` on CPU, measured the faster there)
- :mod:`.rewards`: ``RewardSpec`` (config), the sources (bank adapter, separate model, Python
  function) and ``Rewards``, their weighted, normalised, clipped combination; ``RewardScorer``
  (and ``score_texts``), the one loader of a reward model saved on disk
"""

from lit_rlhf.rollout.engine import (
    ENGINES,
    AutoEngine,
    CompiledStaticEngine,
    HFGenerateEngine,
    HFStaticCacheEngine,
    Rollout,
    RolloutEngine,
    SamplingConfig,
    build_engine,
    register_engine,
    truncate_at_stop,
)
from lit_rlhf.rollout.rewards import (
    AdapterReward,
    FunctionReward,
    ModelReward,
    Normalizer,
    RewardError,
    RewardOutput,
    RewardRequest,
    RewardScorer,
    RewardSource,
    RewardSpec,
    Rewards,
    build_source,
    load_function,
    score_texts,
)

__all__ = [
    "ENGINES",
    "AdapterReward",
    "AutoEngine",
    "CompiledStaticEngine",
    "FunctionReward",
    "HFGenerateEngine",
    "HFStaticCacheEngine",
    "ModelReward",
    "Normalizer",
    "RewardError",
    "RewardOutput",
    "RewardRequest",
    "RewardScorer",
    "RewardSource",
    "RewardSpec",
    "Rewards",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "build_engine",
    "build_source",
    "load_function",
    "register_engine",
    "score_texts",
    "truncate_at_stop",
]
