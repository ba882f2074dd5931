"""LightningDataModules for the four formats: load, validate every row, tokenise, collate.

All the work happens in :meth:`_FormatDataModule.prepare` (idempotent), which ``setup()``
calls and which a CLI may call earlier to fail fast: every row of ``train``, ``val`` and ``test`` is
checked before training starts, and the problems are reported together.

The tokenizer is never loaded here: pass one as ``tokenizer``, or attach the DataModule to
a Trainer whose LightningModule exposes ``.tokenizer`` (every lit_rlhf method does).

The training loader shuffles with a ``DistributedSampler`` seeded with ``seed``: its order
depends only on ``(seed, epoch)`` and Lightning calls its ``set_epoch`` every epoch, so a
resumed run sees the same order as an uninterrupted one. It is built with the Trainer's
world size and rank, so under DDP Lightning keeps it instead of injecting its own. The
validation loader reads the batches one process reads, dealt out to the ranks (``EvaluationShard``):
each validation row is counted once, where Lightning's sampler would repeat rows to even the ranks.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.collate import (
    PackingCollator,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    UnpairedCollator,
    pad_token_id_of,
)
from lit_rlhf.data.formats import DataError, report_invalid
from lit_rlhf.data.sources import load_rows
from lit_rlhf.data.tokenize import Example, check_rows, resolve_conversational, tokenize_records
from lit_rlhf.errors import SourceNotFound

log = logging.getLogger("lit_rlhf.data")


class ExampleDataset(Dataset):
    """A list of tokenised examples as a map-style dataset."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | list[int]) -> Example | list[Example]:
        # A list of indices is a whole batch (EvaluationShard's, read with batch_size=None).
        return [self.examples[i] for i in index] if isinstance(index, list) else self.examples[index]


# The DataModule restores the data position itself (see ResumableSampler), so Lightning's
# warning that a mid-epoch checkpoint cannot resume the data does not apply to our loaders.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    After a mid-epoch resume, the interrupted epoch skips the samples already trained on,
    so the resumed run sees exactly the batches the uninterrupted run would have seen.

    Args:
        resume: ``(epoch, samples already consumed in it)``, or ``None``.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 resume: Optional[tuple[int, int]] = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resume = resume

    def __iter__(self):
        indices = super().__iter__()
        if self.resume is not None and self.resume[0] == self.epoch:
            skip, self.resume = self.resume[1], None
            return itertools.islice(indices, skip, None)
        return indices


def epoch_sampler(dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                  resume: Optional[tuple[int, int]] = None) -> ResumableSampler:
    """A shuffling sampler whose order depends only on ``(seed, epoch)``; call ``set_epoch`` each epoch."""
    return ResumableSampler(dataset, seed, num_replicas=num_replicas, rank=rank, resume=resume)


