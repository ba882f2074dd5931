"""One LightningModule per method, each borrowing its networks from the AdapterBank."""

from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.dpo import CPO, DPO, PreferenceMethod, SimPO
from lit_rlhf.methods.export import ExportOnFitEnd
from lit_rlhf.methods.gkd import GKD
from lit_rlhf.methods.kto import KTO
from lit_rlhf.methods.online import (
    AdaptiveKLController,
    FixedKLController,
    MiniBatch,
    OnlineMethod,
    PolicyOutput,
    ScoredRollout,
)
from lit_rlhf.methods.ppo import PPO
from lit_rlhf.methods.reward import Reward, RewardScorer, score_texts
from lit_rlhf.methods.sft import SFT

__all__ = [
    "AdaptiveKLController",
    "BankMethod",
    "CPO",
    "DPO",
    "ExportOnFitEnd",
    "FixedKLController",
    "GKD",
    "KTO",
    "MiniBatch",
    "OnlineMethod",
    "PPO",
    "PolicyOutput",
    "PreferenceMethod",
    "Reward",
    "RewardScorer",
    "SFT",
    "ScoredRollout",
    "SimPO",
    "score_texts",
]
