"""What every method shares: the bank built when the strategy asks, the optimizer,
checkpoints that hold only trainable state, and export."""

from __future__ import annotations

import logging
import math
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from lit_rlhf.distributed import every_rank, global_sum
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.methods.lengths import check_positions
from lit_rlhf.methods.precision import fit_precision_plugin
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, eval_mode, load_tokenizer
from lit_rlhf.models.bank import adapter_of, check_bank_spec, merge_adapter_specs
from lit_rlhf.models.head import fused_head_supported, head_selection_supported
from lit_rlhf.models.routers import computes_load_balancing_loss
from lit_rlhf.strategies import check_trainer_support, shard_bank, synchronise_generation

log = logging.getLogger("lit_rlhf.methods")


#: Suffix of a role's parameter group without weight decay (its biases and norm weights).
NO_DECAY = ".no_decay"

#: The learning-rate decays after warmup, written once (the signature's Literal; the check reads it).
LRSchedule = Literal["constant", "linear", "cosine"]
LR_SCHEDULERS: tuple[str, ...] = get_args(LRSchedule)


def check_optimizer_arguments(*, learning_rate: float, warmup_steps: int, lr_scheduler: str,
                              max_consecutive_nonfinite: int) -> None:
    """``BankMethod``'s optimizer arguments, refused at construction (an unknown ``lr_scheduler``
    would otherwise decay as a cosine without a word)."""
    if not learning_rate > 0:
        raise InvalidArgument("learning_rate", f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise InvalidArgument("warmup_steps", f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_scheduler not in LR_SCHEDULERS:
        raise InvalidArgument("lr_scheduler", f"unknown lr_scheduler {lr_scheduler!r}; valid names are "
                              f"{', '.join(LR_SCHEDULERS)}")
    if max_consecutive_nonfinite < 1:
        raise InvalidArgument("max_consecutive_nonfinite",
                              f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")


def schedule_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Learning-rate multiplier: linear warmup, then constant, linear or cosine decay to 0.

    Warmup step ``i`` gets ``(i + 1) / warmup_steps``: transformers' ``i / warmup_steps`` spends the first
    optimizer step at learning rate 0 (Adam's moments move, the weights do not)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_states() -> dict:
    """Every RNG a training step may draw from, as tensors and ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors and plain values only, so
    reading it cannot run code. lit_rlhf's own checkpoints hold nothing else. A directory is a
    sharded checkpoint (FSDP, ``torch.distributed.checkpoint``), consolidated in this process's memory."""
    if Path(path).is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(Path(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load, it holds pickled objects other than tensors and plain values, and unpickling "
            f"them could run code (lit_rlhf reads checkpoints with weights_only=True). Torch said: {e}"
        ) from e


def settle_epoch_progress(loops: dict, trainer: pl.Trainer) -> None:
    """Make a checkpoint written at ``on_train_epoch_end`` (or after fit) resume like one written between steps.

    Lightning counts an epoch as processed before ``on_train_epoch_end`` (where ``last.ckpt`` is
    written) and completed after it, even when ``max_steps`` cut it short. Resumed from such a
    checkpoint with ``max_steps`` set, it either starts the next epoch's order where ``max_steps``
    had cut this one short, or runs one more batch as part of the finished epoch and then restarts
    the next one. So the checkpoint says plainly where the run is: in an unfinished epoch (its
    data position says how far), or at the start of the next one.
    """
    fit = loops["fit_loop"]
    epoch = fit["epoch_progress"]
    started, processed = epoch["current"]["started"], epoch["current"]["processed"]
    if started == 0 or started > processed:
        return  # before any training, or between steps: Lightning resumes these exactly
    batches = trainer.fit_loop.epoch_loop.batch_progress
    finished = batches.is_last_batch or batches.current.ready >= trainer.num_training_batches
    for counts in (epoch["current"], epoch["total"]):
        if finished:
            counts["completed"] = counts["processed"]
        else:
            counts["completed"] = counts["processed"] = counts["started"] - 1
    if finished:
        progress = fit["epoch_loop.batch_progress"]
        progress["current"] = {name: 0 for name in progress["current"]}
        progress["is_last_batch"] = False


def router_aux_weight(coef: float | None, model) -> float:
    """The weight of a model's router load-balancing loss in the training loss, TRL's rule: ``coef``, else the
    config's ``router_aux_loss_coef``, on any mixture of experts whose transformers code gives that loss
    (``lit_rlhf.models.routers.computes_load_balancing_loss``, whatever its config's ``output_router_logits`` says); 0 for
    any other model, where a non-zero ``coef`` is refused. Llama 4 declares a ``router_aux_loss_coef`` yet its
    code has no such loss (TRL 1.16 fails on the missing ``aux_loss``): 0, unless asked for, which is refused."""
    text = model.config.get_text_config()
    moe = computes_load_balancing_loss(model)
    if coef and not moe:
        raise InvalidArgument("router_aux_loss_coef", f"router_aux_loss_coef is {coef}, but {type(text).__name__} is "
                              "no mixture of experts with a router load-balancing loss in transformers: there is no "
                              "load-balancing loss to weight (leave it unset)")
    if not moe:
        return 0.0
    return float(getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef)


def router_aux_settings(coef: float | None, model) -> tuple[float, int | None]:
    """``(weight, top_k)`` of a model's router load-balancing loss (:func:`router_aux_weight`, and the experts
    per token it counts routings by); refused where the loss is weighted but ``top_k`` is not declared."""
    weight = router_aux_weight(coef, model)
    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", None)
    if weight and not top_k:
        raise InvalidArgument("router_aux_loss_coef", "this mixture of experts' config declares no num_experts_per_tok, "
                              "which its load-balancing loss counts routings by: set router_aux_loss_coef: 0")
    return weight, top_k


def _warn_router_loss_left_out(method: str, model) -> None:
    """Say so where a mixture of experts declares a router load-balancing loss that ``method`` does not add."""
    coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)
    if coef and computes_load_balancing_loss(model):
        log.warning("%s does not add this mixture of experts' router load-balancing loss (router_aux_loss_coef %s in "
                    "its config) to its loss, as TRL 1.16's does not (SFT, the DPO family, KTO, GRPO and RLOO add it)",
                    method, coef)


class BankMethod(pl.LightningModule):
    """Base of every method: owns an ``AdapterBank`` built from a light spec in ``configure_model``.

    Subclasses say which adapters they need (``required_adapters``) and which one they
    train and export (``trained_adapter``).

    Args:
        bank: the base model and its adapters (``lit_rlhf.models.BankSpec``): ``model`` (a directory or hub id),
            ``train_mode`` (lora, qlora, full), ``dtype``, ``quantization``, ``lora`` (``r``, ``alpha``, ``dropout``,
            ``target_modules``), ``adapters``, ``gradient_checkpointing``, ``reference``, ``teacher``, ...; one is
            set as ``--model.init_args.bank.lora.r 16``.
        policy_adapter: the adapter trained (and exported) as the policy; several may live on one bank.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, on every trained tensor but biases and norm weights.
        adam_betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup.
        lr_scheduler: decay after warmup: ``constant``, ``linear`` or ``cosine`` to zero.
        max_consecutive_nonfinite: stop the run after this many optimizer steps in a row were
            skipped for a non-finite loss (a diverged run would otherwise loop doing nothing).
    """

    def __init__(
        self,
        bank: BankSpec | None = None,
        *,
        policy_adapter: str = "policy",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_scheduler: LRSchedule = "constant",
        max_consecutive_nonfinite: int = 10,
    ):
        super().__init__()
        check_optimizer_arguments(learning_rate=learning_rate, warmup_steps=warmup_steps, lr_scheduler=lr_scheduler,
                                  max_consecutive_nonfinite=max_consecutive_nonfinite)
        self.bank_spec = bank or BankSpec()
        # Plain types only in hparams: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["bank"])
        self.store_plain_hparams(bank=self.bank_spec)
        self.policy_adapter = policy_adapter
        self.bank: AdapterBank | None = None
        self._tokenizer = None
        self._rng_to_restore: dict | None = None
        self._ref_cache: dict[str, torch.Tensor] | None = None
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.skipped_nonfinite = 0  # optimizer steps skipped for a non-finite loss, over the run and its resumes
        self._consecutive_nonfinite = 0
        self._drop_next_step = False
        self._last_step_dropped = False  # read by lr_scheduler_step, right after the optimizer step
        self._evaluation_sums: dict[str, torch.Tensor] = {}  # name -> (sum of mean x weight, weight), this epoch's
        # Checkpoints hold only trainable state, so the frozen base is missing from them by design.
        self.strict_loading = False

    # -- what subclasses declare ----------------------------------------------------------------

    def required_adapters(self) -> list[AdapterSpec]:
        """Adapters the bank must carry for this method; by default the one it trains."""
        return [AdapterSpec(self.trained_adapter)]

    @property
    def trained_adapter(self) -> str:
        """The adapter this method trains and exports (the policy, unless a subclass says otherwise)."""
        return self.policy_adapter

    def needs_reference(self) -> bool:
        """Whether this method reads a reference policy (the bank then keeps the starting policy:
        a frozen copy of a loaded policy adapter, or of the base in ``full`` mode)."""
        return False

    def store_plain_hparams(self, **values) -> None:
        """Put config dataclasses (or lists of them) into ``hparams`` as plain dicts: checkpoints are read
        back with ``torch.load(weights_only=True)``, which refuses any other class."""
        for name, value in values.items():
            self.hparams[name] = [asdict(v) for v in value] if isinstance(value, list) else (
                asdict(value) if is_dataclass(value) else value)

    # -- building -------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.bank_spec)
        return self._tokenizer

    def check_config(self) -> None:
        """What the bank's config files can tell, checked before the Trainer starts or any weights
        load (the CLI calls it first; ``AdapterBank`` checks the same again when it is built)."""
        check_bank_spec(self.bank_spec, merge_adapter_specs(self.bank_spec.adapters, self.required_adapters()))

    def generates_during_training(self) -> bool:
        """Whether a training step samples from the policy (which some strategies cannot shard)."""
        return False

    def separate_reward_models(self) -> list[str]:
        """Where the configs of the separate reward models that score the policy's replies are."""
        return []

    def setup(self, stage: str) -> None:
        # Before configure_model: an unsupported strategy fails here, before any weights load.
        check_trainer_support(self.trainer, self)
        fit_precision_plugin(self.trainer)
        if hasattr(self, "engine"):
            synchronise_generation(self.engine, self.trainer)
        if stage == "fit":
            self.check_sequence_lengths()

    def check_sequence_lengths(self) -> None:
        """The longest row (+ the tokens sampled after it) fits every model's positions; read from the
        config files, after the data module tokenised its rows and before any weights load."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_examples"):
            return
        spec = self.bank_spec
        models = [("policy", spec.model, spec.trust_remote_code)]
        if spec.teacher is not None:
            models.append(("teacher", spec.teacher.model, spec.teacher.trust_remote_code))
        # A separate reward model reads the prompt and the reply again, counted here in the policy's tokens (its own
        # tokenizer and closing eos aside: a text still past its positions is cut at scoring, see RewardScorer).
        models += [("reward", model, False) for model in self.separate_reward_models()]
        new_tokens = self.sampling.max_new_tokens if self.generates_during_training() else 0
        check_positions(models, [*datamodule.train_examples, *datamodule.val_examples], new_tokens=new_tokens)

    #: Whether the training loss adds a mixture of experts' router load-balancing loss
    #: (``offline.CompletionLogpsForward``; ``OnlineMethod.rollout_logits`` for GRPO and RLOO).
    adds_router_aux_loss = False

    def keep_router_aux_loss_coef(self, coef: float | None, refusal: str) -> None:
        """Keep ``router_aux_loss_coef`` for ``configure_model``, which resolves it against the model config
        (:func:`router_aux_settings`); refused, ``refusal`` saying why, where the method adds no such loss."""
        if coef is not None and not self.adds_router_aux_loss:
            raise InvalidArgument("router_aux_loss_coef", f"{type(self).__name__} adds no router load-balancing loss "
                                  f"({refusal}): leave router_aux_loss_coef unset")
        self.router_aux_loss_coef = coef
        self._router_aux_weight = 0.0
        self._router_top_k: int | None = None

    def configure_model(self) -> None:
        if self.bank is not None:
            return
        self.bank = AdapterBank(
            self.bank_spec,
            require=self.required_adapters(),
            reference_of=self.trained_adapter if self.needs_reference() else None,
        )
        if self.adds_router_aux_loss:
            self._router_aux_weight, self._router_top_k = router_aux_settings(self.router_aux_loss_coef, self.bank.model)
        else:
            _warn_router_loss_left_out(type(self).__name__, self.bank.model)
        if self.device_mesh is not None:  # ModelParallelStrategy (configs/strategy/fsdp.yaml)
            shard_bank(self.bank, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameter_groups(),
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.adam_betas),
        )
        total = self.total_optimizer_steps()
        if self.hparams.warmup_steps > total and self.global_rank == 0:
            log.warning("warmup_steps=%d is longer than this run's %d optimizer steps: the learning rate never reaches "
                        "learning_rate=%g (lower warmup_steps or train longer)", self.hparams.warmup_steps, total,
                        self.hparams.learning_rate)
        scheduler = LambdaLR(
            optimizer,
            lambda step: schedule_factor(
                step, warmup_steps=self.hparams.warmup_steps, total_steps=total, kind=self.hparams.lr_scheduler
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict]:
        """The trainable tensors as one parameter group per role (``policy``, ``value``, ``value.head``,
        ...; ``base`` in full mode) of one optimizer: DeepSpeed takes exactly one, and a group per role
        is where a role-specific setting goes. With ``weight_decay > 0``, a role's biases and norm
        weights (its 1-D tensors) form a ``<role>.no_decay`` group with no decay, as transformers'
        Trainer (and so TRL) leaves them undecayed: decay would pull a norm's gain toward zero."""
        trainable = set(self.bank.trainable_names())
        split = self.hparams.weight_decay > 0
        groups: dict[str, list] = {}
        for name, param in self.bank.named_parameters():
            if name in trainable:
                role = self._role_of(name) + (NO_DECAY if split and param.ndim < 2 else "")
                groups.setdefault(role, []).append(param)
        return [{"name": role, "params": params, **({"weight_decay": 0.0} if role.endswith(NO_DECAY) else {})}
                for role, params in groups.items()]

    @staticmethod
    def _role_of(name: str) -> str:
        """``heads.<adapter>.*`` -> ``<adapter>.head``; ``...lora_A.<adapter>.weight`` (or another of the adapter's
        tensors, ``models.bank.adapter_of``) -> ``<adapter>``; else ``base``."""
        parts = name.split(".")
        if parts[0] == "heads":
            return f"{parts[1]}.head"
        return adapter_of(name) or "base"

    def total_optimizer_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    # -- the LM head's paths (models.head): checked once per model, at the first forward that asks ------

    _head_selection: bool | None = None
    _fused_head: bool | None = None

    def uses_head_selection(self) -> bool:
        """Whether the LM head can run only where a loss reads its output (``models.head``): checked once,
        on a tiny batch, at the first forward; else full logits, with the reason logged."""
        if self._head_selection is None:
            supported = self._probe_head(head_selection_supported)
            log.info("LM head %s", "on completion-predicting positions only" if supported else
                     "on every position (the model's forward does not run its head on the selected hidden states)")
            self._head_selection = supported
        return self._head_selection

    def uses_fused_head(self) -> bool:
        """Whether log-probs may be taken with the LM head's weight fused in (``losses.head_token_logps``:
        no logits tensor, no logits gradient), offline and online: needs :meth:`uses_head_selection`, a plain linear head, and
        nothing done to the logits after it (not Gemma2's soft-capping); checked once, else logged."""
        if self._fused_head is None:
            supported = self.uses_head_selection() and self._probe_head(fused_head_supported)
            log.info("LM head %s", "fused with the log-probs (no logits tensor)" if supported else
                     "not fused with the log-probs (the model's head is not a plain linear layer, or its forward "
                     "changes the logits after it): logits of the kept positions")
            self._fused_head = supported
        return self._fused_head

    def _probe_head(self, check) -> bool:
        def forward(input_ids):
            return self.bank(input_ids, torch.ones_like(input_ids)).logits

        embeddings = self.bank.model.get_input_embeddings()  # a LoRA embedding lacks num_embeddings
        with eval_mode(self.bank):
            return check(forward, self.bank.output_embeddings(), embeddings.weight.shape[0], embeddings.weight.device)

    # -- reference log-probs computed once (precompute_ref_logps) -------------------------------

    def attach_reference_logps(self, fields: tuple[str, ...], row_logps: Callable[[dict], torch.Tensor]) -> None:
        """Write the reference log-probs of every training and validation row into its example, so the
        reference never runs during training. Computed once before the first step; a resumed run
        reads them from its checkpoint (the reference is the *starting* policy, gone by then).

        Args:
            fields: the example fields to write, one per column of ``row_logps``' result.
            row_logps: a collated batch -> ``(rows, len(fields))`` log-probs under the active role.
        """
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_examples"):
            raise RuntimeError("precompute_ref_logps needs a lit_rlhf DataModule passed to Trainer.fit")
        if self._ref_cache is None:
            if self.global_step > 0:
                raise RuntimeError("resuming with precompute_ref_logps needs the reference log-probs in the checkpoint")
            self._ref_cache = {split: self._reference_logps_of(getattr(datamodule, f"{split}_examples"),
                                                               datamodule.collator, row_logps, len(fields))
                               for split in ("train", "val")}
        for split, values in self._ref_cache.items():
            examples = getattr(datamodule, f"{split}_examples")
            if len(examples) != values.shape[0]:
                raise RuntimeError(f"precomputed reference log-probs cover {values.shape[0]} {split} rows, "
                                   f"the data has {len(examples)}")
            for example, row in zip(examples, values.tolist()):
                example.update(zip(fields, row))

    @torch.no_grad()
    def _reference_logps_of(self, examples: list[dict], collator, row_logps, width: int,
                            batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(self.device) for k, v in collator(examples[start : start + batch_size]).items()}
            with self._starting_policy():
                out.append(row_logps(batch).cpu())
        return torch.cat(out) if out else torch.zeros(0, width)

    @contextmanager
    def _starting_policy(self) -> Iterator[None]:
        """The reference before the first step, in eval mode: the trained role itself (an SFT adapter loaded
        from a path, a fresh adapter that is the base, or full mode's base), or the bare base when
        ``bank.reference`` is ``base``. A method that precomputes keeps no ``reference`` role: adapters off
        would be the pre-SFT base (DPO from an SFT adapter: first-step rewards 0.022 and -0.012, not 0)."""
        if self.bank_spec.reference == "base" and self.bank.is_peft:
            with self.bank.reference():
                yield
        else:
            with eval_mode(self.bank), self.bank.role(self.trained_adapter):
                yield

    # -- checkpoints ----------------------------------------------------------------------------

    def _trainable_keys(self) -> set[str]:
        return {f"bank.{name}" for name in self.bank.trainable_names()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng_states"] = rng_states()
        # A resume must not hand a diverging run a fresh streak of max_consecutive_nonfinite skips.
        checkpoint["lit_rlhf_nonfinite"] = {"skipped": self.skipped_nonfinite, "consecutive": self._consecutive_nonfinite}
        if self._ref_cache is not None:
            checkpoint["ref_logps"] = self._ref_cache
        if self._trainer is not None and "loops" in checkpoint:
            settle_epoch_progress(checkpoint["loops"], self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")
        self._ref_cache = checkpoint.get("ref_logps")
        nonfinite = checkpoint.get("lit_rlhf_nonfinite", {})
        self.skipped_nonfinite = int(nonfinite.get("skipped", 0))
        self._consecutive_nonfinite = int(nonfinite.get("consecutive", 0))
        if self.bank is None:
            return
        # Loading is not strict (the frozen base is not in a checkpoint), so a tensor of another layout
        # (other target_modules or adapters) would be dropped without a word: the saved set must be ours.
        trainable, saved = self._trainable_keys(), set(checkpoint["state_dict"])
        missing, unexpected = trainable - saved, saved - trainable
        if missing or unexpected:
            found = [f"{verb} {len(keys)} {what} (e.g. {sorted(keys)[:2]})" for verb, keys, what in
                     (("lacks", missing, "trainable tensors of this method"),
                      ("holds", unexpected, "tensors this method does not have")) if keys]
            raise ValueError(
                f"the checkpoint does not fit this method's bank: it {' and '.join(found)}; was it written by a run "
                "with the same adapters, LoRA settings (r, target_modules) and train_mode? Its config is config.yaml "
                "in its log directory"
            )

    def on_train_start(self) -> None:
        # The data loaders draw nothing from the global RNG (they have their own generators), so
        # any point before the first step restores the dropout masks and samples of the next one.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # -- guards and export ----------------------------------------------------------------------

    def skip_if_nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of an automatic-optimization step, with the step dropped on every rank if it is
        not finite on any (a collective: call it in every ``training_step``).

        Returning ``None`` instead would skip backward on that rank only while the others wait in
        DDP's gradient all-reduce (Lightning 2.6 refuses a ``None`` under distributed training and
        the run dies). So backward runs everywhere and ``on_before_optimizer_step`` drops the
        gradients of the whole step (with ``accumulate_grad_batches``, every micro-batch of it).
        """
        if not every_rank(torch.isfinite(loss), loss.device):
            log.warning("non-finite loss at step %d on some rank: optimizer step skipped on every rank", self.global_step)
            self._drop_next_step = True
        return loss

    def log_means(self, metrics: dict[str, tuple[float, float]], *, prog_bar: tuple[str, ...] = ()) -> None:
        """Log ``name -> (mean, weight)`` (of ``lit_rlhf.distributed.global_means``: a training step's metrics
        over every data-parallel rank's rows or tokens, all in one all-reduce where ``sync_dist=True`` would
        take one per metric); a metric without items (weight 0) is not logged."""
        for name, (mean, weight) in metrics.items():
            if weight > 0:
                self.log(name, mean, prog_bar=name in prog_bar, batch_size=max(1, round(weight)))

    def accumulate_evaluation_means(self, metrics: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]) -> None:
        """Add a validation (or test) batch's ``name -> (mean, weight)`` (weight: the rows or tokens the mean is
        over; 0, and any mean, where the batch has none) to the epoch's sums. Every batch of every rank gives the
        same names; ``log_evaluation_means`` logs them at the epoch's end."""
        for name, (mean, weight) in metrics.items():
            weight = torch.as_tensor(weight, dtype=torch.float64, device=self.device).detach()
            mean = torch.as_tensor(mean, dtype=torch.float64, device=self.device).detach()
            pair = torch.stack([torch.where(weight > 0, mean * weight, 0.0), weight])
            self._evaluation_sums[name] = self._evaluation_sums[name] + pair if name in self._evaluation_sums else pair

    # A validation cut short (an exception caught around trainer.validate) leaves sums: each epoch starts afresh.
    def on_validation_epoch_start(self) -> None:
        self._evaluation_sums = {}

    def on_test_epoch_start(self) -> None:
        self._evaluation_sums = {}

    def log_evaluation_means(self, prefix: str, *, prog_bar: tuple[str, ...] = ()) -> dict[str, float]:
        """Log the epoch's ``prefix/name`` means over every rank's rows (or tokens), from one all-reduce of the
        sums (a collective: call it at every rank's epoch end); returns them (names without items left out).

        Lightning's ``self.log(..., batch_size=n, sync_dist=True)`` is exact in one process only: under DDP it
        averages the ranks' row counts in an integer tensor (7 rows on two ranks: 3, not 3.5), and reduces
        the metrics in the order each rank first logged them, which a metric logged only when a batch has
        items for it (KTO's undesirable rows) makes differ between ranks."""
        sums, self._evaluation_sums = self._evaluation_sums, {}
        names = sorted(sums)
        if not names:
            return {}
        totals = global_sum(torch.stack([sums[name] for name in names]))
        means = {f"{prefix}/{name}": total / weight for name, (total, weight) in zip(names, totals.tolist()) if weight > 0}
        for name, mean in means.items():
            self.log_global(name, mean, prog_bar=name.removeprefix(f"{prefix}/") in prog_bar)
        return means

    def log_global(self, name: str, value: torch.Tensor | float, *, prog_bar: bool = False) -> None:
        """Log an epoch's value that is the same on every rank already (reduced over the ranks). Its
        ``sync_dist`` max is that value, exactly, and keeps Lightning from warning that it is not synced."""
        self.log(name, value, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs before every optimizer step, automatic or manual: a step that runs ends a streak of skips.
        self._last_step_dropped = self._drop_next_step
        if not self._drop_next_step:
            self._consecutive_nonfinite = 0
            return
        self._drop_next_step = False
        # Without gradients, torch optimizers leave the parameters and their state (moments, step
        # count, weight decay) alone; zeroed gradients would still apply momentum and decay.
        optimizer.zero_grad(set_to_none=True)
        self.count_skipped_step()
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # A step dropped for a non-finite loss leaves the schedule where it was, as the online update's skip and
        # transformers' Trainer (for a step its AMP grad scaler skips) do: the schedule counts applied updates.
        if not self._last_step_dropped:
            super().lr_scheduler_step(scheduler, metric)

    def count_skipped_step(self) -> None:
        """Count an optimizer step skipped for a non-finite loss; stop the run after
        ``max_consecutive_nonfinite`` in a row. Every rank calls it together (the decision is shared)."""
        self.skipped_nonfinite += 1
        self._consecutive_nonfinite += 1
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise RuntimeError(
                f"{self._consecutive_nonfinite} optimizer steps in a row had a non-finite loss (step {self.global_step}, "
                f"{self.skipped_nonfinite} skipped in all): training has diverged. Lower the learning rate, check the "
                f"data and the precision, or raise max_consecutive_nonfinite (now {self.max_consecutive_nonfinite})."
            )

    def unsharded_copy(self, trained: dict[str, torch.Tensor]) -> BankMethod:
        """A shallow copy of this method with a fresh, unsharded bank (on CPU) holding ``trained``
        (``bank``-relative names): what a rank exports from after FSDP training."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy._modules = dict(self._modules)
        copy._modules["bank"] = None
        copy._device_mesh = None  # or configure_model would shard the copy too
        copy.configure_model()
        # Not strict about the frozen base (it is the copy's own); every trained tensor must land, or the
        # export would silently hold the copy's fresh adapters.
        unexpected = copy.bank.load_state_dict(trained, strict=False).unexpected_keys
        missing = set(copy.bank.trainable_names()) - set(trained)
        if unexpected or missing:
            raise RuntimeError(f"the gathered trained tensors do not match an unsharded bank: unknown "
                               f"{sorted(unexpected)[:3]}, missing {sorted(missing)[:3]}")
        return copy

    def export(self, path: str | Path, *, merged: bool = False) -> Path:
        """Save the trained adapter in PEFT format (``merged=False``) or a merged transformers model."""
        self.configure_model()
        if merged or self.bank.full:
            return self.bank.export_merged(path, adapter=self.trained_adapter)
        return self.bank.save_adapter(self.trained_adapter, path)
