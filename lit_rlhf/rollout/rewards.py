"""Reward sources for the online methods: one interface, several kinds, weighted together.

A source maps a batch of (prompt, response) to one float per row:

- ``adapter``: a score adapter on the SAME bank as the policy (``bank.score(..., adapter=)``);
  the bank's role context restores the policy adapter afterwards.
- ``model``: a separate reward model from a path: a transformers model with a score head
  (``AutoModelForSequenceClassification``), or a saved lit_rlhf reward adapter directory on its
  own base. It may use another tokenizer: the text is decoded and re-tokenised.
- ``function``: a Python function named ``module:function``, called as
  ``fn(prompts: list[str], completions: list[str]) -> list[float]``. It is imported from the
  module the name gives, nowhere else; what it returns is checked (one real number per
  completion) and an exception it raises is reported with its name (:class:`RewardError`).

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

from lit_rlhf.distributed import all_rows
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer, read_adapter_meta
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
    "RewardSource",
    "RewardSpec",
    "Rewards",
    "build_source",
    "load_function",
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
        path: for ``model``: a transformers model directory with a sequence-classification
            (score) head, or a saved lit_rlhf reward adapter directory (``adapter_config.json`` +
            ``head.safetensors``).
        base: for ``model`` with an adapter directory: the base model it was trained on; the
            adapter's ``base_model_name_or_path`` when ``None``.
        tokenizer: for ``model``: where its tokenizer is; ``path`` (or ``base``) when ``None``.
        dtype: for ``model``: weights dtype of the separate model.
        append_eos: for ``model``: append the reward tokenizer's EOS to responses that ended with
            a stop token (lit_rlhf reward models are trained on completions ending in EOS).
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
    """A Python function ``fn(prompts: list[str], completions: list[str]) -> list[float]``.

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


def _join(prompt: str, completion: str) -> str:
    # The join rule of lit_rlhf.data.tokenize: one space unless either side already has one.
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return prompt + completion
    return prompt + " " + completion


class ModelReward(RewardSource):
    """A separate reward model, with its own tokenizer: the text is decoded and re-tokenised.

    ``path`` is either a transformers model with a score head (``AutoModelForSequenceClassification``,
    one label) or a saved lit_rlhf reward adapter on its own base (loaded as a one-adapter bank).

    The text scored is ``prompt + " " + completion`` (the rendered prompt), or, for conversational
    prompts and a reward tokenizer with a chat template, the messages plus an assistant turn
    rendered with the reward tokenizer's own template; then the reward tokenizer's EOS is appended
    when the response ended with a stop token and ``append_eos``.

    Args:
        path: the model or adapter directory.
        base: for an adapter directory, the base model; read from its ``adapter_config.json`` when ``None``.
        tokenizer: the tokenizer directory; ``path`` (or the base) when ``None``.
        dtype: weights dtype.
        append_eos: see above.
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
        self.model = None
        self.tokenizer = None
        self.is_adapter = Path(path, "adapter_config.json").exists()

    def setup(self, bank: AdapterBank | None = None, tokenizer=None) -> None:
        if self.model is not None:
            return
        if self.is_adapter:
            base = self.base or json.loads(Path(self.path, "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"reward adapter {self.path} does not say its base model: set `base` in its reward spec")
            spec = BankSpec(model=base, tokenizer=self.tokenizer_path, dtype=self.dtype,
                            adapters=[AdapterSpec("reward", path=self.path, trainable=False, head="score")])
            self.model = AdapterBank(spec)
            self.tokenizer = load_tokenizer(spec)
        else:
            from transformers import AutoModelForSequenceClassification

            from lit_rlhf.models.loading import DTYPES, require_safetensors

            require_safetensors(self.path, what="reward model", convert=(
                "AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=False).save_pretrained(path)"))
            spec = BankSpec(model=self.path, tokenizer=self.tokenizer_path)
            self.tokenizer = load_tokenizer(spec)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=DTYPES[self.dtype], use_safetensors=True
            )
            if self.model.config.num_labels != 1:
                raise ValueError(f"reward model {self.path} has {self.model.config.num_labels} labels; a reward model has 1")
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.model.eval()
        log.info("reward model %s loaded (%s)", self.path, "lit_rlhf adapter" if self.is_adapter else "transformers")

    def texts(self, request: RewardRequest) -> list[str]:
        raw = request.raw_prompts or [None] * len(request.prompts)
        texts = []
        for prompt, completion, raw_prompt in zip(request.prompts, request.completions, raw):
            if isinstance(raw_prompt, list) and getattr(self.tokenizer, "chat_template", None):
                messages = list(raw_prompt) + [{"role": "assistant", "content": completion}]
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(_join(prompt, completion))
        return texts

    def encode(self, request: RewardRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(batch, seq)`` ids and mask of the rows in the reward model's tokenizer."""
        rows = [self.tokenizer(t)["input_ids"] for t in self.texts(request)]
        eos = self.tokenizer.eos_token_id
        if self.append_eos and eos is not None:
            rows = [r + [eos] if ended and (not r or r[-1] != eos) else r
                    for r, ended in zip(rows, request.rollout.ended.tolist())]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    @torch.no_grad()
    def __call__(self, request: RewardRequest) -> torch.Tensor:
        self.setup()
        device = request.rollout.response_ids.device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        ids, mask = (t.to(device) for t in self.encode(request))
        if self.is_adapter:
            return self.model.score(ids, mask, adapter="reward").float()
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()

    def saved_normalization(self) -> dict | None:
        return read_adapter_meta(self.path).get("normalization") if self.is_adapter else None


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
