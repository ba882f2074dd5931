"""Generation engines: prompts in, a ``Rollout`` of responses out.

An engine is anything with ``generate(bank, adapter, prompt_ids, prompt_mask, sampling) ->
Rollout`` (the ``RolloutEngine`` protocol), registered under a name the config chooses
(``engine: hf``). Methods only ever see a ``Rollout``, so a faster engine (``hf_static``: a
static KV cache with a compiled decode step; vLLM with synced LoRA weights, see the README) is
added with ``@register_engine("name")`` and no change to any method. ``auto`` picks per device.

Behaviour log-probs are NOT taken from the engine: transformers' ``scores`` are the logits
after temperature / top-k / top-p warping, and a vLLM engine would compute them with other
kernels. The online methods recompute them with one forward pass of the policy
(``lit_rlhf.losses.token_logps``, the one log-prob path), so the PPO ratio compares like with like.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig, GenerationMixin, StaticCache

from lit_rlhf.data.tokenize import end_of_turn_ids
from lit_rlhf.models.head import accepts_logits_to_keep
from lit_rlhf.models.prefix import prompt_groups

log = logging.getLogger("lit_rlhf.rollout")

__all__ = [
    "ENGINES",
    "AutoEngine",
    "CompiledStaticEngine",
    "HFGenerateEngine",
    "HFStaticCacheEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "build_engine",
    "choose_tokens",
    "generating_with",
    "generation_config",
    "model_end_ids",
    "register_engine",
    "truncate_at_stop",
    "warp_logits",
]


@dataclass
class SamplingConfig:
    """How responses are sampled.

    The defaults sample from the policy's own distribution (temperature 1, no top-k, no
    top-p), which is what the PPO ratio and the KL estimate assume. With another temperature
    the methods divide the logits by it when they recompute log-probs; top-k and top-p
    truncation are not reflected in the recomputed log-probs (as in TRL).

    These fields are the whole generation config: the model's own ``generation_config.json``
    (repetition penalty, n-gram bans, minimum length, ... common in instruct models) is ignored but
    for its end tokens (``model_end_ids``),
    so the same weights roll out the same way with or without it. Knobs that reshape the
    distribution are deliberately absent: the log-probs recomputed for the loss would not describe
    the samples.

    Args:
        max_new_tokens: the longest response in tokens; a response that reaches it without a
            stop token is *truncated* (see ``missing_eos_penalty`` of the online methods).
        temperature: softmax temperature of sampling.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        top_p: nucleus sampling mass; 1.0 keeps all.
        do_sample: sample (True) or decode greedily (False).
        stop_token_ids: token ids that end a response. ``None``: the tokenizer's EOS and the special
            token its chat template closes an assistant turn with when that is another one (Llama-3's
            ``<|eot_id|>``, Gemma's ``<end_of_turn>``; see ``end_of_turn_ids``), so a chat model's
            rollouts end where its turns do instead of all running to ``max_new_tokens``; with the
            generating model given to ``resolved``, also its generation config's end tokens.
        pad_token_id: id written after a response ends; the tokenizer's pad when ``None``.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    stop_token_ids: list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise ValueError(
                f"sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1, got temperature "
                f"{self.temperature}, top_k {self.top_k}, top_p {self.top_p} (greedy decoding: do_sample: false)"
            )

    def resolved(self, tokenizer, model: nn.Module | None = None) -> SamplingConfig:
        """A copy with ``stop_token_ids`` and ``pad_token_id`` filled from ``tokenizer`` (and the end
        tokens ``model``'s generation config lists, see ``model_end_ids``)."""
        stop = self.stop_token_ids
        if stop is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token: set sampling.stop_token_ids to the ids that end a response")
            ends = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *model_end_ids(model, len(tokenizer))]
            stop = list(dict.fromkeys(ends))
        pad = self.pad_token_id if self.pad_token_id is not None else tokenizer.pad_token_id
        return replace(self, stop_token_ids=list(stop), pad_token_id=pad)

    def greedy(self) -> SamplingConfig:
        return replace(self, do_sample=False)


