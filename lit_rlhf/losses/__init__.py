"""Loss functions of lit_rlhf: pure functions of torch tensors, one family per module.

- :mod:`.logprobs`: token / sequence log-probs and entropies without a full float32 log-softmax
- :mod:`.preference`: DPO and variants, SimPO, CPO, ORPO
- :mod:`.reward`: Bradley-Terry reward-model loss
- :mod:`.sft`: the supervised (causal LM) loss over completion tokens
- :mod:`.kto`: KTO
- :mod:`.policy_gradient`: PPO, GAE, RLOO, GRPO and helpers
- :mod:`.distill`: generalised JSD for GKD
"""

from lit_rlhf.losses.distill import JSD_REDUCTIONS, generalized_jsd_loss
from lit_rlhf.losses.kto import KTO_LOSS_TYPES, KTOLoss, kto_kl_estimate, kto_loss
from lit_rlhf.losses.logprobs import (
    SequenceLogps,
    completion_token_logps,
    entropy_from_logits,
    log_sum_squared_probs,
    sequence_logps,
    token_logps,
)
from lit_rlhf.losses.policy_gradient import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_PENALTY_KINDS,
    SCALE_REWARDS,
    Advantages,
    GRPOLoss,
    GroupAdvantages,
    PolicyLoss,
    ValueLoss,
    gae_advantages,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    importance_log_ratio,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    resolve_scale_rewards,
    rloo_advantages,
    whiten,
)
from lit_rlhf.losses.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    PreferenceLoss,
    check_beta,
    check_label_smoothing,
    check_loss_type,
    cpo_loss,
    dpo_loss,
    f_divergence_scores,
    length_desensitized_logps,
    orpo_loss,
    simpo_loss,
    wpo_weights,
)
from lit_rlhf.losses.reward import RewardLoss, bradley_terry_loss
from lit_rlhf.losses.sft import completion_nll

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "JSD_REDUCTIONS",
    "KL_PENALTY_KINDS",
    "KTO_LOSS_TYPES",
    "SCALE_REWARDS",
    "Advantages",
    "GRPOLoss",
    "GroupAdvantages",
    "KTOLoss",
    "PolicyLoss",
    "PreferenceLoss",
    "check_beta",
    "check_label_smoothing",
    "check_loss_type",
    "RewardLoss",
    "SequenceLogps",
    "ValueLoss",
    "bradley_terry_loss",
    "completion_nll",
    "completion_token_logps",
    "cpo_loss",
    "dpo_loss",
    "entropy_from_logits",
    "f_divergence_scores",
    "generalized_jsd_loss",
    "gae_advantages",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "importance_log_ratio",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "length_desensitized_logps",
    "log_sum_squared_probs",
    "masked_mean",
    "masked_var",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "resolve_scale_rewards",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
    "whiten",
    "wpo_weights",
]
