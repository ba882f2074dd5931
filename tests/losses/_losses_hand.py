"""Plain-python helpers for expected values computed by hand (no code under test)."""

import math

import torch


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def close(actual: torch.Tensor, expected, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach().cpu(), expected_t, atol=atol, rtol=rtol)


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)