def model_end_ids(model: nn.Module | None, vocab_size: int) -> list[int]:
    """The ``eos_token_id`` (an id or a list) of ``model``'s generation config: the ends transformers'
    own ``generate`` stops at. Instruct models list more than the tokenizer's EOS there
    (Qwen2.5-Instruct ``<|im_end|>`` and ``<|endoftext|>``; Llama-3.1-Instruct ``<|end_of_text|>``,
    ``<|eom_id|>``, ``<|eot_id|>``): a sampled one of them ends the reply, as it would anywhere else
    the model is served. Only which token ends a response is read from that file, nothing that
    reshapes the distribution. Ids outside the tokenizer's vocabulary (a config default) are dropped."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [i for i in ids if 0 <= i < vocab_size]


class Rollout(NamedTuple):
    """Prompts and the responses sampled for them.

    Attributes:
        prompt_ids: ``(batch, prompt_len)`` long, LEFT-padded (generation starts at the last column).
        prompt_mask: ``(batch, prompt_len)`` long, 1 on prompt tokens.
        response_ids: ``(batch, resp_len)`` long, RIGHT-padded with the pad id after the first stop token.
        response_mask: ``(batch, resp_len)`` long, 1 up to and including the first stop token.
        ended: ``(batch,)`` bool, True where the response ended with a stop token (False: it was
            cut at ``max_new_tokens``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt + response ids. ``(batch, prompt_len + resp_len)``."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(batch, prompt_len + resp_len)``: left padding, prompt, response, right padding."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over attended tokens only, as ``generate`` used them with left padding.

        Without them a causal LM numbers the columns 0..n-1, so a left-padded row would be read
        at other positions than it was sampled at (harmless for RoPE, wrong for absolute positions).
        """
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:
        """``(batch,)`` long, tokens in each response including its stop token."""
        return self.response_mask.sum(dim=1)

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rows ``index`` of every field."""
        return Rollout(*(t[index] for t in self))


def truncate_at_stop(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
) -> Rollout:
    """Cut each response after its first stop token and build the masks.

    Args:
        prompt_ids, prompt_mask: ``(batch, prompt_len)`` left-padded prompts.
        response_ids: ``(batch, resp_len)`` raw generated ids (anything after a stop token is ignored).
        stop_token_ids: ids that end a response.
        pad_token_id: written after the first stop token.

    Returns:
        A ``Rollout``; ``response_mask`` is 1 up to and including the first stop token (every
        position when there is none), and ``ended`` says whether there was one.
    """
    stops = torch.tensor(list(stop_token_ids), device=response_ids.device)
    is_stop = torch.isin(response_ids, stops)
    # Number of stop tokens strictly before each position: 0 means "still inside the response".
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    response_mask = (stops_before == 0).long()
    response_ids = response_ids.masked_fill(response_mask == 0, pad_token_id)
    ended = is_stop.any(dim=1)
    return Rollout(prompt_ids, prompt_mask.long(), response_ids, response_mask, ended)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from one adapter of a bank; the bank's active adapter is unchanged after."""

    def generate(
        self, bank, adapter: str | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
        *, teacher: bool = False,
    ) -> Rollout:
        """Responses of ``adapter`` (the reference policy when ``None``; the distillation teacher
        with ``teacher=True``) to left-padded prompts.

        Args:
            bank: the ``AdapterBank``.
            adapter: the policy adapter to sample from.
            teacher: sample from the bank's teacher instead (``adapter`` then ``None``).
            prompt_ids, prompt_mask: ``(batch, prompt_len)`` left-padded.
            sampling: a ``SamplingConfig`` with ``stop_token_ids`` and ``pad_token_id`` resolved.
        """
        ...


ENGINES: dict[str, Callable[[], RolloutEngine]] = {}


def register_engine(name: str):
    """Class decorator: make an engine available as ``engine: <name>`` in configs."""

    def add(cls):
        if name in ENGINES:
            raise ValueError(f"a rollout engine named {name!r} is already registered ({ENGINES[name]})")
        ENGINES[name] = cls
        return cls

    return add


def build_engine(name: str) -> RolloutEngine:
    """The engine registered as ``name``."""
    if name not in ENGINES:
        raise KeyError(f"no rollout engine named {name!r}; registered engines: {sorted(ENGINES)}")
    return ENGINES[name]()


def generation_config(sampling: SamplingConfig, **extra) -> GenerationConfig:
    """Every setting a rollout is generated with, from ``sampling`` alone (``extra``: how, never what,
    e.g. ``cache_implementation``).

    Nothing else reaches ``generate`` (see ``generating_with``): a knob that reshapes the
    distribution (repetition penalty, n-gram bans, minimum length, banned words) would make the
    samples come from a policy the recomputed log-probs do not describe, so ``SamplingConfig`` has
    no such field.
    """
    if sampling.stop_token_ids is None or sampling.pad_token_id is None:
        raise ValueError("resolve the sampling config first: sampling.resolved(tokenizer)")
    # Unset warpers fall back to transformers' global defaults (top_k=50): set them explicitly.
    warpers = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p) if sampling.do_sample else {}
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=sampling.pad_token_id,
        do_sample=sampling.do_sample,
        use_cache=True,
        **warpers,
        **extra,
    )


