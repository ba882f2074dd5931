"""Scaling out: which Lightning strategy runs which method, and the pieces Lightning leaves to us.

Presets live in ``configs/strategy/`` and compose with any method config::

    lit-rlhf fit --config configs/dpo.yaml --config configs/strategy/fsdp.yaml --trainer.devices 8

- **DDP** (``ddp.yaml``): every method. Lightning's own ``DDPStrategy``.
- **FSDP** (``fsdp.yaml``): ``FSDP2Strategy`` below, Lightning's ``ModelParallelStrategy`` (FSDP2,
  ``fully_shard``) used for data parallelism only; ``shard_bank`` shards the bank's decoder layers
  and heads in ``configure_model``. Lightning's ``FSDPStrategy`` (FSDP v1) is not used: it does not
  work with manual optimization (Lightning issues 19626, 19685, 20138) and Lightning refuses it on CPU.
- **DeepSpeed ZeRO-2/3** (``deepspeed_zero*.yaml``): ``DeepSpeedZeRO`` below, Lightning's with
  the config built by ``deepspeed_config`` and the online methods' ``max_grad_norm`` moved into
  DeepSpeed's ``gradient_clipping`` (DeepSpeed clips inside its engine step; Lightning's
  ``clip_gradients`` is a no-op under it). CUDA only (Lightning refuses it otherwise).

``check_scale_support`` refuses, before any weights load, a method / strategy / train mode
combination that is not supported, naming what to use instead.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import nn

from lit_rlhf.models.saving import fsync_directory

StrategyKind = Literal["single", "ddp", "fsdp", "fsdp1", "deepspeed", "other"]


class ScaleError(ValueError):
    """A method / strategy / quantisation combination this project does not run."""


# -- what runs where ------------------------------------------------------------------------------


def strategy_kind(strategy: Strategy) -> tuple[StrategyKind, int | None]:
    """``(kind, ZeRO stage or None)`` of the Lightning strategy a Trainer built."""
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp", None
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1", None
    if isinstance(strategy, LightningDeepSpeedStrategy):  # before DDP: Lightning's DeepSpeed subclasses it
        return "deepspeed", int(strategy.config["zero_optimization"]["stage"])
    if isinstance(strategy, DDPStrategy):
        return "ddp", None
    return ("single", None) if type(strategy).__name__.startswith("SingleDevice") else ("other", None)


def check_scale_support(
    method: str,
    *,
    kind: StrategyKind,
    stage: int | None = None,
    generates: bool,
    manual_optimization: bool,
    train_mode: str,
    engine: str | None = None,
    gradient_accumulation_steps: int = 1,
    accelerator: str | None = None,
    quant_storage: str = "uint8",
    dtype: str = "float32",
) -> None:
    """Raise ``ScaleError`` when ``method`` cannot run this way, naming what to use instead.

    Args:
        method: the method's class name (for the message).
        kind, stage: from ``strategy_kind``.
        generates: whether the method samples from the policy during training.
        manual_optimization: whether it optimizes by hand (the online methods).
        train_mode: ``lora``, ``qlora`` or ``full``.
        engine: the rollout engine's name, when the method has one.
        gradient_accumulation_steps: the method's own micro-batching (manual optimization).
        accelerator: the Trainer's accelerator, ``cpu``, ``cuda``, ...
        quant_storage, dtype: the bank's storage dtype of 4-bit weights and its weights dtype.
    """
    where = f"{method} with {kind if stage is None else f'DeepSpeed ZeRO-{stage}'}"
    if kind == "fsdp1":
        raise ScaleError(
            f"{where}: Lightning's FSDPStrategy (FSDP v1) is not supported here (it breaks manual optimization, "
            "Lightning issues 19626/19685/20138, and refuses a CPU accelerator); use configs/strategy/fsdp.yaml "
            "(FSDP2 through ModelParallelStrategy)"
        )
    if kind == "fsdp":
        if generates:
            raise ScaleError(
                f"{where}: a method that generates during training is not supported under FSDP here (sharded "
                "generation across ranks that stop at different steps is not tested); use configs/strategy/ddp.yaml, "
                "or configs/strategy/deepspeed_zero2.yaml on GPUs"
            )
        if train_mode != "lora":
            raise ScaleError(
                f"{where} and train_mode {train_mode!r}: FSDP here shards the decoder layers of a LoRA bank "
                "(the frozen embeddings stay replicated); use train_mode lora, or DeepSpeed ZeRO-3 "
                "(configs/strategy/deepspeed_zero3.yaml) for full fine-tuning, or DDP / ZeRO-2 for QLoRA"
            )
    if kind == "deepspeed":
        if accelerator is not None and accelerator not in ("gpu", "cuda"):
            raise ScaleError(
                f"{where}: DeepSpeed runs on CUDA GPUs only (Lightning refuses accelerator {accelerator!r}); "
                "on CPU use configs/strategy/ddp.yaml"
            )
        if manual_optimization and gradient_accumulation_steps > 1:
            raise ScaleError(
                f"{where} and gradient_accumulation_steps {gradient_accumulation_steps}: DeepSpeed steps on its own "
                "accumulation boundary, which manual micro-batching would double-scale; use "
                "gradient_accumulation_steps: 1 (more num_mini_batches for less memory), or DDP"
            )
        if stage == 3 and train_mode == "qlora" and quant_storage != dtype:
            raise ScaleError(
                f"{where} and train_mode qlora: ZeRO-3 partitions tensors of the model's dtype, but the 4-bit "
                f"weights are stored as {quant_storage}; set bank.quant_storage: {dtype} (or use ZeRO-2)"
            )
        # 'auto' generates with 'hf' where the parameters are partitioned (static_decode_unsupported).
        if stage == 3 and generates and engine not in (None, "hf", "auto"):
            raise ScaleError(
                f"{where} and rollout engine {engine!r}: under ZeRO-3 only the 'hf' engine gathers parameters "
                "layer by layer with synced_gpus (no hang when ranks stop at different steps); use engine: hf"
            )


def check_trainer_support(trainer, method) -> None:
    """``check_scale_support`` for a method about to be fit by ``trainer`` (before the bank loads)."""
    kind, stage = strategy_kind(trainer.strategy)
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    check_scale_support(
        type(method).__name__,
        kind=kind,
        stage=stage,
        generates=method.generates_during_training(),
        manual_optimization=not method.automatic_optimization,
        train_mode=method.bank_spec.train_mode,
        engine=method.hparams.get("engine"),
        gradient_accumulation_steps=getattr(method, "gradient_accumulation_steps", 1),
        accelerator=accelerator,
        quant_storage=method.bank_spec.quant_storage,
        dtype=method.bank_spec.dtype,
    )


# -- FSDP2 ----------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process of every node is one
    data-parallel shard (no tensor parallelism). The method shards its bank in ``configure_model``
    (``shard_bank``). Checkpoints are sharded directories (``torch.distributed.checkpoint``, one file
    per rank) holding the trainable tensors and their optimizer state; ``save_distributed_checkpoint:
    false`` writes one file from rank 0 instead.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (one tensor-parallel
        # group per node); pure FSDP shards over every process.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written whole into a fresh ``<name>.next`` directory, then renamed into place:
        ``ModelParallelStrategy`` writes into the directory already there, so a save killed after some shards left
        new shards beside old ones under the previous ``meta.pt``, which read as complete and loaded mixed."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))
        staged = target.with_name(target.name + STAGED_SUFFIX)
        if self.global_rank == 0 and staged.exists():
            shutil.rmtree(staged)  # a save cut short before
        self.barrier("staging a sharded checkpoint")
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("sharded checkpoint written")
        if self.global_rank == 0:
            swap_in(staged, target)
        self.barrier("sharded checkpoint in place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint that holds only the trainable tensors (lit_rlhf never writes the
        frozen base): ``torch.distributed.checkpoint`` loads exactly the keys it asks for, so ask for
        those the checkpoint has. A single-file checkpoint goes the parent's way."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key])
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        # The names of what was restored, for the module's on_load_checkpoint (the tensors are in place).
        checkpoint["state_dict"] = model_state
        return checkpoint


#: Beside a sharded checkpoint ``<name>``, the directory its next save is written into. Once it holds ``meta.pt``
#: (written after every shard) it is complete, and ``--ckpt_path last`` finds it when a kill between the two
#: renames of :func:`swap_in` left no ``<name>``.
STAGED_SUFFIX = ".next"


def swap_in(staged: Path, target: Path) -> None:
    """Put the complete checkpoint ``staged`` at ``target``: the previous one moves aside, then goes. At every
    moment a complete checkpoint is found at ``target`` or at ``staged``."""
    previous = target.with_name(target.name + ".previous")
    if previous.is_dir():
        shutil.rmtree(previous)
    if target.exists():
        os.rename(target, previous)
    os.rename(staged, target)
    fsync_directory(target.parent)
    if previous.is_dir():
        shutil.rmtree(previous)
    elif previous.exists():
        previous.unlink()  # a one-file checkpoint of the same name


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model (the ``ModuleList`` of its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    if not layers:
        raise ScaleError(f"FSDP: found no decoder layers to shard in {type(model).__name__}")
    return layers


def shard_bank(bank: nn.Module, mesh) -> None:
    """``fully_shard`` each decoder layer of the bank's base and each head, over ``mesh``.

    A decoder layer holds frozen base weights and trainable LoRA weights in one FSDP2 group:
    FSDP2 (unlike FSDP v1 without ``use_orig_params``) shards mixed ``requires_grad`` within a
    group and reduce-scatters only the gradients that exist. Embeddings, final norm and output
    layer are frozen in LoRA mode and stay replicated. Every trainable parameter must end up
    sharded, or its gradient would never be averaged across ranks: checked here.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # Every group is its own root (the bank's forward passes enter the base at several places), and a
    # root keeps its parameters gathered after forward by default; resharding after forward keeps the
    # sharded tensors registered between passes, where peft toggles requires_grad (disable_adapter).
    for layer in decoder_layers(bank.model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    for head in bank.heads.values():
        fully_shard(head, mesh=mesh, reshard_after_forward=True)
    sharded = {id(p) for m in bank.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    loose = [n for n, p in bank.named_parameters() if p.requires_grad and id(p) not in sharded]
    if loose:
        raise ScaleError(f"FSDP: trainable parameters outside every sharded group (never averaged): {loose[:3]}")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def gather_trainable(bank: nn.Module) -> dict[str, torch.Tensor]:
    """The bank's trainable tensors as whole CPU tensors, gathered from their FSDP2 shards.
    A collective: every rank must call it (and gets the whole tensors)."""
    from torch.distributed.tensor import DTensor

    # By name, not requires_grad: peft toggles requires_grad on whichever tensors a layer holds at the time.
    trainable = set(bank.trainable_names())
    state = {}
    for name, param in bank.named_parameters():
        if name in trainable:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = whole.detach().cpu()
    return state


# -- DeepSpeed --------------------------------------------------------------------------------------


def deepspeed_config(
    stage: Literal[2, 3],
    *,
    offload: bool = False,
    gradient_clipping: float = 0.0,
) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO ``stage``, optionally offloading optimizer state (and, at stage
    3, parameters) to CPU. ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps``
    are filled in by Lightning from the loader and the Trainer, ``bf16`` from ``trainer.precision``.

    ZeRO-3 keeps ``stage3_gather_16bit_weights_on_model_save`` so a rank-0 export sees whole
    weights, and a ``stage3_param_persistence_threshold`` that keeps small tensors (LoRA factors,
    norms, heads) unpartitioned: they are a rounding error in memory and gathering them per
    forward would dominate a LoRA step's communication.
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=5e8, reduce_scatter=True)
    else:
        zero.update(
            stage3_param_persistence_threshold=1e6,
            stage3_prefetch_bucket_size=5e7,
            stage3_max_live_parameters=1e9,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "gradient_clipping": float(gradient_clipping),
        "zero_allow_untested_optimizer": True,
    }
    return config


class DeepSpeedZeRO(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with the config from ``deepspeed_config``.

    Manual optimization (the online methods) cannot use the Trainer's ``gradient_clip_val``, and
    Lightning's ``clip_gradients`` does nothing under DeepSpeed (the engine clips inside its step),
    so the method's ``max_grad_norm`` becomes DeepSpeed's ``gradient_clipping`` here.

    Args:
        stage: ZeRO stage, 2 or 3.
        offload: offload optimizer state (and, at stage 3, parameters) to CPU.
        remote_device, load_full_weights, exclude_frozen_parameters, process_group_backend, timeout,
            logging_level, loss_scale, initial_scale_power, loss_scale_window, hysteresis,
            min_loss_scale: Lightning ``DeepSpeedStrategy``'s. Its ZeRO arguments (``offload_optimizer``,
            ``reduce_bucket_size``, ...) are not taken: they build the DeepSpeed config that
            ``deepspeed_config`` replaces, so a value given there was silently ignored.
    """

    def __init__(
        self,
        stage: Literal[2, 3] = 2,
        offload: bool = False,
        *,
        remote_device: str | None = None,
        load_full_weights: bool = False,
        exclude_frozen_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        logging_level: int = logging.WARN,
        loss_scale: float = 0,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: int = 1,
    ) -> None:
        if not torch.cuda.is_available():
            # Before Lightning's own checks, which on a machine without CUDA first ask to install deepspeed.
            raise ScaleError(
                f"DeepSpeed ZeRO-{stage} runs on CUDA GPUs only and none is visible; on CPU use "
                "configs/strategy/ddp.yaml (or configs/strategy/fsdp.yaml for the offline methods)"
            )
        super().__init__(
            config=deepspeed_config(stage, offload=offload), remote_device=remote_device,
            load_full_weights=load_full_weights, exclude_frozen_parameters=exclude_frozen_parameters,
            process_group_backend=process_group_backend, timeout=timeout, logging_level=logging_level,
            loss_scale=loss_scale, initial_scale_power=initial_scale_power, loss_scale_window=loss_scale_window,
            hysteresis=hysteresis, min_loss_scale=min_loss_scale,
        )

    def _format_batch_size_and_grad_accum_config(self) -> None:
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            self.config["gradient_clipping"] = float(getattr(module, "max_grad_norm", None) or 0.0)
        else:
            # Lightning fills it from trainer.gradient_clip_val only when the key is absent.
            self.config.pop("gradient_clipping", None)
        super()._format_batch_size_and_grad_accum_config()


def synchronise_generation(engine, trainer) -> None:
    """Under ZeRO-3 each forward gathers partitioned parameters collectively: a rank that stopped
    generating would leave the others waiting. ``synced_gpus`` keeps every rank stepping (on
    padding) until all are done."""
    kind, stage = strategy_kind(trainer.strategy)
    if kind == "deepspeed" and stage == 3 and trainer.world_size > 1 and hasattr(engine, "extra_generate_kwargs"):
        engine.extra_generate_kwargs = {**engine.extra_generate_kwargs, "synced_gpus": True}
