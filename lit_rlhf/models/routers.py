"""The router logits of a mixture of experts' forward, read by hooks on its routers.

A KV-cached forward cannot return them through ``output_router_logits``: the model then takes its own
load-balancing loss over an attention mask covering the cached prompt too, and fails on the shapes. The
hooks read the module transformers itself records router logits from (``_can_record_outputs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _router_recorder(model: nn.Module) -> tuple[type[nn.Module], int] | None:
    """The router class and the index of its logits in the router's output tuple, or ``None``."""
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            if isinstance(recorder, type):
                return recorder, 0
            return recorder.target_class, recorder.index
    return None


def has_router_logits(model: nn.Module) -> bool:
    """Whether ``model``'s routers can be read by :func:`recording_router_logits`."""
    return _router_recorder(model) is not None


@contextmanager
def recording_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list filled, by every forward inside the block, with each router's ``(tokens, experts)`` logits in the
    order the layers run. The hooks leave with the block: a checkpointed layer recomputed in backward adds none."""
    recorder = _router_recorder(model)
    if recorder is None:
        raise ValueError(f"{type(model).__name__} records no router logits (no mixture of experts)")
    cls, index = recorder
    logits: list[torch.Tensor] = []

    def hook(module, args, output):
        logits.append(output[index] if isinstance(output, (tuple, list)) else output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, cls)]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()
