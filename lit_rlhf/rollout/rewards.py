"""Reward sources for the online methods: one interface, several kinds, weighted together.

A source maps a batch of (prompt, response) to one float per row:

- ``adapter``: a score adapter on the SAME bank as the policy (``bank.score(..., adapter=)``);
  the bank's role context restores the policy adapter afterwards.
- ``model``: a separate reward model from a path (:class:`RewardScorer`, which ``score_texts``
  also uses): a saved lit_rlhf reward adapter directory on its own base, a merged lit_rlhf reward
  model, or a transformers model with a score head (``AutoModelForSequenceClassification``). It
  may use another tokenizer: the text is decoded and re-tokenised as its training rows were.
- ``function``: a Python function named ``module:function``, called as
  ``fn(prompts: list[str], completions: list[str]) -> list[float]``, one entry per rollout row
  (each prompt repeated for its samples). A plain prompt is the dataset's string as written; a
  conversational one is the policy's chat template rendering of its messages, generation prompt
  included (special tokens as text, a default system prompt the template adds; not the message
  list TRL passes). A completion is the reply decoded without its stop token and special tokens.
  It is imported from the module the name gives, nowhere else; what it returns is checked (one
  real number per completion) and an exception it raises is reported with its name (:class:`RewardError`).

``Rewards`` combines them: each source's score is normalised (none, fixed mean/std, the
``normalization`` saved in a reward adapter's ``lit_rlhf.json``, or running statistics),
weighted and summed; the sum is clipped, then the missing-EOS rule is applied to responses that
hit ``max_new_tokens`` without a stop token (so a replaced score is exactly the configured value).

A non-finite score (NaN, Inf) from any source is an error naming the source (``nonfinite:
error``, the default), or, with ``nonfinite: skip``, the row is marked invalid (``RewardOutput.valid``,
its score NaN), counted, and left out of the running statistics; the online methods then drop
the rollout rows of every prompt with an invalid row (see ``OnlineMethod.drop_unscored``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from lit_rlhf.data import SFTCollator, Where, pad_token_id_of, tokenize_record
from lit_rlhf.data.tokenize import end_of_turn_ids, join_prompt_completion
from lit_rlhf.distributed import all_rows
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer, read_adapter_meta
from lit_rlhf.models.loading import text_config
from lit_rlhf.models.positions import position_limit
from lit_rlhf.models.saving import HEAD_FILE
from lit_rlhf.rollout.engine import Rollout

log = logging.getLogger("lit_rlhf.rollout")

__all__ = [
    "AdapterReward",
    "FunctionReward",
    "ModelReward",
    "Normalizer",
    "RewardError",
    "RewardOutput",
    "RewardRequest",
    "RewardScorer",
    "RewardSource",
    "RewardSpec",
    "Rewards",
    "Text",
    "build_source",
    "load_function",
    "score_texts",
]


@dataclass
class RewardSpec:
    """One reward source, as a config names it.

    ``rewards: [{kind: function, function: "lit_rlhf.toy:reward", weight: 1.0}]``

    Args:
        kind: ``adapter`` (a score adapter on the policy's bank), ``model`` (a separate model from
            ``path``) or ``function`` (a Python function named by ``function``).
        weight: this source's weight in the sum.
        adapter: for ``adapter``: the bank adapter with a score head (declare its ``path`` under
            ``bank.adapters``; it is always frozen).
        path: for ``model``: a saved lit_rlhf reward adapter directory (``adapter_config.json`` +
            ``head.safetensors``), a merged lit_rlhf reward model (``config.json`` +
            ``head.safetensors``), or a transformers model directory with a one-label
            sequence-classification (score) head.
        base: for ``model`` with an adapter directory: the base model it was trained on; the one
            its ``lit_rlhf.json`` records (else its ``base_model_name_or_path``) when ``None``.
        tokenizer: for ``model``: where its tokenizer is; the recorded one, else ``path`` (or
            ``base``), when ``None``.
        dtype: for ``model``: weights dtype of the separate model.
        append_eos: for ``model``: close responses that ended with a stop token as the reward
            model's training rows were (plain text: its EOS; a chat reply: its template's turn end);
            a response cut at ``max_new_tokens`` is never closed.
        function: for ``function``: ``"package.module:function"``.
        normalize: ``none``; ``fixed`` (``(r - mean) / std``); ``saved`` (mean/std from the
            ``normalization`` entry of the reward adapter's ``lit_rlhf.json``); ``running``
            (mean/std of every score seen in training so far, saved in checkpoints).
        mean: for ``fixed``.
        std: for ``fixed``.
        name: the metric name (``objective/scores/<name>``); derived from the source when ``None``.
        nonfinite: what a NaN or infinite score does: ``error`` stops the run naming the source;
            ``skip`` drops the rollout rows of the prompts it happened to (all their samples,
            so group baselines stay whole) and counts them (``rollout/skipped_nonfinite``).
    """

    kind: Literal["adapter", "model", "function"]
    weight: float = 1.0
    adapter: str = "reward"
    path: str | None = None
    base: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    append_eos: bool = True
    function: str | None = None
    normalize: Literal["none", "fixed", "saved", "running"] = "none"
    mean: float = 0.0
    std: float = 1.0
    name: str | None = None
    nonfinite: Literal["error", "skip"] = "error"

    def __post_init__(self):
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"reward nonfinite must be 'error' or 'skip', got {self.nonfinite!r}")


class RewardError(ValueError):
    """A reward source failed or returned something that is not one finite number per completion."""


class RewardRequest(NamedTuple):
    """What a source is asked to score; every list has one entry per rollout row.

    Attributes:
        prompts: rendered prompt text (chat template applied when conversational).
        completions: response text, without the stop token and special tokens.
        rollout: the same rows as token ids of the policy's tokenizer.
        raw_prompts: the dataset's ``prompt`` fields (strings or message lists), when known.
    """

    prompts: list[str]
    completions: list[str]
    rollout: Rollout
    raw_prompts: list | None = None


class RewardSource(ABC):
    """Scores (prompt, response) rows. ``setup`` is called once with the policy's bank and tokenizer."""

    name: str = "reward"
    #: What error messages call the source, e.g. ``reward function 'my_rewards:length'``.
    label: str = "reward source"

    def setup(self, bank: AdapterBank, tokenizer) -> None:  # noqa: B027 - optional hook
        """Load what the source needs (models, functions); called once before the first call."""

    @abstractmethod
    def __call__(self, request: RewardRequest) -> torch.Tensor:
        """``(batch,)`` float32 scores on the rollout's device."""

    def saved_normalization(self) -> dict | None:
        """``{"mean": m, "std": s}`` saved with the reward model, if any."""
        return None


# -- sources ------------------------------------------------------------------------------------


class AdapterReward(RewardSource):
    """A score adapter on the policy's own bank: one base model, no second copy in memory.

    Args:
        adapter: the adapter name (it must have a ``score`` head).
    """

    def __init__(self, adapter: str = "reward"):
        self.adapter = adapter
        self.name = adapter
        self.label = f"reward adapter {adapter!r}"
        self.bank: AdapterBank | None = None

    def setup(self, bank: AdapterBank, tokenizer) -> None:
        if self.adapter not in bank.adapters or bank.adapters[self.adapter].head != "score":
            raise KeyError(
                f"reward source 'adapter' needs adapter {self.adapter!r} with a score head on the bank; "
                f"the bank has {sorted(bank.adapters)}"
            )
        self.bank = bank

    @torch.no_grad()
    def __call__(self, request: RewardRequest) -> torch.Tensor:
        r = request.rollout
        # bank.score switches to the reward adapter inside bank.role(), which restores the active one.
        return self.bank.score(r.input_ids, r.attention_mask, adapter=self.adapter, position_ids=r.position_ids).float()

    def saved_normalization(self) -> dict | None:
        path = self.bank.adapters[self.adapter].path if self.bank is not None else None
        return read_adapter_meta(path).get("normalization") if path else None


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_function(target: str) -> Callable:
    """The callable named ``"package.module:function"`` (dots after the colon reach attributes).

    Only that module is imported and only its attributes are read: no ``eval``, no search of
    other modules, so the config says exactly which code runs.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise ValueError(f"a reward function is named 'module:function' (dotted Python names), e.g. "
                         f"'lit_rlhf.toy:reward'; got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {target!r} is not callable")
    return obj


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__} ({repr(value)[:40]})"


def _is_real(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex()
    return isinstance(value, numbers.Real)


def check_scores(values: Any, n: int, label: str) -> torch.Tensor:
    """``values`` as a ``(n,)`` float32 tensor, or a :class:`RewardError` saying what is wrong.

    Accepted: a list or tuple of ``n`` real numbers (Python, numpy or 0-d tensors; booleans are
    0/1), or a tensor / array of shape ``(n,)``. NaN and Inf pass here; ``Rewards`` decides on them.
    """
    if isinstance(values, torch.Tensor) or (hasattr(values, "__array__") and not isinstance(values, (list, tuple))):
        tensor = torch.as_tensor(values)
        if tuple(tensor.shape) != (n,):
            raise RewardError(f"{label} returned a tensor of shape {tuple(tensor.shape)} for {n} completions; "
                              f"return one number per completion, shape ({n},)")
        if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
            raise RewardError(f"{label} returned a tensor of dtype {tensor.dtype}; return real numbers")
        return tensor.detach().to("cpu", torch.float32)
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{label} returned {_kind(values)}; return a list of {n} numbers, one per completion")
    if len(values) != n:
        raise RewardError(f"{label} returned {len(values)} values for {n} completions; return one number per completion")
    bad = [i for i, v in enumerate(values) if not _is_real(v)]
    if bad:
        more = f" (and {len(bad) - 1} more non-numbers)" if len(bad) > 1 else ""
        raise RewardError(f"{label} returned {_kind(values[bad[0]])} at index {bad[0]}{more}; every value must be a "
                          "real number (int, float or bool)")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class FunctionReward(RewardSource):
    """A Python function ``fn(prompts: list[str], completions: list[str]) -> list[float]``: the
    ``RewardRequest``'s rendered prompts (a conversational prompt as the policy's chat template
    renders it, not its messages) and reply texts (see the module docstring).

    Args:
        function: ``"module:function"``, or the callable itself.
    """

    def __init__(self, function: str | Callable):
        self.fn = load_function(function) if isinstance(function, str) else function
        self.name = function.rpartition(":")[2] if isinstance(function, str) else getattr(function, "__name__", "function")
        target = function if isinstance(function, str) else (
            f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}")
        self.label = f"reward function {target!r}"

    def __call__(self, request: RewardRequest) -> torch.Tensor:
        try:
            values = self.fn(list(request.prompts), list(request.completions))
        except Exception as e:  # noqa: BLE001 - user code: re-raised with its name, the cause chained
            raise RewardError(f"{self.label} raised {type(e).__name__}: {e}") from e
        scores = check_scores(values, len(request.completions), self.label)
        return scores.to(request.rollout.response_ids.device)


# -- reward models read from disk: one loader, one tokenisation -------------------------------------

#: What a reward model scores: a string (prompt and completion together), a ``(prompt, completion)``
#: pair, or a list of chat messages whose last one is the assistant's reply.
Text = str | tuple[str, str] | list[dict]


class RewardScorer:
    """Scores texts with a reward model: a lit_rlhf reward adapter on its base, a merged lit_rlhf
    reward model, or a transformers sequence-classification model with one label.

    Texts are tokenised by the data pipeline (``lit_rlhf.data.tokenize_record``), as the reward
    model's training rows were: a string gets the tokenizer's special tokens (its bos) and a
    closing eos; a pair is joined as the pipeline joins a prompt and its completion; messages are
    rendered by the chat template, which owns the special tokens. A text whose response was cut
    off (``ended`` False: it reached ``max_new_tokens`` without a stop token) gets no closing eos,
    and a chat reply no turn end. A text longer than the model's positions (past them GPT-2 fails
    with an index error, a rotary model reads positions it was never trained at) keeps its end, where
    the score is read, behind its bos; the first such text is logged.

    Args:
        model: an ``AdapterBank`` carrying ``adapter`` with a ``score`` head, or a transformers
            model whose logits are ``(batch, 1)`` scores.
        tokenizer: the tokenizer the reward model was trained with.
        adapter: the reward adapter's name on a bank.
        normalization: ``{"mean", "std"}`` applied when scoring with ``normalize=True``.
        batch_size: texts per forward pass.
    """

    def __init__(self, model: nn.Module, tokenizer, *, adapter: str = "reward",
                 normalization: dict[str, float] | None = None, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.normalization = normalization
        self.batch_size = batch_size
        # A sequence classifier reads its score at the last token that is not its config's pad id, whatever the
        # attention mask says: padded with another id (the tokenizer's), a shorter row would be read on padding.
        pad = None if isinstance(model, AdapterBank) else _classifier_pad_id(model)
        self.collate = SFTCollator(pad if pad is not None else pad_token_id_of(tokenizer))
        config = model.model.config if isinstance(model, AdapterBank) else getattr(model, "config", None)
        self.positions = position_limit(config) if config is not None else None
        self._warned_positions = False

    @classmethod
    def load(cls, path: str | Path, *, base: str | None = None, tokenizer: str | None = None,
             adapter: str = "reward", dtype: str = "float32", batch_size: int = 32,
             device: str | torch.device = "cpu") -> RewardScorer:
        """A frozen scorer, in eval mode, from a directory.

        Args:
            path: a saved reward adapter (``RewardModeling.export``: PEFT files + ``HEAD_FILE``), a merged
                reward model (``save_pretrained`` + ``HEAD_FILE``), or a transformers
                sequence-classification model (one label, safetensors weights).
            base: the base model an adapter was trained on; by default the one recorded in its
                ``META_FILE`` (``base_model``), else PEFT's ``base_model_name_or_path``. It is loaded
                quantized as the adapter records (``quantization``: a QLoRA adapter on a 4-bit base).
            tokenizer: the tokenizer; by default the recorded one (when ``base`` is not given),
                else the base's (the model's own for a full model).
            adapter: the name the reward adapter gets on the bank.
            dtype: weights dtype.
            batch_size: texts per forward pass.
            device: where to run.

        Raises:
            ValueError: an adapter trained on a base of another architecture or vocabulary, a
                model with more than one label, or no base model to load an adapter onto.
        """
        path = Path(path)
        meta = read_adapter_meta(path)
        if (path / "adapter_config.json").exists():
            if base is None:
                base = adapter_base(path)
                tokenizer = tokenizer or meta.get("tokenizer")
            if not base:
                raise ValueError(f"reward adapter {path} records no base model: pass the model it was trained on "
                                 "(base=... in Python, `base` in a reward spec)")
            # An adapter corrects the weights it was trained against: a QLoRA one needs its base quantized alike.
            quantized = meta.get("quantization") or {}
            spec = BankSpec(model=str(base), tokenizer=tokenizer, dtype=dtype, quantization=quantized.get("mode"),
                            quant_type=quantized.get("quant_type", "nf4"), double_quant=quantized.get("double_quant", True),
                            adapters=[AdapterSpec(adapter, path=str(path), head="score", trainable=False)])
            model = AdapterBank(spec)
        elif (path / "config.json").exists() and (path / HEAD_FILE).exists():
            spec = BankSpec(model=str(path), tokenizer=tokenizer, dtype=dtype, train_mode="full",
                            adapters=[AdapterSpec(adapter, head="score", trainable=False)])
            model = AdapterBank(spec)
            model.heads[adapter].load_state_dict(load_file(str(path / HEAD_FILE)))
        elif (path / "config.json").exists():
            spec = BankSpec(model=str(path), tokenizer=tokenizer, dtype=dtype)
            model = _sequence_classifier(path, dtype)
        else:
            raise FileNotFoundError(f"{path} is not a reward model: no saved reward adapter (adapter_config.json), "
                                    f"merged reward model (config.json + {HEAD_FILE}) or transformers model (config.json)")
        tokenizer = load_tokenizer(spec)
        if not isinstance(model, AdapterBank) and _classifier_pad_id(model) is None:
            # Sequence classifiers read the score at the last token that is not padding.
            text_config(model.config).pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        model.eval().to(device)
        log.info("reward model %s loaded (%s)", path, type(model).__name__)
        return cls(model, tokenizer, adapter=adapter, normalization=meta.get("normalization"), batch_size=batch_size)

    def to(self, device: str | torch.device) -> RewardScorer:
        self.model.to(device)
        return self

    def encode(self, texts: Sequence[Text], *, ended: Sequence[bool] | None = None) -> list[dict]:
        """The data pipeline's sft examples of ``texts`` (``prompt_ids``, ``completion_ids``).

        Args:
            texts: what to score (see :data:`Text`).
            ended: per text, whether its response ended with a stop token; one that did not loses
                the closing eos (a chat reply: its turn end). ``None``: every response ended.
        """
        examples = []
        for i, text in enumerate(texts):
            record, conversational = _sft_record(text, i)
            if conversational and getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(f"text {i} is a list of chat messages but the reward tokenizer has no chat template")
            example, _ = tokenize_record("sft", record, self.tokenizer, Where("texts", i + 1, "row", "python"),
                                         conversational=conversational, max_length=None)
            if ended is not None and not ended[i]:
                example["completion_ids"] = self._unclosed(example["completion_ids"], conversational)
            examples.append(example)
        return examples

    def _unclosed(self, ids: list[int], conversational: bool) -> list[int]:
        """A cut-off response's ids without the close the pipeline gave it (plain text: the eos; a chat
        reply: the template's turn end or eos, and the whitespace the template wrote before it, as
        Llama-2's ``' ' + eos``): a reward model reads a complete answer at that close, so a response
        cut at ``max_new_tokens`` would otherwise be scored as if the policy had finished it."""
        eos = self.tokenizer.eos_token_id
        close = {eos} | set(end_of_turn_ids(self.tokenizer)) if conversational else {eos}
        if not ids or ids[-1] not in close:
            return ids
        ids = ids[:-1]
        while conversational and ids and not self.tokenizer.decode(ids[-1:]).strip():
            ids = ids[:-1]
        return ids

    @torch.no_grad()
    def scores(self, texts: Sequence[Text], *, ended: Sequence[bool] | None = None) -> torch.Tensor:
        """``(len(texts),)`` float32 raw scores on the model's device (``ended``: see :meth:`encode`)."""
        examples = [self._fit_positions(example) for example in self.encode(texts, ended=ended)]
        device = next(self.model.parameters()).device
        scores = [torch.zeros(0, device=device)]
        for start in range(0, len(examples), self.batch_size):
            batch = self.collate(examples[start : start + self.batch_size])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if isinstance(self.model, AdapterBank):
                scores.append(self.model.score(ids, mask, adapter=self.adapter).float())
            else:
                scores.append(self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float())
        return torch.cat(scores)

    def _fit_positions(self, example: dict) -> dict:
        """``example``, or, when it is longer than the model's positions, its bos and its last tokens."""
        ids = example["prompt_ids"] + example["completion_ids"]
        if self.positions is None or len(ids) <= self.positions[1]:
            return example
        key, limit = self.positions
        head = ids[:1] if ids[0] == self.tokenizer.bos_token_id else []
        if not self._warned_positions:
            self._warned_positions = True
            log.warning("a %d-token text is longer than the reward model's %d positions (%s=%d): it is scored on its "
                        "last %d tokens (and its bos); shorten the prompts or the replies to score them whole "
                        "(warned once)", len(ids), limit, key, limit, limit - len(head))
        return {"prompt_ids": head, "completion_ids": ids[len(ids) - limit + len(head):]}

    def __call__(self, texts: Sequence[Text], *, normalize: bool = False) -> list[float]:
        """One score per text; ``normalize`` maps them to ``(score - mean) / std`` of the recorded statistics."""
        if normalize and not self.normalization:
            raise ValueError("this reward model records no normalization statistics (train it with normalize_on set)")
        scores = self.scores(texts)
        if normalize:
            scores = (scores - self.normalization["mean"]) / max(self.normalization["std"], 1e-8)
        return scores.cpu().tolist()


