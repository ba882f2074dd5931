"""The routers of mixtures of experts: whether a model has a load-balancing loss, its router logits read by hooks,
and the routers LoRA cannot wrap.

A KV-cached forward cannot return them through ``output_router_logits``: the model then takes its own
load-balancing loss over an attention mask covering the cached prompt too, and fails on the shapes. The
hooks read the module transformers itself records router logits from (``_can_record_outputs``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def computes_load_balancing_loss(model: nn.Module) -> bool:
    """Whether ``model`` (or the base a peft model wraps) is a mixture of experts whose transformers code gives a
    router load-balancing loss: its config has ``output_router_logits`` and its modeling module the loss
    (``load_balancing_loss_func``). Llama 4 has the config field and no such loss (sigmoid routing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    return (hasattr(base.config.get_text_config(), "output_router_logits")
            and hasattr(module, "load_balancing_loss_func"))


def returns_more_than_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``nn.Linear`` subclass whose own forward returns more than a tensor
    (Llama 4's router: ``(scores, logits)``), found by running it on one zero row: a LoRA layer adds its update to
    the tensor its base layer returns, so peft's LoRA on it fails in the forward. Falcon's linear layers have their
    own forward and return a tensor; quantized ones (bitsandbytes') are not transformers'."""
    cls = type(module)
    if not (isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward
            and cls.__module__.startswith("transformers.")):
        return False
    with torch.no_grad():
        return not isinstance(module(module.weight.new_zeros(1, module.in_features)), torch.Tensor)


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