def evaluation_batches(rows: int, batch_size: int, world: int = 1, min_rows: int = 1,
                       split: str = "validation") -> list[list[int]]:
    """The batches of an evaluation split of ``rows`` rows over ``world`` ranks, each row in exactly one:
    the batches one process reads in order (the last shorter, dropped below ``min_rows``); where their
    number is not a multiple of ``world``, the fewest last ones are split evenly into as many more as it
    takes. Rank ``r`` reads batches ``r, r + world, ...``.

    Raises:
        ValueError: where ``world`` ranks cannot get as many batches of ``min_rows`` rows or more.
    """
    sizes = [batch_size] * (rows // batch_size)
    if rows % batch_size >= min_rows:
        sizes.append(rows % batch_size)
    missing = -len(sizes) % world
    if missing:
        for last in range(1, len(sizes) + 1):
            tail = sum(sizes[-last:])
            if tail // (last + missing) >= min_rows:
                size, larger = divmod(tail, last + missing)
                sizes[-last:] = [size + 1] * larger + [size] * (last + missing - larger)
                break
        else:
            more = "add validation rows (val, val_fraction)" if split == "validation" else f"add {split} rows"
            raise ValueError(f"{rows} {split} rows cannot give each of the {world} ranks as many batches of at least "
                             f"{min_rows} row(s) without repeating rows: {more} or run on fewer devices")
    starts = itertools.accumulate(sizes, initial=0)
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


class EvaluationShard(DistributedSampler):
    """One rank's batches of an evaluation split (``evaluation_batches``): every row once over the ranks,
    and as many batches on every rank. Yields a list of row indices per batch (a DataLoader with
    ``batch_size=None`` reads it whole).

    Lightning's own ``DistributedSampler`` pads the split by repeating rows until the ranks hold as many:
    a validation mean then counts those rows twice. Unrepeated per-row shares (Lightning's for predict)
    leave ranks with different numbers of batches, and every forward under FSDP or ZeRO-3 (every KTO
    validation batch too: its KL reference point gathers every rank's rows) is a collective. Being a
    ``DistributedSampler``, it is kept by Lightning as it is.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, min_rows: int = 1,
                 split: str = "validation"):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batches = evaluation_batches(len(dataset), batch_size, num_replicas, min_rows, split)[rank::num_replicas]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _FormatDataModule(L.LightningDataModule):
    """Shared loading, validation, splitting and loaders.

    Subclasses set ``format`` and define ``make_collator(tokenizer) -> Callable``.
    """

    format: ClassVar[str]
    #: The fewest rows a batch may hold: ``batch_size`` below it is refused, and a loader drops a
    #: last batch that would be smaller (at most ``min_batch_rows - 1`` rows of an epoch per rank).
    min_batch_rows: ClassVar[int] = 1
    #: Appended to the ``batch_size`` error: why this format needs ``min_batch_rows``.
    min_batch_rows_reason: ClassVar[str] = ""

    def __init__(
        self,
        train: Union[str, list[str]],
        val: Optional[Union[str, list[str]]] = None,
        test: Optional[Union[str, list[str]]] = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        conversational: Optional[bool] = None,
        batch_size: int = 8,
        max_length: Optional[int] = 512,
        max_prompt_length: Optional[int] = None,
        truncation: Literal["error", "truncate"] = "error",
        on_invalid: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        hub_split: str = "train",
    ):
        """
        Args:
            train: training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a saved
                ``datasets`` directory, a ``datasets`` hub name, or a list of these.
            val: validation data, in the same forms; None holds out ``val_fraction`` of train.
            test: the data of ``lit-rlhf test`` (``trainer.test``), in the same forms; None: no test split.
            val_fraction: the fraction of train held out for validation when ``val`` is None
                (0 disables validation).
            split_seed: the seed of that hold-out split.
            conversational: whether rows are chat messages; None detects it from the first row.
            batch_size: examples per batch (per device).
            max_length: the longest prompt + completion in tokens; None for no limit.
            max_prompt_length: the longest prompt in tokens; None for no separate limit.
            truncation: "error" makes an over-long row an error at setup; "truncate" keeps the
                end of the prompt (behind its BOS) and cuts the completion on the right.
            on_invalid: "error" reports all invalid rows and stops before training; "skip"
                drops them and logs how many.
            num_workers: DataLoader worker processes.
            seed: the shuffling seed; the order of an epoch depends only on (seed, epoch).
            tokenizer: the tokenizer; None takes the LightningModule's ``.tokenizer`` in setup.
            hub_split: the split to load from a hub dataset or a saved DatasetDict.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if truncation not in ("error", "truncate"):
            raise ValueError(f"truncation must be 'error' or 'truncate', got {truncation!r}")
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        if batch_size < self.min_batch_rows:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= {self.min_batch_rows}, got {batch_size}"
                             + self.min_batch_rows_reason)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train = train
        self.val = val
        self.test = test
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.conversational = conversational
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.on_invalid = on_invalid
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self.hub_split = hub_split
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.test_examples: list[Example] = []
        self.collator: Optional[Callable] = None
        self._prepared_with: Any = None
        self._resumed_state: Optional[dict] = None
        self._train_sampler: Optional[ResumableSampler] = None

    # -- preparation ----------------------------------------------------------------------------

    def prepare(self, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> _FormatDataModule:
        """Load, validate and tokenise train, val and test; idempotent for the same tokenizer.

        Every row is validated before any is tokenised: with on_invalid="error", invalid rows are
        reported without tokenising the data (rows too long or split badly are found by tokenising).

        Raises:
            DataError: listing every invalid row (file, line, field), unless on_invalid="skip".
        """
        for candidate in (tokenizer, self.tokenizer, self._prepared_with):
            if candidate is not None:
                tokenizer = candidate
                break
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: pass tokenizer=..., call prepare(tokenizer), "
                             "or attach it to a Trainer whose LightningModule has a `.tokenizer` attribute")
        if tokenizer is self._prepared_with:
            return self
        errors: list[DataError] = []
        train_rows = self._load("train", errors)
        val_rows = self._load("val", errors) if self.val is not None else []
        test_rows = self._load("test", errors) if self.test is not None else []
        flag, hint = resolve_conversational(self.format, train_rows or val_rows, self.conversational)
        train_records, invalid = check_rows(self.format, train_rows, flag, hint)
        val_records, val_invalid = check_rows(self.format, val_rows, flag, hint)
        test_records, test_invalid = check_rows(self.format, test_rows, flag, hint)
        del train_rows, val_rows, test_rows  # the records hold what is kept of them
        errors += invalid + val_invalid + test_invalid
        if self.on_invalid == "error":  # before tokenising anything: a bad row costs a read of the data, no more
            report_invalid(errors, "error", f"the {self.format} data")
        settings = dict(conversational=flag, hint=hint, max_length=self.max_length,
                        max_prompt_length=self.max_prompt_length, truncation=self.truncation)
        train, train_errors = tokenize_records(self.format, train_records, tokenizer, **settings)
        val, val_errors = tokenize_records(self.format, val_records, tokenizer, **settings)
        test, test_errors = tokenize_records(self.format, test_records, tokenizer, **settings)
        report_invalid(errors + train_errors + val_errors + test_errors, self.on_invalid, f"the {self.format} data")
        if not train:
            raise DataError(f"no usable training rows in {self.train}")
        if self.val is None and self.val_fraction > 0:
            train, val = _hold_out(train, self.val_fraction, self.split_seed)
        self.train_examples, self.val_examples, self.test_examples = train, val, test
        self.collator = self.make_collator(tokenizer)
        self._prepared_with = tokenizer
        log.info("%s: %d train / %d val examples (%s)", type(self).__name__, len(train), len(val),
                 "conversational" if flag else "plain text")
        self._check_resumed_state()
        return self

    def _load(self, argument: str, errors: list[DataError]) -> list:
        """The rows of the source ``argument`` names; a missing source says which argument named it."""
        try:
            return load_rows(getattr(self, argument), self.hub_split, errors)
        except FileNotFoundError as error:
            raise SourceNotFound(argument, str(error)) from error

    def setup(self, stage: str) -> None:
        tokenizer = self.tokenizer
        if tokenizer is None and self.trainer is not None and self.trainer.lightning_module is not None:
            tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        self.prepare(tokenizer)

    @property
    def num_train_rows(self) -> int:
        return len(self.train_examples)

    @property
    def num_val_rows(self) -> int:
        return len(self.val_examples)

    # -- loaders --------------------------------------------------------------------------------

    def _require_prepared(self) -> None:
        if self.collator is None:
            raise RuntimeError(f"{type(self).__name__} is not prepared: call setup() or prepare(tokenizer) first")

    def train_dataloader(self) -> DataLoader:
        self._require_prepared()
        dataset = ExampleDataset(self.train_examples)
        replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = epoch_sampler(dataset, self.seed, replicas, rank, resume=self._resume_position())
        self._train_sampler = sampler
        # Its own generator: each new iterator would otherwise draw its workers' base seed from the
        # global RNG, one draw more in a resumed run than in the uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, generator=generator,
                          drop_last=self._drop_last(len(sampler)),
                          collate_fn=self.collator, num_workers=self.num_workers)

    def val_dataloader(self) -> Union[DataLoader, list]:
        return self._evaluation_loader(self.val_examples, "validation")

    def test_dataloader(self) -> Union[DataLoader, list]:
        return self._evaluation_loader(self.test_examples, "test")

    def _evaluation_loader(self, examples: list[Example], split: str) -> Union[DataLoader, list]:
        self._require_prepared()
        if not examples:
            return []  # Lightning skips the loop
        dataset = ExampleDataset(examples)
        replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        try:
            sampler = EvaluationShard(dataset, self.batch_size, replicas, rank, min_rows=self.min_batch_rows, split=split)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        return DataLoader(dataset, batch_size=None, sampler=sampler, generator=torch.Generator().manual_seed(self.seed),
                          collate_fn=self.collator, num_workers=self.num_workers)

    def _drop_last(self, rows_per_rank: int) -> bool:
        """Whether an epoch of ``rows_per_rank`` rows would end with a batch below ``min_batch_rows``."""
        remainder = rows_per_rank % self.batch_size
        return 0 < remainder < self.min_batch_rows

    # -- checkpoint state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The data position: the epoch order follows from (seed, epoch), plus the batches done in it."""
        state: dict[str, Any] = {"seed": self.seed, "num_train_rows": self.num_train_rows}
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # `processed` counts the batches whose step ran, unlike the loader's own count, which
            # runs ahead by the batch Lightning prefetches.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            # The epoch those batches belong to: `current_epoch` already counts it once it ended
            # (a checkpoint written after max_steps cut it short).
            epoch = max(trainer.fit_loop.epoch_progress.current.started - 1, 0)
            state["position"] = {"epoch": epoch, "batches": done}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_state = dict(state_dict)
        self._check_resumed_state()
        if self._train_sampler is not None:
            # A strategy that restores after setup (ModelParallelStrategy, configs/strategy/fsdp.yaml) does
            # so after the train loader was built to estimate the stepping batches: tell its sampler.
            self._train_sampler.resume = self._resume_position()

    def _resume_position(self) -> Optional[tuple[int, int]]:
        """``(epoch, samples of it already consumed on this rank)`` of a resumed run, else ``None``."""
        position = (self._resumed_state or {}).get("position")
        return None if position is None else (position["epoch"], position["batches"] * self.batch_size)

    def _check_resumed_state(self) -> None:
        state = self._resumed_state
        if state is None or self._prepared_with is None:
            return
        now = {k: v for k, v in self.state_dict().items() if k != "position"}
        if {k: v for k, v in state.items() if k != "position"} != now:
            log.warning("resuming with different data settings than the checkpoint (%s now, %s then): the data "
                        "order will not match the interrupted run", now, state)