def _sft_record(text: Text, index: int) -> tuple[dict, bool]:
    """``(sft record, conversational)`` of one text to score; a pair is scored as its joined text."""
    if isinstance(text, str):
        return {"prompt": None, "completion": text}, False
    if isinstance(text, tuple) and len(text) == 2 and all(isinstance(t, str) for t in text):
        return {"prompt": None, "completion": join_prompt_completion(*text)}, False
    if (isinstance(text, list) and text and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in text)
            and text[-1].get("role") == "assistant"):
        return {"prompt": text[:-1], "completion": text[-1:]}, True
    raise TypeError(f"text {index}: expected a string, a (prompt, completion) pair of strings, or a list of "
                    f'{{"role", "content"}} messages ending with the assistant\'s reply; got {repr(text)[:80]}')


def adapter_base(path: str | Path) -> str | None:
    """The base a saved adapter was trained on: the one its ``META_FILE`` records, else PEFT's
    ``base_model_name_or_path``."""
    peft_base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return read_adapter_meta(path).get("base_model") or peft_base


def _classifier_pad_id(model: nn.Module) -> int | None:
    """The pad id a transformers sequence classifier reads its score before: its text config's (transformers'
    ``GenericForSequenceClassification``), as Gemma 3's multimodal classifier names none at its config's top level."""
    config = getattr(model, "config", None)
    return None if config is None else getattr(text_config(config), "pad_token_id", None)


