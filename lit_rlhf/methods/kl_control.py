"""The KL coefficient β of a KL penalty to the reference: fixed, or steered towards a target KL.

Its own module so that a method outside the online loop can take it without the loop. Under DDP
the adaptive controller observes the KL of every rank, so β stays equal on every rank.
"""

from __future__ import annotations

import torch

from lit_rlhf.distributed import all_rows


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """Update from one rollout's per-sequence KL ``(B,)`` (a no-op here; see ``AdaptiveKLController``)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2), steering the KL to a target:

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        β_{t+1} = β_t (1 + K_β e_t),   K_β = n_steps / horizon

    Args:
        kl_coef: initial β.
        target: ``KL_target`` (nats per sequence).
        horizon: samples over which β may change by about ``e^{±0.2}``.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """``update`` from the mean KL and the count of the sequences of every rank (a collective), so
        β stays the same on every rank under DDP; TRL likewise steps by the global batch size."""
        kl = all_rows(kl_per_sequence)
        self.update(kl.float().mean().item(), n_steps=kl.shape[0])

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}


def kl_controller(kl_coef: float, *, adaptive: bool, target: float, horizon: int) -> FixedKLController:
    """The KL coefficient's controller: fixed, or adaptive towards ``target`` (Ziegler et al. 2019)."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