def _hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(examples)))])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class PromptDataModule(_FormatDataModule):
    """Prompts for the online methods (PPO, RLOO, GRPO, on-policy GKD).

    Rows: ``{"prompt"}``. Batches: ``prompt_input_ids``, ``prompt_attention_mask``
    ``(batch, seq)`` left-padded; ``prompts`` (rendered strings); ``raw_prompts``.
    ``max_prompt_length`` (or else ``max_length``) bounds the prompt.
    """

    format = "prompt"

    def make_collator(self, tokenizer) -> Callable:
        return PromptCollator(pad_token_id_of(tokenizer))


class PreferenceDataModule(_FormatDataModule):
    """Preference pairs for reward modelling and the DPO family.

    Rows: ``{"prompt", "chosen", "rejected"}`` or implicit ``{"chosen", "rejected"}``.
    Batches: ``input_ids``, ``attention_mask``, ``completion_mask`` ``(2 * batch, seq)``,
    chosen rows first, then rejected rows.
    """

    format = "preference"

    def make_collator(self, tokenizer) -> Callable:
        return PreferenceCollator(pad_token_id_of(tokenizer))


class UnpairedDataModule(_FormatDataModule):
    """Unpaired, labelled completions for KTO.

    Rows: ``{"prompt", "completion", "label"}``. Batches: ``input_ids``, ``attention_mask``,
    ``completion_mask`` ``(batch, seq)``, ``labels`` ``(batch,)`` bool, and the mismatched KL
    batch ``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask``.

    KTO pairs each prompt with another row's completion, so ``batch_size`` must be at least 2,
    and when an epoch's rows (per rank) leave a last batch of one row, that row is dropped
    from this epoch (the order reshuffles each epoch, so it is a different row each time).
    Such a KL row keeps the head of its completion, up to the longest row of train and val
    (at most ``max_length``).
    """

    format = "unpaired"
    min_batch_rows = 2
    min_batch_rows_reason = (": KTO estimates its KL reference point by pairing each prompt with another row's "
                             "completion, so a batch of one row would pair a row with itself")

    def make_collator(self, tokenizer) -> Callable:
        # A KL row joins a prompt with another row's completion: with max_length null (or above the model's
        # positions) it can be longer than every row, and than the model's positions, which the setup checks
        # against the rows only. Cut at the longest row of the data (never above max_length, where TRL cuts), a
        # KL row is no longer than a row that check has read; the cut is fixed, as precomputed KL log-probs need.
        rows = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in self.train_examples + self.val_examples]
        limits = [n for n in (self.max_length, max(rows, default=None)) if n is not None]
        return UnpairedCollator(pad_token_id_of(tokenizer), min(limits, default=None))