def _sequence_classifier(path: Path, dtype: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from lit_rlhf.models.loading import DTYPES, require_safetensors

    require_safetensors(str(path), what="reward model", convert=(
        "AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=False).save_pretrained(path)"))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True)
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {path} has {model.config.num_labels} labels; a reward model has 1")
    return model


def score_texts(path: str | Path, texts: Sequence[Text], *, base: str | None = None, batch_size: int = 32,
                normalize: bool = False) -> list[float]:
    """Score ``texts`` with the reward model saved at ``path``, in one call (see :class:`RewardScorer`).

    Example::

        score_texts("runs/reward/lightning_logs/version_0/export/adapter", ["the movie was great fun ."])
    """
    return RewardScorer.load(path, base=base, batch_size=batch_size)(texts, normalize=normalize)


class ModelReward(RewardSource):
    """A separate reward model (:meth:`RewardScorer.load`), with its own tokenizer: the text is
    decoded and re-tokenised as the reward model's training rows were.

    The text scored is the rendered prompt and the completion as a pair, or, for conversational
    prompts and a reward tokenizer with a chat template, the messages plus an assistant turn
    rendered with the reward tokenizer's own template. A response that reached ``max_new_tokens``
    without a stop token is scored open: no closing eos after plain text, no turn end after a chat
    reply (nor does any response get one with ``append_eos=False``).

    Args:
        path: the reward adapter, merged reward model or transformers model directory.
        base: for an adapter directory, the base model; the recorded one when ``None``.
        tokenizer: the tokenizer directory; the recorded one, or the model's, when ``None``.
        dtype: weights dtype.
        append_eos: close each response that ended with a stop token as the reward model's
            training rows were (plain text: the reward tokenizer's eos; a chat reply: its turn end).
    """

    def __init__(self, path: str, *, base: str | None = None, tokenizer: str | None = None, dtype: str = "float32",
                 append_eos: bool = True):
        self.path = path
        self.base = base
        self.tokenizer_path = tokenizer
        self.dtype = dtype
        self.append_eos = append_eos
        self.name = Path(path).name or "model"
        self.label = f"reward model {path!r}"
        self.scorer: RewardScorer | None = None
        self._warned_tags = False
        self._tags: list[str] | None = None  # the reward tokenizer's multi-character special tokens

    def setup(self, bank: AdapterBank | None = None, tokenizer=None) -> None:
        if self.scorer is None:
            self.scorer = RewardScorer.load(self.path, base=self.base, tokenizer=self.tokenizer_path, dtype=self.dtype)

    def texts(self, request: RewardRequest) -> list[Text]:
        self._warn_on_tags(request.completions)
        chat = getattr(self.scorer.tokenizer, "chat_template", None) is not None
        raw = request.raw_prompts or [None] * len(request.prompts)
        return [list(raw_prompt) + [{"role": "assistant", "content": completion}]
                if isinstance(raw_prompt, list) and chat else (prompt, completion)
                for prompt, completion, raw_prompt in zip(request.prompts, request.completions, raw)]

    def _warn_on_tags(self, completions: list[str]) -> None:
        """Warn (once) when a response spells one of the reward tokenizer's special tokens as text: it is
        re-tokenised as that token (a turn end, a header), so the reward model reads a conversation the
        policy wrote rather than its reply, which a policy can learn to exploit."""
        if self._warned_tags:
            return
        if self._tags is None:
            tok = self.scorer.tokenizer
            tags = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
            self._tags = sorted(tag for tag in tags if len(tag) > 1)
        found = [tag for tag in self._tags if any(tag in c for c in completions)]
        if found:
            self._warned_tags = True
            log.warning("%s: a response contains %s as text, which the reward tokenizer reads as special token(s); "
                        "the reward model scores that markup (warned once)", self.label, ", ".join(found))

    @torch.no_grad()
    def __call__(self, request: RewardRequest) -> torch.Tensor:
        self.setup()
        ended = request.rollout.ended.tolist() if self.append_eos else [False] * len(request.completions)
        return self.scorer.to(request.rollout.response_ids.device).scores(self.texts(request), ended=ended)

    def saved_normalization(self) -> dict | None:
        return read_adapter_meta(self.path).get("normalization")

    def config_source(self) -> str | None:
        """Where the config stating the reward model's positions is, read without loading weights: the base
        of an adapter directory, else the model directory itself; ``None`` when ``path`` is neither (loading
        it says so)."""
        path = Path(self.path)
        if (path / "adapter_config.json").exists():
            return self.base or adapter_base(path)
        return self.path if (path / "config.json").exists() else None