@contextmanager
def generating_with(module: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the generation config of every generating model inside ``module`` for the duration.

    Passing ``generation_config=`` to ``generate`` is not enough: transformers (5.x,
    ``GenerationMixin._prepare_generation_config``) fills every field left unset in it from the
    model's own ``generation_config.json``, so a base shipping ``repetition_penalty`` would still
    apply it. Swapping the model's config itself leaves nothing to fill in but transformers'
    neutral global defaults. (peft's ``PeftModel.generate`` reads the wrapped model's config, so
    this covers LoRA roles, full-mode reference copies and a separate teacher alike.)
    """
    models = [m for m in module.modules() if isinstance(m, GenerationMixin)]
    saved = [m.generation_config for m in models]
    try:
        for m in models:
            m.generation_config = config
        yield
    finally:
        for m, own in zip(models, saved):
            m.generation_config = own


@register_engine("hf")
class HFGenerateEngine:
    """transformers ``generate`` with its dynamic KV cache: works for every model, on every device."""

    cache_implementation: str | None = None

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling: SamplingConfig, *, teacher: bool = False) -> Rollout:
        config = generation_config(sampling, cache_implementation=self.cache_implementation)
        with generating_with(bank, config):
            out = bank.generate(prompt_ids, prompt_mask, adapter=adapter, teacher=teacher)
        response = out[:, prompt_ids.shape[1]:]
        return truncate_at_stop(prompt_ids, prompt_mask, response, sampling.stop_token_ids, sampling.pad_token_id)


#: Options of the static-cache engine, and why they default as they do.
BUCKET = 32  # prompts padded to a multiple of this: the compiled decode step sees few cache shapes
STOP_CHECK_EVERY_CUDA = 8  # a host sync every k decode steps on CUDA (reading "all rows stopped?" syncs)
RECOMPILE_LIMIT = 64  # compiled decode graphs per step function: models x adapter states x batch sizes x cache lengths


@register_engine("hf_static")
class HFStaticCacheEngine:
    """Our own decode loop over a transformers ``StaticCache``: one prefill forward, then one
    forward per token through a decode step compiled with ``torch.compile(mode="reduce-overhead")``
    (CUDA graphs) on CUDA, run eagerly elsewhere unless ``compile=True``.

    A compiled step pads prompts further on the left to a multiple of ``bucket`` and keeps its cache
    between calls (reset, not reallocated; it only grows), so it sees the same shapes rollout after
    rollout and its CUDA graphs are replayed, not recorded again. An eager step pads nothing and
    sizes a fresh cache to each call: every padded position would be prefilled and attended over at
    every decode step for nothing (a batch of 16 prompts 33 tokens wide, 32 new tokens, on vs_trl's
    small model on CPU: padded to 64 by bucket 32, 1.17x the time). Generation stops when
    every row has produced a stop token (read on the host every ``stop_check_every`` steps: each
    read is a device sync). Greedy decoding gives the tokens of ``hf``; sampling draws from the
    same distribution (``choose_tokens``: transformers' warpers, then one inverse-CDF draw per row).

    Models this loop cannot drive (no static-cache support, encoder-decoders, sharded
    parameters) fall back to the ``hf`` engine, logged once at info level.

    Args:
        bucket: prompt lengths are rounded up to a multiple of this; ``None``: ``BUCKET`` when the
            decode step is compiled, else 1.
        compile: compile the decode step; ``None``: on CUDA only.
        keep_cache: keep each batch size's cache between calls (grown, never shrunk); ``None``: when
            the decode step is compiled (its CUDA graphs replay on the same addresses).
        stop_check_every: decode steps between two "has every row stopped?" reads; ``None``: every
            step on CPU (free there), ``STOP_CHECK_EVERY_CUDA`` on CUDA.
    """

    def __init__(self, bucket: int | None = None, compile: bool | None = None, stop_check_every: int | None = None,
                 keep_cache: bool | None = None):
        if (bucket is not None and bucket < 1) or (stop_check_every is not None and stop_check_every < 1):
            raise ValueError(f"bucket and stop_check_every must be >= 1, got {bucket} and {stop_check_every}")
        self.bucket = bucket
        self.compile = compile
        self.keep_cache = keep_cache
        self.stop_check_every = stop_check_every
        self.fallback = HFGenerateEngine()
        # Per generating model: {batch size: StaticCache}, and its compiled decode step.
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._logged: set[str] = set()

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling: SamplingConfig, *, teacher: bool = False) -> Rollout:
        if sampling.stop_token_ids is None or sampling.pad_token_id is None:
            raise ValueError("resolve the sampling config first: sampling.resolved(tokenizer)")
        with bank.generating(adapter, teacher=teacher) as model:
            net = model.get_base_model() if isinstance(model, PeftModel) else model
            reason = static_decode_unsupported(net)
            if reason is None:
                response = self._decode(net, prompt_ids, prompt_mask, sampling)
        if reason is not None:
            self._log_once(f"rollout engine hf_static: {reason}; generating with the hf engine")
            return self.fallback.generate(bank, adapter, prompt_ids, prompt_mask, sampling, teacher=teacher)
        rollout = truncate_at_stop(prompt_ids, prompt_mask, response, sampling.stop_token_ids, sampling.pad_token_id)
        # The steps run after the last row stopped (between two stop checks) are no part of any response.
        width = int(rollout.response_lengths.max()) if len(rollout.response_ids) else 0
        return rollout._replace(response_ids=rollout.response_ids[:, :width],
                                response_mask=rollout.response_mask[:, :width])

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.info(message)

    def _decode(self, net, prompt_ids, prompt_mask, sampling: SamplingConfig) -> torch.Tensor:
        """Raw response ids ``(batch, steps)`` of ``net`` (a transformers causal LM, adapters as set)."""
        device = prompt_ids.device
        batch, max_new = prompt_ids.shape[0], sampling.max_new_tokens
        # A sliding-window layer keeps only its window: no compiled step, no prompts shared through its cache.
        sliding = any(StaticCache(config=net.config, max_cache_len=1).is_sliding)
        step = self._step(net, device, sliding=sliding)
        compiled = self._steps.get(net) is step  # only compiled steps are kept
        bucket = self.bucket or (BUCKET if compiled else 1)
        ids, mask = pad_left_to_bucket(prompt_ids, prompt_mask.long(), bucket, sampling.pad_token_id)
        keep = self.keep_cache if self.keep_cache is not None else compiled
        if keep:
            cache, capacity = self._cache(net, batch, ids.shape[1] + max_new, bucket)
        else:
            capacity = ids.shape[1] + max_new
            cache = StaticCache(config=net.config, max_cache_len=capacity)
        # One 2D mask for the whole rollout: every generated column is 1 from the start; causality
        # hides the columns not written yet. Positions count attended tokens only (left padding).
        full_mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
        full_mask[:, : ids.shape[1]] = mask
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
        next_position = mask.sum(dim=1, keepdim=True)
        stops = torch.tensor(list(sampling.stop_token_ids), device=device)
        check_every = self.stop_check_every or (STOP_CHECK_EVERY_CUDA if device.type == "cuda" else 1)

        logits = prefill(net, ids, full_mask, positions, cache, share_prompts=not sliding)
        response = torch.full((batch, max_new), sampling.pad_token_id, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        with one_token_attention(net, eager=not compiled):
            for t in range(max_new):
                tokens = choose_tokens(logits, sampling).masked_fill(stopped, sampling.pad_token_id)
                response[:, t] = tokens
                stopped |= torch.isin(tokens, stops)
                if t + 1 == max_new or ((t + 1) % check_every == 0 and bool(stopped.all())):
                    return response[:, : t + 1]
                logits = step(tokens[:, None], next_position + t, full_mask, cache)
        return response

    def _cache(self, net, batch: int, length: int, bucket: int) -> tuple[StaticCache, int]:
        """This model's cache for ``batch`` rows and its length (at least ``length``), reset; reused
        across calls (CUDA graphs replay on the same addresses) and only ever grown."""
        caches = self._caches.setdefault(net, {})
        cache, capacity = caches.get(batch, (None, 0))
        if cache is None or capacity < length:
            # Rounded up so that a slightly longer prompt does not cost a new cache (and a recompile).
            capacity = -(-length // bucket) * bucket
            cache = StaticCache(config=net.config, max_cache_len=capacity)
            caches[batch] = cache, capacity
        else:
            cache.reset()
        return cache, capacity

    def _step(self, net, device: torch.device, sliding: bool) -> Callable:
        """The decode step of ``net``: last tokens -> float32 logits ``(batch, vocab)``."""
        compiled = self._steps.get(net)
        if compiled is not None:
            return compiled

        def step(tokens, positions, mask, cache):
            return net(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1].float()

        compile = self.compile if self.compile is not None else device.type == "cuda"
        quantizer = getattr(net, "hf_quantizer", None)
        if compile and quantizer is not None and not quantizer.is_compileable:
            self._log_once(f"rollout engine hf_static: {type(quantizer).__name__} weights do not compile; decoding eagerly")
            compile = False
        if compile and sliding:
            # A sliding-window cache layer counts its length in a Python int: a recompile every step.
            self._log_once(f"rollout engine hf_static: {type(net).__name__} has sliding-window layers; decoding eagerly")
            compile = False
        if not compile:
            return step
        # One graph per cache shape (no dynamic shapes: CUDA graphs need static ones). Every model and
        # adapter state shares this function's code, hence the raised recompile limit. CUDA graphs are CUDA's:
        # elsewhere inductor's fused kernels alone.
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        compiled_step = torch.compile(step, mode=mode, dynamic=False)

        def run(tokens, positions, mask, cache):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # A graph that fails to compile runs eagerly (dynamo logs why) rather than ending the run.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, suppress_errors=True):
                return compiled_step(tokens, positions, mask, cache)

        self._steps[net] = run
        return run


def pad_left_to_bucket(ids: torch.Tensor, mask: torch.Tensor, bucket: int, pad_token_id: int):
    """Left-pad ``(batch, len)`` prompts to a length that is a multiple of ``bucket``."""
    extra = -ids.shape[1] % bucket
    if extra == 0:
        return ids, mask
    return (torch.nn.functional.pad(ids, (extra, 0), value=pad_token_id),
            torch.nn.functional.pad(mask, (extra, 0), value=0))


@contextmanager
def one_token_attention(net, *, eager: bool) -> Iterator[None]:
    """Within the block, an eager decode step on CPU attends through transformers' ``eager`` attention (two
    matmuls and a softmax) where the model runs ``sdpa``: sdpa's flash kernel for CPU, built for long queries,
    is the slower one for a single query token (decode time 0.89x and 0.93x on vs_trl's small Llama, 16 rows x 32
    tokens, medians of 15 and 12 interleaved runs on a loaded CPU). The logits move by float rounding only
    (another summation order: 9e-7 there; the seeded samples of all 12 runs were the same); greedy tokens stay
    those of ``hf``. The prefill keeps ``sdpa``; the model has it back after."""
    # transformers' own test of whether a model's attention can be switched at run time (private: absent, no switch).
    switchable = getattr(net, "_can_set_attn_implementation", lambda: False)
    swap = eager and net.device.type == "cpu" and net.config._attn_implementation == "sdpa" and switchable()
    if not swap:
        yield
        return
    net.set_attn_implementation("eager")
    try:
        yield
    finally:
        net.set_attn_implementation("sdpa")


def static_decode_unsupported(net: nn.Module) -> str | None:
    """Why the static-cache loop cannot drive ``net``, or ``None`` when it can.

    transformers marks the models whose forward runs with a ``StaticCache`` under ``torch.compile``
    (``_can_compile_fullgraph``); the loop needs exactly that, on a decoder-only model whose
    parameters are all on this process (ZeRO-3 and FSDP shards are gathered by ``generate`` only).
    """
    name = type(net).__name__
    if not isinstance(net, GenerationMixin):
        return f"{name} is not a transformers generating model"
    if net.config.is_encoder_decoder:
        return f"{name} is an encoder-decoder"
    if not getattr(net, "_can_compile_fullgraph", False) or getattr(net, "_is_stateful", False):
        return f"transformers does not run {name} with a static cache (_can_compile_fullgraph)"
    if any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in net.parameters()):
        return f"the parameters of {name} are sharded (DeepSpeed ZeRO-3 / FSDP)"
    return None


def prefill(net, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: StaticCache, *,
            share_prompts: bool) -> torch.Tensor:
    """Writes the prompts' keys and values to ``cache``; returns their last positions' float32 logits.

    ``mask`` is the whole rollout's ``(batch, capacity)`` attention mask, as the decode steps get it: the
    prompts' columns, then 1 for every column the decode writes (causality hides them). A forward into the
    static cache reads it whole: BLOOM and Falcon-RW build their ALiBi biases from the mask, as wide as it is,
    and add them to a causal mask as wide as the cache (a prompt-wide mask fails to broadcast there).

    With ``share_prompts``, rows that share a prompt (``num_samples_per_prompt > 1``) run it once
    (``models.prefix``): the distinct prompts fill a dynamic cache whose entries are gathered per row into
    ``cache``. Not for a sliding-window cache, whose layers keep only the window."""
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(net) else {}
    prompt_mask = mask[:, : ids.shape[1]]
    groups = prompt_groups(ids, prompt_mask) if share_prompts else None
    if groups is None or not groups.shared:
        out = net(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **keep)
        return out.logits[:, -1].float()
    first, of_row = groups
    out = net(input_ids=ids[first], attention_mask=prompt_mask[first], position_ids=positions[first], use_cache=True,
              **keep)
    for index, layer in enumerate(out.cache.layers):
        cache.update(layer.keys.index_select(0, of_row), layer.values.index_select(0, of_row), index)
    return out.logits[:, -1].float().index_select(0, of_row)


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The next token of each row: the argmax (greedy), else one draw from the warped softmax.

    Args:
        logits: ``(batch, vocab)`` float32 logits of the last position.

    Returns:
        ``(batch,)`` long. A draw by the inverse of each row's cumulative distribution: one uniform per
        row, in float64 (so a token's share of ``[0, 1)`` is its probability to ~1e-16, the smallest
        included). ``torch.multinomial`` draws one exponential per vocabulary entry: 8x the time on CPU
        (1.8 vs 0.23 ms for 16 x 4096), a sixth of a small model's decode step.
    """
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    cumulative = torch.softmax(warp_logits(logits, sampling).double(), dim=-1).cumsum(dim=-1)
    uniform = torch.rand(logits.shape[0], 1, dtype=torch.float64, device=logits.device) * cumulative[:, -1:]
    # right=True: a removed token (probability 0) adds an empty interval, which no draw lands in.
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(1)


def warp_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers' warpers (``TemperatureLogitsWarper``,
    ``TopKLogitsWarper``, ``TopPLogitsWarper``, in ``generate``'s order) compute them: removed
    tokens get ``-inf``. Top-k keeps every token tied with the k-th; top-p keeps the smallest
    set of most likely tokens whose mass reaches ``top_p`` (at least one). ``(batch, vocab)``."""
    scores = logits
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        # Tokens whose cumulative mass from the least likely up stays within 1 - top_p are dropped.
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


@register_engine("hf_compiled")
class CompiledStaticEngine(HFStaticCacheEngine):
    """``hf_static`` with its decode step compiled on every device: on CPU too, where ``hf_static`` decodes
    eagerly. inductor fuses what an eager decode step runs op by op around its matmuls (norms, rotary,
    attention over the cache, residuals): 0.88x the eager step's decode time on vs_trl's small Llama on CPU (16
    rows x 32 tokens; a GRPO step 1.17x the tokens per CPU-second), for a compile of each new shape at its first
    rollout (there 41 s wall with inductor's on-disk cache empty, 7.5 s warm; a C++ compiler is needed, and a
    step that fails to compile decodes eagerly). Worth it for a long CPU run; a
    short one (a test, a toy config) is faster eager, hence not ``auto``'s choice on CPU.

    Its tokens are those of the eager step (greedy: those of ``hf``; seeded sampling: the same draws) up to
    float rounding: fused kernels sum in another order, so a draw that falls within ~1e-7 of a token's
    boundary may land in its neighbour."""

    def __init__(self, bucket: int | None = None, stop_check_every: int | None = None, keep_cache: bool | None = None):
        super().__init__(bucket=bucket, compile=True, stop_check_every=stop_check_every, keep_cache=keep_cache)


@register_engine("auto")
class AutoEngine:
    """``hf_static`` on CUDA; on CPU ``CPU_ENGINE`` (measured faster there by
    ``benchmarks/decode_speed.py``). Each engine falls back to ``hf`` where it must."""

    def __init__(self):
        self.engines = {"hf": HFGenerateEngine(), "hf_static": HFStaticCacheEngine()}

    def generate(self, bank, adapter, prompt_ids, prompt_mask, sampling: SamplingConfig, *, teacher: bool = False) -> Rollout:
        name = "hf_static" if prompt_ids.device.type == "cuda" else CPU_ENGINE
        return self.engines[name].generate(bank, adapter, prompt_ids, prompt_mask, sampling, teacher=teacher)


#: The engine ``auto`` picks on CPU.
CPU_ENGINE = "hf_static"