class SFTDataModule(_FormatDataModule):
    """Demonstrations for SFT and supervised distillation.

    Rows: ``{"text"}``, ``{"messages"}`` (the last, assistant, message is the completion; with
    ``completion_only_loss`` every assistant turn carries loss, as with TRL's ``assistant_only_loss`` and
    torchtune, see ``lit_rlhf.data.tokenize``), or ``{"prompt", "completion"}``. Batches: ``input_ids``,
    ``attention_mask``, ``completion_mask`` ``(batch, seq)``; with ``packing``: ``input_ids``, ``position_ids``,
    ``completion_mask`` ``(rows, seq)`` and no attention mask.
    """

    format = "sft"

    def __init__(
        self,
        train: Union[str, list[str]],
        val: Optional[Union[str, list[str]]] = None,
        test: Optional[Union[str, list[str]]] = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        conversational: Optional[bool] = None,
        batch_size: int = 8,
        max_length: Optional[int] = 512,
        max_prompt_length: Optional[int] = None,
        truncation: Literal["error", "truncate"] = "error",
        on_invalid: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        hub_split: str = "train",
        packing: bool = False,
        completion_only_loss: bool = True,
    ):
        """
        Args:
            train: training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a saved
                ``datasets`` directory, a ``datasets`` hub name, or a list of these.
            val: validation data, in the same forms; None holds out ``val_fraction`` of train.
            test: the data of ``lit-rlhf test`` (``trainer.test``), in the same forms; None: no test split.
            val_fraction: the fraction of train held out for validation when ``val`` is None.
            split_seed: the seed of that hold-out split.
            conversational: whether rows are chat messages; None detects it from the first row.
            batch_size: examples per batch (per device).
            max_length: the longest prompt + completion in tokens, and the longest packed row.
            max_prompt_length: the longest prompt in tokens; None for no separate limit.
            truncation: "error" makes an over-long row an error at setup; "truncate" keeps the
                end of the prompt (behind its BOS) and cuts the completion on the right.
            on_invalid: "error" reports all invalid rows before training; "skip" drops them.
            num_workers: DataLoader worker processes.
            seed: the shuffling seed; the order of an epoch depends only on (seed, epoch).
            tokenizer: the tokenizer; None takes the LightningModule's ``.tokenizer`` in setup.
            hub_split: the split to load from a hub dataset or a saved DatasetDict.
            packing: pack each batch's examples padding-free into rows of at most
                ``max_length`` tokens (needs a model that reads packed ``position_ids``).
            completion_only_loss: take the loss on completion tokens (and a ``messages`` row's
                earlier assistant turns) only.
        """
        super().__init__(train, val, test, val_fraction, split_seed, conversational, batch_size, max_length,
                         max_prompt_length, truncation, on_invalid, num_workers, seed, tokenizer, hub_split)
        self.packing = packing
        self.completion_only_loss = completion_only_loss

    def make_collator(self, tokenizer) -> Callable:
        if self.packing:
            return PackingCollator(pad_token_id_of(tokenizer), self.completion_only_loss, self.max_length)
        return SFTCollator(pad_token_id_of(tokenizer), self.completion_only_loss)