def build_source(spec: RewardSpec) -> RewardSource:
    """The source a ``RewardSpec`` describes."""
    if spec.kind == "adapter":
        source = AdapterReward(spec.adapter)
    elif spec.kind == "model":
        if not spec.path:
            raise ValueError("reward source 'model' needs a path (a transformers reward model or a saved reward adapter)")
        source = ModelReward(spec.path, base=spec.base, tokenizer=spec.tokenizer, dtype=spec.dtype,
                             append_eos=spec.append_eos)
    elif spec.kind == "function":
        if not spec.function:
            raise ValueError("reward source 'function' needs function: 'module:function'")
        source = FunctionReward(spec.function)
    else:
        raise ValueError(f"unknown reward kind {spec.kind!r}; use adapter, model or function")
    if spec.name:
        source.name = spec.name
    return source


# -- normalisation and the combination ------------------------------------------------------------


class Normalizer:
    """``(r - mean) / std`` with fixed statistics, or running ones (Chan et al. parallel update).

    Args:
        kind: ``none``, ``fixed`` or ``running`` (``saved`` is resolved to ``fixed`` by ``Rewards.setup``).
        mean, std: the fixed statistics.
        eps: added to a running std.
    """

    def __init__(self, kind: str = "none", mean: float = 0.0, std: float = 1.0, eps: float = 1e-8):
        if kind == "fixed" and not std > 0:
            raise ValueError(f"normalisation std must be > 0, got {std}")
        self.kind, self.mean, self.std, self.eps = kind, float(mean), float(std), eps
        self.count, self.m2 = 0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Fold the scores ``x`` ``(n,)`` of every rank (a collective) into running statistics, so
        they stay the same on every rank under DDP."""
        if self.kind != "running":
            return
        x = all_rows(x)
        if x.numel() == 0:
            return
        x = x.double().cpu()
        n, mean, m2 = x.numel(), x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total
        self.std = math.sqrt(self.m2 / max(total - 1, 1)) if total > 1 else 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        std = self.std + (self.eps if self.kind == "running" else 0.0)
        return (x - self.mean) / std

    def state_dict(self) -> dict:
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "count": self.count, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.mean, self.std = state["kind"], state["mean"], state["std"]
        self.count, self.m2 = state["count"], state["m2"]


class RewardOutput(NamedTuple):
    """Attributes:
        scores: ``(batch,)`` float32, the final reward (normalised, weighted, clipped, EOS rule
            applied); NaN in the rows that are not ``valid``.
        per_source: ``{name: (batch,)}`` each source's raw score, before normalisation.
        valid: ``(batch,)`` bool, the rows every source scored with a finite number (all of them
            unless a source has ``nonfinite: skip``).
    """

    scores: torch.Tensor
    per_source: dict[str, torch.Tensor]
    valid: torch.Tensor


class Rewards:
    """Several reward sources weighted together, with normalisation, clipping and the missing-EOS rule.

    Args:
        specs: the sources (``RewardSpec``), or already built ``RewardSource`` objects (weight 1,
            no normalisation).
        clip: clip the weighted sum to ``[-clip, clip]``; ``None`` for no clipping.
        missing_eos_penalty: subtracted from the reward of a response that reached
            ``max_new_tokens`` without a stop token (TRL's ``missing_eos_penalty``).
        missing_eos_score: replaces the reward of such a response (TRL's older
            ``non_eos_penalty`` + ``penalty_reward_value``); applied after the penalty.
    """

    def __init__(self, specs: Sequence[RewardSpec | RewardSource], *, clip: float | None = None,
                 missing_eos_penalty: float | None = None, missing_eos_score: float | None = None):
        if not specs:
            raise ValueError("the online methods need at least one reward source under `rewards`")
        self.specs = [s if isinstance(s, RewardSpec) else None for s in specs]
        self.nonfinite = [s.nonfinite if isinstance(s, RewardSpec) else "error" for s in specs]
        #: Rows whose score was non-finite and skipped, over the whole run (saved in checkpoints).
        self.skipped_nonfinite = 0
        self.sources = [build_source(s) if isinstance(s, RewardSpec) else s for s in specs]
        self.weights = [s.weight if isinstance(s, RewardSpec) else 1.0 for s in specs]
        # ``saved`` statistics are read in setup(), once the reward model is known.
        self.normalizers = [
            Normalizer(s.normalize, s.mean, s.std) if isinstance(s, RewardSpec) and s.normalize != "saved" else Normalizer()
            for s in specs
        ]
        names = [src.name for src in self.sources]
        for i, name in enumerate(names):
            if names.count(name) > 1:
                self.sources[i].name = f"{name}_{i}"
        if clip is not None and clip <= 0:
            raise ValueError(f"reward clip must be > 0, got {clip}")
        self.clip = clip
        self.missing_eos_penalty = missing_eos_penalty
        self.missing_eos_score = missing_eos_score

    @property
    def adapter_names(self) -> list[str]:
        """Bank adapters the sources read (they must carry a score head and stay frozen)."""
        return [s.adapter for s in self.sources if isinstance(s, AdapterReward)]

    def setup(self, bank: AdapterBank, tokenizer) -> None:
        for i, (spec, source) in enumerate(zip(self.specs, self.sources)):
            source.setup(bank, tokenizer)
            if spec is not None and spec.normalize == "saved":
                saved = source.saved_normalization()
                if not saved or "mean" not in saved or "std" not in saved:
                    raise ValueError(
                        f"reward source {source.name!r}: normalize 'saved' needs a `normalization: {{mean, std}}` entry "
                        "in the reward adapter's lit_rlhf.json, and there is none; use 'fixed' with mean/std or 'running'"
                    )
                self.normalizers[i] = Normalizer("fixed", saved["mean"], saved["std"])
                log.info("reward %s normalised with saved mean %.4g, std %.4g", source.name, saved["mean"], saved["std"])

    def __call__(self, request: RewardRequest, *, update_stats: bool = True) -> RewardOutput:
        """Score the request; ``update_stats=False`` (validation) leaves running statistics alone."""
        device = request.rollout.response_ids.device
        n = len(request.completions)
        total = torch.zeros(n, dtype=torch.float32, device=device)
        valid = torch.ones(n, dtype=torch.bool, device=device)
        per_source = {}
        for source, weight, normalizer, nonfinite in zip(self.sources, self.weights, self.normalizers, self.nonfinite):
            raw = source(request).to(device=device, dtype=torch.float32)
            finite = self._check_finite(raw, source, nonfinite, request)
            valid &= finite
            per_source[source.name] = raw
            if update_stats:
                normalizer.update(raw[finite])
            total = total + weight * normalizer(raw)
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        missing = ~request.rollout.ended.to(device)
        if self.missing_eos_penalty is not None:
            total = torch.where(missing, total - self.missing_eos_penalty, total)
        if self.missing_eos_score is not None:
            total = torch.where(missing, torch.full_like(total, self.missing_eos_score), total)
        # A skipped row has no reward: the EOS rule must not hand it a plausible one.
        total = total.masked_fill(~valid, float("nan"))
        return RewardOutput(total, per_source, valid)

    def _check_finite(self, raw: torch.Tensor, source: RewardSource, nonfinite: str, request: RewardRequest) -> torch.Tensor:
        """``(batch,)`` bool, the finite scores; a non-finite one is an error unless the source skips them."""
        finite = torch.isfinite(raw)
        if bool(finite.all()):
            return finite
        bad = (~finite).nonzero().flatten().tolist()
        first = bad[0]
        where = (f"{len(bad)} of {raw.numel()} completions, first at row {first} "
                 f"({raw[first].item()} for completion {request.completions[first][:60]!r})")
        if nonfinite == "error":
            raise RewardError(f"{source.label} returned a non-finite score for {where}; fix the source, or set "
                              "nonfinite: skip on its reward spec to drop those prompts' rollout rows")
        self.skipped_nonfinite += len(bad)
        log.warning("%s returned a non-finite score for %s: skipped (nonfinite: skip; %d so far)",
                    source.label, where, self.skipped_nonfinite)
        return finite

    def state_dict(self) -> dict:
        return {"normalizers": [n.state_dict() for n in self.normalizers], "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        for normalizer, saved in zip(self.normalizers, state.get("normalizers", [])):
            normalizer.load_state_dict(saved)
