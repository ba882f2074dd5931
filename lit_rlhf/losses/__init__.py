"""Loss functions of lit_rlhf: pure functions of torch tensors, one family per module.

- :mod:`.logprobs`: token / sequence log-probs and entropies without a full float32 log-softmax
- :mod:`.preference`: DPO and variants, SimPO, CPO, ORPO
- :mod:`.reward`: Bradley-Terry reward-model loss
- :mod:`.kto`: KTO
- :mod:`.policy_gradient`: PPO, GAE, RLOO, GRPO and helpers
- :mod:`.distill`: generalised JSD for GKD
"""

from lit_rlhf.losses.distill import JSD_REDUCTIONS, generalized_jsd_loss
from lit_rlhf.losses.kto import KTOLoss, kto_kl_estimate, kto_loss
from lit_rlhf.losses.logprobs import SequenceLogps, entropy_from_logits, sequence_logps, token_logps
from lit_rlhf.losses.policy_gradient import (
    GRPO_LOSS_TYPES,
    KL_PENALTY_KINDS,
    Advantages,
    GRPOLoss,
    GroupAdvantages,
    PolicyLoss,
    ValueLoss,
    gae_advantages,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)
from lit_rlhf.losses.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    PreferenceLoss,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from lit_rlhf.losses.reward import RewardLoss, bradley_terry_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "JSD_REDUCTIONS",
    "KL_PENALTY_KINDS",
    "Advantages",
    "GRPOLoss",
    "GroupAdvantages",
    "KTOLoss",
    "PolicyLoss",
    "PreferenceLoss",
    "RewardLoss",
    "SequenceLogps",
    "ValueLoss",
    "bradley_terry_loss",
    "cpo_loss",
    "dpo_loss",
    "entropy_from_logits",
    "generalized_jsd_loss",
    "gae_advantages",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
    "whiten",
]
