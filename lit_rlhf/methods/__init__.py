"""One LightningModule per method, each borrowing its networks from the AdapterBank."""

from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.best_of_n import BestOfN, generate_best_of_n, write_jsonl_atomic
from lit_rlhf.methods.checkpoints import AtomicCheckpointIO, CheckpointWriteError, ResumableCheckpoint
from lit_rlhf.methods.dpo import CPO, DPO, ORPO, PreferenceMethod, SimPO
from lit_rlhf.methods.export import ExportOnFitEnd
from lit_rlhf.methods.gkd import GKD
from lit_rlhf.methods.grpo import GRPO
from lit_rlhf.methods.kto import KTO
from lit_rlhf.methods.kl_control import AdaptiveKLController, FixedKLController
from lit_rlhf.methods.online import MiniBatch, OnlineMethod, PolicyOutput, ScoredRollout, UpdateArgs
from lit_rlhf.methods.online_dpo import OnlineDPO
from lit_rlhf.methods.ppo import PPO
from lit_rlhf.methods.reward import Reward, RewardModeling
from lit_rlhf.methods.rloo import RLOO
from lit_rlhf.methods.sft import SFT

__all__ = [
    "AdaptiveKLController",
    "AtomicCheckpointIO",
    "BankMethod",
    "BestOfN",
    "CPO",
    "CheckpointWriteError",
    "DPO",
    "ExportOnFitEnd",
    "FixedKLController",
    "GKD",
    "GRPO",
    "KTO",
    "MiniBatch",
    "ORPO",
    "OnlineDPO",
    "OnlineMethod",
    "PPO",
    "PolicyOutput",
    "RLOO",
    "PreferenceMethod",
    "ResumableCheckpoint",
    "Reward",
    "RewardModeling",
    "SFT",
    "ScoredRollout",
    "SimPO",
    "UpdateArgs",
    "generate_best_of_n",
    "write_jsonl_atomic",
]
