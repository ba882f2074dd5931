"""An adapter's LoRA deltas folded into the base weights while it generates, and the exact base back after.

A decode step is mostly fixed per-layer cost: a LoRA linear runs three matmuls (base, A, B) plus
peft's bookkeeping where the merged weight runs one (15% of a decode step of a 4-layer LoRA Llama on
CPU, more in kernel launches on a GPU). peft's ``merge`` adds ``scale * B @ A`` into each base weight
in place (so CUDA graphs captured on those tensors stay valid) and its layers then run the base only.
Its ``unmerge`` subtracts the delta again, which does not give the base back bit for bit (``(W + D) - D``
rounds, in bfloat16 by a part in 256): repeated every rollout, the frozen base, which is also the
reference policy, would drift. Here the merged weights are restored from copies taken before, so the
base after generation is the base before it, exactly.

Only plain LoRA linears merge (not DoRA or other variants, LoRA biases, quantized, sharded or tied bases);
the others keep running their LoRA branch, which gives the same outputs. The copies cost the size of the
merged weights while generation runs: on CUDA they are taken only when twice that is free.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.distributed.tensor import DTensor

log = logging.getLogger("lit_rlhf.models")


def mergeable_layers(model: nn.Module, adapter: str) -> list[LoraLinear]:
    """The LoRA linears of ``model`` whose ``adapter`` merges into a plain floating-point base weight of
    their own: a weight tied to another module (a LoRA on Qwen2's or GPT-2's tied LM head) would carry the
    delta into the input embedding too, and generation would sample from another model."""
    names = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers = []
    for module in model.modules():
        if type(module) is not LoraLinear or adapter not in module.lora_A or module.merged:
            continue
        weight = module.get_base_layer().weight
        if (adapter in module.lora_variant or module.lora_bias.get(adapter, False) or not weight.is_floating_point()
                or isinstance(weight, DTensor) or hasattr(weight, "ds_id") or weight.requires_grad
                or names[id(weight)] > 1):
            continue
        layers.append(module)
    return layers


@contextmanager
def lora_merged(model: nn.Module, adapter: str) -> Iterator[int]:
    """Within the block, ``adapter``'s deltas are in the base weights of the layers that allow it (yields
    how many); after it, those weights are the bit-identical originals and the layers unmerged. Call it
    with ``adapter`` active and no gradients (generation)."""
    layers = mergeable_layers(model, adapter)
    weights = [layer.get_base_layer().weight for layer in layers]
    needed = sum(w.numel() * w.element_size() for w in weights)
    if weights and weights[0].is_cuda and torch.cuda.mem_get_info(weights[0].device)[0] < 2 * needed:
        log.info("generating with LoRA branches: copies of the merged weights (%.1f GiB) do not fit twice in "
                 "free GPU memory", needed / 2**30)
        layers, weights = [], []
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge(adapter_names=[adapter])
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight, original in zip(layers, weights, saved):
                weight.copy_(original)
                layer.merged_adapters.clear()
