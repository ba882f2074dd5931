"""The AdapterBank: one base model, many named LoRA adapters and scalar heads.

Roles (policy, reference, reward, value) are views of the same base: a role switch sets
the active adapter and always restores the previous one. The reference is the *starting*
policy: a frozen copy of a policy adapter loaded from a path (the ``reference`` adapter), else
the base with every adapter disabled (or, when the base itself trains, a frozen copy). The
teacher (distillation) is a separate frozen model when ``BankSpec.teacher`` names one, else the
base as loaded.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.transformers_weight_conversion import (
    convert_peft_config_for_transformers,
    get_model_conversion_mapping,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lit_rlhf.errors import InvalidArgument
from lit_rlhf.models.heads import ScalarHead, last_token_index
from lit_rlhf.models.lora_merge import lora_merged
from lit_rlhf.models.loading import (
    CONVERT_ADAPTER,
    CONVERT_MODEL,
    fingerprint,
    load_base,
    load_config,
    load_dequantized_base,
    load_tokenizer,
    quantization_record,
    require_safetensors,
    saved_quantization,
    text_config,
    text_decoder_prefix,
)
from lit_rlhf.models.routers import returns_more_than_linear
from lit_rlhf.models.saving import HEAD_FILE, atomic_directory, read_adapter_meta, write_head_and_meta
from lit_rlhf.models.spec import AdapterSpec, BankSpec, TeacherSpec

log = logging.getLogger("lit_rlhf.models")

#: The adapter holding a frozen copy of a loaded policy adapter: the reference policy.
REFERENCE = "reference"


#: Module attributes that mixture-of-experts layers read in train mode only, as the spread of a random factor
#: multiplying the router's input (Mixtral, MiniMax, Switch: ``jitter_noise``; PhiMoE: ``input_jitter_noise``;
#: DBRX: ``moe_jitter_eps``): dropout by another name. Not PhiMoE's ``router_jitter_noise``, a threshold of its
#: routing in eval mode too.
ROUTER_NOISE = ("jitter_noise", "input_jitter_noise", "moe_jitter_eps")


def disable_dropout(model: nn.Module) -> dict[str, float]:
    """Set every dropout of ``model`` to 0: ``nn.Dropout`` modules (peft's LoRA dropout among them), the
    float rates that attention and layer code read at call time (``attention_dropout``, OPT's ``dropout``
    and ``layerdrop``), those some models read from their config at call time (Falcon's
    ``hidden_dropout`` and ``attention_dropout``), and the router noise of mixtures of experts
    (``ROUTER_NOISE``: with Mixtral's ``router_jitter_noise`` on, two train-mode forwards of a fresh policy
    differed by 4e-3 in the logits, and its log-probs were not the reference's before the first step).

    Returns the config's changed rates with their loaded values, for an export to write back."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_dropout_rate(name, value) or (name in ROUTER_NOISE and isinstance(value, float) and value != 0.0):
                setattr(module, name, 0.0)
    config = text_config(model.config) if hasattr(model, "config") else None
    loaded = {name: value for name, value in vars(config).items() if _is_dropout_rate(name, value)} if config else {}
    for name in loaded:
        setattr(config, name, 0.0)
    return loaded


def router_logits_on_request(model: nn.Module) -> dict[str, bool]:
    """Set a mixture of experts' config ``output_router_logits`` to false: the methods that add the router
    load-balancing loss ask for router logits in their training forwards (``methods.offline``). Left true
    (TRL's SFT saves its MoE models so), every forward returned them, and a KV-cached decode step failed in
    the model's own load-balancing loss (its attention mask covers the cache, the router logits the new token).

    Returns the loaded value where it was true, for an export to write back."""
    config = model.config.get_text_config()
    if not getattr(config, "output_router_logits", False):
        return {}
    config.output_router_logits = False
    return {"output_router_logits": True}


def _is_dropout_rate(name: str, value) -> bool:
    return isinstance(value, float) and value != 0.0 and ("dropout" in name or "pdrop" in name or name == "layerdrop")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout, no checkpointing; ``generate`` keeps its KV cache),
    each restored to its own previous mode after (not a blanket ``train()``)."""
    modes = [(m, m.training) for m in module.modules()]
    # The flag set directly, as nn.Module.train does for each module, minus its per-module type checks
    # and recursion: on the ~2000 submodules of a 24-layer LoRA model, 119 -> 25 ms per call.
    for m, _ in modes:
        object.__setattr__(m, "training", False)
    try:
        yield
    finally:
        for m, training in modes:
            object.__setattr__(m, "training", training)


class RecomputeInRole:
    """The checkpoint function of the base's decoder layers (transformers calls it as the layers'
    ``_gradient_checkpointing_func`` for a training forward with gradients on), deciding per call from
    the active role.

    ``roles`` are the adapters whose forwards recompute (``None``: every role); another role's layer
    runs plainly and keeps its activations. One decision at the call, not flags flipped on every role
    switch: a role switch is a change of peft's active adapter, which layers read when they run.

    The backward recomputation runs with the adapter that was active in the forward: it happens during
    ``backward``, usually after the role was switched back (the value adapter's forward, then one
    backward of policy + value loss). Without this it would recompute the critic's activations with the
    policy adapter and silently give the critic wrong gradients.
    """

    def __init__(self, bank: AdapterBank, roles: frozenset[str] | None):
        self._bank = weakref.ref(bank)  # the base must not keep the bank alive (nor be deep-copied with it)
        self._roles = roles

    def __call__(self, function, *args, **kwargs):
        bank = self._bank()
        adapter = bank.active if bank is not None else None
        if self._roles is not None and adapter not in self._roles:
            return function(*args, **kwargs)
        return checkpoint(function, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _recompute_with(bank, adapter)), **kwargs)


@contextmanager
def _recompute_with(bank: AdapterBank | None, adapter: str | None) -> Iterator[None]:
    if bank is None or adapter is None or bank.active == adapter:
        yield
        return
    previous = bank.active
    bank._activate(adapter)
    try:
        yield
    finally:
        bank._activate(previous)


def one_int8_path(model: nn.Module) -> None:
    """Every 8-bit linear of ``model`` computes the same function in train and eval mode.

    bitsandbytes (0.50) picks an 8-bit layer's matmul by the layer's mode on CPU and XPU: in train mode
    its dequantized weights times the input, in eval mode LLM.int8's int8-rounded activations (with outlier
    columns). The bank's trainable path runs in train mode and its reference, generation, validation and
    scorers in eval mode, so on the toy base a fresh policy's log-probs differed from the reference's
    (adapters off) by up to 0.12 a token, DPO's implicit rewards were not 0 before the first step, and the
    merged export (dequantized weights) was not what ``evaluate`` scored. The layers read their mode only
    for that choice: in train mode always. On CUDA both modes run LLM.int8, and this changes nothing.
    """
    from bitsandbytes.nn import Linear8bitLt

    for module in model.modules():
        if isinstance(module, Linear8bitLt):
            module.register_forward_pre_hook(_int8_train_mode)
            module.register_forward_hook(_int8_restore_mode, always_call=True)


def _int8_train_mode(module: nn.Module, args) -> None:
    module._mode_before_int8 = module.training
    module.training = True


def _int8_restore_mode(module: nn.Module, args, output) -> None:
    module.training = module._mode_before_int8


def merge_adapter_specs(declared: Sequence[AdapterSpec], required: Sequence[AdapterSpec]) -> list[AdapterSpec]:
    """The adapters a method requires, overridden field by field by those the user declared.

    A required adapter fixes the head kind, and a required ``trainable=False`` (a reward adapter
    read as a judge) holds whatever the config says; otherwise the user chooses its path, LoRA
    shape and trainability. Declared adapters the method does not require are kept as well.
    """
    declared_by_name = {a.name: a for a in declared}
    if len(declared_by_name) != len(declared):
        raise ValueError(f"adapter names must be unique, got {[a.name for a in declared]}")
    merged = []
    for need in required:
        user = declared_by_name.pop(need.name, None)
        if user is None:
            merged.append(need)
            continue
        if user.head != need.head and user.head is not None:
            raise ValueError(
                f"adapter {need.name!r} must have head {need.head!r} for this method, but the config gives {user.head!r}"
            )
        merged.append(replace(user, head=need.head, trainable=user.trainable and need.trainable))
    merged.extend(a for a in declared if a.name in declared_by_name)
    return merged


def teacher_load_spec(teacher: TeacherSpec) -> BankSpec:
    """The ``BankSpec`` that ``load_base`` / ``load_tokenizer`` read a teacher with (no adapters, no training)."""
    return BankSpec(
        model=teacher.model,
        tokenizer=teacher.tokenizer,
        dtype=teacher.dtype,
        quantization=teacher.quantization,
        quant_type=teacher.quant_type,
        double_quant=teacher.double_quant,
        trust_remote_code=teacher.trust_remote_code,
        attn_implementation=teacher.attn_implementation,
    )


def check_shared_vocabulary(student: BankSpec, teacher: TeacherSpec, student_width: int) -> None:
    """Fail unless the teacher's tokenizer maps every token to the student's id, and both
    models' logits cover that vocabulary.

    Distillation compares next-token distributions id by id, so a teacher with another
    tokenizer would be compared on the wrong tokens. Logits widths may differ (models pad their
    embedding matrices differently): the distillation then reads the common first columns.
    """
    student_vocab = load_tokenizer(student).get_vocab()
    teacher_vocab = load_tokenizer(teacher_load_spec(teacher)).get_vocab()
    student_name, teacher_name = student.tokenizer or student.model, teacher.tokenizer or teacher.model
    if student_vocab != teacher_vocab:
        differ = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda kv: kv[1])
        examples = ", ".join(f"{tok!r}={i}" for tok, i in differ[:4])
        raise ValueError(
            f"the teacher {teacher_name!r} and the student {student_name!r} do not share a vocabulary "
            f"(teacher tokenizer: {len(teacher_vocab)} tokens, student tokenizer: {len(student_vocab)} tokens; "
            f"{len(differ)} (token, id) pairs are in one but not the other, e.g. {examples}). Distillation compares "
            "next-token distributions id by id, so both models need the same tokenizer: choose a teacher of the "
            "student's model family (same tokenizer), or set bank.teacher: null to distill from the base without adapters."
        )
    teacher_config = load_config(teacher.model, trust_remote_code=teacher.trust_remote_code, what="bank.teacher.model")
    teacher_width = text_config(teacher_config).vocab_size
    if min(student_width, teacher_width) < len(student_vocab):
        raise ValueError(
            f"the teacher {teacher.model!r} ({teacher_width} logits) and the student {student.model!r} "
            f"({student_width} logits) share a {len(student_vocab)}-token tokenizer, but one model's logits do not "
            "cover it; resize its embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))."
        )


def model_identity(model: str) -> str:
    """A local model directory as an absolute path, a hub id as itself."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def check_bank_spec(spec: BankSpec, adapters: Sequence[AdapterSpec]) -> dict:
    """Everything about a bank that config files can tell, checked before any weights load: the
    ``full`` mode rules, each saved adapter's files and base fingerprint, safetensors weights, the
    teacher's vocabulary. Returns the base's fingerprint.

    Args:
        spec: the bank.
        adapters: its adapters, merged with those the method requires (``merge_adapter_specs``).
    """
    config = load_config(spec.model, trust_remote_code=spec.trust_remote_code)
    base_fingerprint = fingerprint(config)
    if spec.train_mode == "full":
        _check_full_mode(spec, adapters)
    _check_not_saved_quantized(spec, config, adapters)
    _check_recomputed_roles(spec.gradient_checkpointing, adapters)
    if not spec.random_init:
        require_safetensors(spec.model, what="model", convert=CONVERT_MODEL)
    for adapter in adapters:
        if adapter.path:
            _check_saved_adapter(adapter, spec.model, base_fingerprint, quantization_record(spec))
    if spec.teacher is not None:
        check_shared_vocabulary(spec, spec.teacher, text_config(config).vocab_size)
    return base_fingerprint


def _check_full_mode(spec: BankSpec, adapters: Sequence[AdapterSpec]) -> None:
    """``full`` trains the base weights themselves: one trainable role, no LoRA to load, no quantization."""
    if spec.effective_quantization:
        raise ValueError("train_mode 'full' cannot train a quantized base: use 'qlora' or drop quantization")
    trainable = [a.name for a in adapters if a.trainable]
    if len(trainable) > 1:
        raise ValueError(
            "train_mode 'full' trains the base itself, so it can play one trainable role; "
            f"got trainable adapters {trainable}. Use train_mode 'lora' for several roles."
        )
    loaded = [a.name for a in adapters if a.path]
    if loaded:
        raise ValueError(
            f"train_mode 'full' has no LoRA adapters, so adapter(s) {loaded} cannot be loaded from a path; merge "
            "an adapter into its base (lit-rlhf export --merged true) and set bank.model to that, or use train_mode 'lora'"
        )


def _check_not_saved_quantized(spec: BankSpec, config, adapters: Sequence[AdapterSpec]) -> None:
    """A base saved quantized (``quantization_config`` in its config.json: a ``*-bnb-4bit`` hub model, one
    keeping modules in full precision with ``llm_int8_skip_modules``) loads as saved whatever the bank's
    settings say. Settings saying otherwise trained it without its quantized setup when unset
    (``prepare_model_for_kbit_training``, the bitsandbytes guards) and recorded in its adapters a quantization
    its weights never had; so they must say how it is saved. Read only (generate, evaluate, a frozen
    scorer), it needs nothing."""
    saved = saved_quantization(config)
    trainable = [a.name for a in adapters if a.trainable]
    if saved is None or not trainable or saved == quantization_record(spec):
        return
    if saved["mode"] not in ("4bit", "8bit"):
        how = "give its full-precision model"
    elif saved["mode"] == "8bit":
        how = "set bank.quantization: 8bit"
    else:
        how = (f"set bank.train_mode: qlora, bank.quant_type: {saved['quant_type']}, "
               f"bank.double_quant: {str(saved['double_quant']).lower()}")
    raise InvalidArgument(
        "bank",
        f"bank.model {spec.model!r} is saved quantized ({saved}, config.json quantization_config) but the bank "
        f"trains {trainable} on it as quantized {quantization_record(spec)}: {how}, or give the full-precision model",
    )


def _check_recomputed_roles(setting, adapters: Sequence[AdapterSpec]) -> None:
    """``gradient_checkpointing`` as a list names trainable adapters: frozen roles run without gradients,
    so they have no activations kept for backward to recompute."""
    if isinstance(setting, bool):
        return
    key = "bank.gradient_checkpointing"
    if isinstance(setting, str) or not all(isinstance(name, str) for name in setting):
        raise InvalidArgument("bank", f"{key} takes true, false or a list of adapter names, got {setting!r}")
    trainable = [a.name for a in adapters if a.trainable]
    frozen = [a.name for a in adapters if not a.trainable]
    wrong = [name for name in setting if name not in trainable]
    if wrong:
        frozen_note = f"; frozen ones ({frozen}) run without gradients and never recompute" if frozen else ""
        raise InvalidArgument(
            "bank",
            f"{key} lists {wrong}, not trainable adapters of this bank: its trainable adapters are {trainable}"
            f"{frozen_note}. List the trainable roles whose forwards recompute, or set true (all) or false (none).",
        )


def _check_saved_adapter(adapter: AdapterSpec, model: str, base_fingerprint: dict, quantization: dict | None) -> None:
    """A saved adapter: PEFT files, safetensors weights, and the fingerprint of the base it was trained on."""
    if not Path(adapter.path, "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter {adapter.name!r}: {adapter.path} is not a saved PEFT adapter (no adapter_config.json)")
    require_safetensors(adapter.path, what=f"adapter {adapter.name!r}", convert=CONVERT_ADAPTER)
    bias = json.loads(Path(adapter.path, "adapter_config.json").read_text()).get("bias", "none")
    if bias != "none":
        # Its trained biases are the base's own tensors: loading writes them into the base every role reads (the
        # reference, a reward adapter's trunk), and they are no adapter's to train.
        raise ValueError(
            f"adapter {adapter.name!r} at {adapter.path} was saved with LoRA bias {bias!r} (adapter_config.json): its "
            "biases overwrite the shared base's, which the reference and every other role read; lit_rlhf loads "
            "adapters with bias 'none' only (merge this one into its base, or retrain it without biases)"
        )
    meta = read_adapter_meta(adapter.path)
    saved = meta.get("base")
    if meta.get("base_model") and meta["base_model"] != model_identity(model):
        # Same shapes can still be another model (a merged SFT model vs its base): say so.
        log.warning("adapter %r was trained on %s and is loaded onto %s", adapter.name, meta["base_model"],
                    model_identity(model))
    trained_on = meta.get("quantization")
    if "quantization" in meta and trained_on != quantization:
        # A QLoRA adapter corrects the 4-bit weights, not the originals: on another base it computes another
        # function (a reward adapter's scores off by twice their spread on the tiny test models).
        log.warning("adapter %r was trained on a base quantized as %s and is loaded onto one quantized as %s: it "
                    "computes another function than the one trained (set bank.train_mode, bank.quantization, "
                    "bank.quant_type, bank.double_quant as in training)", adapter.name, trained_on, quantization)
    if saved is not None and saved != base_fingerprint:
        diff = {k: (saved.get(k), v) for k, v in base_fingerprint.items() if saved.get(k) != v}
        raise ValueError(
            f"adapter {adapter.name!r} at {adapter.path} was trained on a different base model "
            f"(saved vs this base: {diff}); load it onto the base it was trained on ({model!r} is not)"
        )


def merge_adapter(base: nn.Module, adapter_dir: str) -> nn.Module:
    """``base`` with the LoRA adapter saved at ``adapter_dir`` merged into its weights.

    A LoRA on a tied LM head (or input embedding) changes that side only; merged into the shared
    weight it would change both (GPT-2, Qwen2: logits off by more than the adapter's own effect). So
    a tied pair is untied before the merge and tied again only when the two still agree.
    """
    tied = getattr(base.config, "tie_word_embeddings", False)
    if tied:
        head = base.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        base.config.tie_word_embeddings = False
    with warnings.catch_warnings():
        # A QLoRA GPT-2 adapter was made on 4-bit linears; peft transposes it for the Conv1D it merges into.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`")
        ignore_peft_fused_pattern_note()
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if tied:
        if torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight):
            merged.config.tie_word_embeddings = True
            merged.tie_weights()
        else:
            log.info("the adapter changes the tied LM head or input embedding: the merged model saves them untied")
    return merged


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


def resolve_all_linear(config: LoraConfig, base: nn.Module) -> None:
    """``config.target_modules = "all-linear"`` resolved as peft (0.21) resolves it on transformers 5, on the bare
    ``base``: first peft's remapping of the mixtures of experts whose layers changed since transformers 4 (Mixtral,
    Qwen3-MoE, OLMoE, DeepSeek-V3...: the experts, now 3-D parameters, and the router become ``target_parameters``,
    the fused ``gate_up_proj`` with twice the rank and alpha of the two linear layers it replaces), then every linear
    layer but the output. Resolved once, before any adapter wraps the base: peft resolves it on the model it is
    handed, and once a loaded adapter has wrapped the LM head whole (``modules_to_save``) it no longer sees that
    wrapper as the output layer, so a fresh adapter added after it got LoRA on the LM head (both copies).

    Unlike peft, not the linear layers that return more than a tensor (``routers.returns_more_than_linear``:
    Llama 4's router), whose LoRA failed in the first forward (peft 0.21 and TRL 1.16 wrap it)."""
    convert_peft_config_for_transformers(config, model=base, conversions=get_model_conversion_mapping(base))
    if _is_all_linear(config.target_modules):
        # On a multimodal model (Gemma 3 as ``Gemma3ForConditionalGeneration``) its text decoder's only: the vision
        # tower and projector never run on the text the bank trains on, so a LoRA there would get no gradient, yet
        # be saved, merged and counted as trained (TRL's text-only runs of such models adapt them for nothing).
        text = text_decoder_prefix(base)
        linears = _maybe_include_all_linear_layers(copy.copy(config), base).target_modules
        unwrappable = {name for name, module in base.named_modules() if returns_more_than_linear(module)}
        if left_out := sorted(unwrappable & set(linears)):
            log.info("all-linear leaves out %d linear layers returning more than a tensor, which LoRA cannot add to "
                     "(%s, ...)", len(left_out), left_out[0])
        config.target_modules = {name for name in linears if name.startswith(text) and name not in unwrappable}


def _refuse_unwrappable_lora(model: PeftModel) -> None:
    """Refuse, before any forward, a LoRA on a linear layer that returns more than a tensor (Llama 4's router,
    named in ``target_modules`` or in a loaded adapter's config): peft's LoRA layer failed in the first forward."""
    wrapped = sorted(name for name, module in model.named_modules()
                     if isinstance(module, BaseTunerLayer) and returns_more_than_linear(module.get_base_layer()))
    if wrapped:
        raise InvalidArgument("bank", f"LoRA targets {wrapped[:3]}{' ...' if len(wrapped) > 3 else ''}: these "
                              f"{type(model.get_submodule(wrapped[0]).get_base_layer()).__name__} layers return more "
                              "than a tensor (a router's scores and logits), which a LoRA layer cannot add its update "
                              "to; leave them out of bank.lora.target_modules (all-linear does)")


def ignore_peft_fused_pattern_note() -> None:
    """Inside ``warnings.catch_warnings``: peft (0.21) says the rank and alpha patterns of a fused expert parameter
    (``.*\\.gate_up_proj``, from its transformers-4 remapping) "did not match any targeted module and were
    ignored", while it applies them (the parameter's LoRA has twice the rank, as peft's own model has)."""
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"The following (rank|alpha)_pattern keys did not match any targeted module")


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """The names (past the layer index: ``mlp.experts.gate_up_proj``) of ``model``'s stacked expert weights
    (3-D, ``(experts, out, in)``), which LoRA reaches through ``target_parameters`` only."""
    names = {re.split(r"\.\d+\.", name)[-1] for name, p in model.named_parameters() if p.ndim == 3 and "expert" in name}
    return sorted(names)


def uncovered_experts(experts: list[str], config: LoraConfig) -> list[str]:
    """The expert parameters (``fused_expert_parameters``) that ``config``'s ``target_parameters`` leave out."""
    targets = config.target_parameters or ()
    return [e for e in experts if not any(e == t or e.endswith("." + t) or t.endswith("." + e) for t in targets)]


def _warn_frozen_experts(adapters: list[str], experts: list[str]) -> None:
    """A mixture of experts whose experts get no LoRA: peft leaves them out of ``all-linear`` without a word for the
    model types it does not remap from transformers 4 (Qwen2-MoE among them), and the adapter trains attention only."""
    names = ", ".join(experts)
    log.warning("adapters %s: their LoRA targets leave this mixture of experts' experts (3-D parameters, not linear "
                "layers: %s) without LoRA, so they stay frozen and the adapters train attention and any shared linear "
                "layers only (peft's all-linear adds the experts only for the model types it remaps from transformers "
                "4). To train them as well, set bank.lora.target_parameters: [%s] (peft's LoRA on parameters, one per "
                "expert; no LoRA dropout); [] keeps them frozen without this warning", adapters, names, names)


#: peft's containers keyed by adapter name besides the ``lora_*`` ones: a module a saved adapter trains whole
#: (``modules_to_save``, e.g. an LM head TRL's SFT trained for new tokens) and trainable token rows.
ADAPTER_KEYED = ("modules_to_save", "trainable_tokens_delta")


def adapter_of(name: str) -> str | None:
    """The adapter a tensor belongs to, ``None`` for any other tensor (the base, a wrapped module's
    ``original_module``). peft names them ``<module path>.<container>.<adapter>[.weight]``, the container
    being ``lora_A``, ``lora_B``, ``lora_magnitude_vector``..., ``modules_to_save`` or
    ``trainable_tokens_delta``: the adapter is the part right after it. Read anywhere in the path, an adapter
    called ``model`` or ``mlp`` would claim every adapter's tensors under such a module, a frozen reward
    adapter's included."""
    parts = name.split(".")
    container = next((i for i, part in enumerate(parts) if part.startswith("lora_") or part in ADAPTER_KEYED), None)
    return parts[container + 1] if container is not None and container + 1 < len(parts) else None


class AdapterBank(nn.Module):
    """One transformers causal LM carrying named LoRA adapters and scalar heads.

    Modes are set here, not left to Lightning (which keeps each submodule's mode at fit start, and
    ``from_pretrained`` returns eval mode): the trainable path is in train mode, so gradient
    checkpointing really runs; the reference and the teacher always run in eval mode.

    Args:
        spec: what to load and how (see ``BankSpec``).
        require: adapters the calling method needs (merged with ``spec.adapters``).
        reference_of: the policy adapter whose *starting* weights are the reference policy, or
            ``None`` when the method needs no reference. A policy loaded from a path gets a frozen
            copy, the ``reference`` adapter (unless ``spec.reference == "base"``); in ``full`` mode
            the bank keeps a frozen copy of the base.
    """

    def __init__(self, spec: BankSpec, *, require: Sequence[AdapterSpec] = (), reference_of: str | None = None):
        super().__init__()
        self.spec = spec
        self.full = spec.train_mode == "full"
        self.adapters = {a.name: a for a in merge_adapter_specs(spec.adapters, require)}
        self.reference_adapter = self._reference_adapter_of(reference_of)
        if self.reference_adapter is not None:
            self.adapters[REFERENCE] = self.reference_adapter
        self.base_fingerprint = check_bank_spec(spec, list(self.adapters.values()))
        base = load_base(spec)
        if spec.effective_quantization:
            # Checkpointing is enabled below, with the role-aware recomputation.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            # bitsandbytes (0.50) repacks a 4-bit weight for CPU inference on its first eval-mode forward
            # and keeps it so; training forwards then run gemv_4bit, which has no autograd, and the
            # gradient through every quantized layer is silently dropped. Generation and validation run
            # in eval mode, so keep the trainable layout.
            for module in base.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            one_int8_path(base)
        # Off for training forwards (the bank turns the cache on to generate); an export writes the loaded value.
        # What an export writes back into the config: the loaded values of what training changes in it.
        self._loaded_config = {"use_cache": text_config(base.config).use_cache}
        text_config(base.config).use_cache = False
        self._loaded_config.update(router_logits_on_request(base))
        if spec.disable_dropout:
            self._loaded_config.update(disable_dropout(base))
            dropping = sorted(a.name for a in self.adapters.values() if (a.lora or spec.lora).dropout > 0)
            if dropping:
                log.warning("LoRA dropout of %s is off: bank.disable_dropout is true (set it to false to train with it)",
                            dropping)

        if self.full:
            # Copied before checkpointing is enabled: the frozen reference never recomputes anything.
            self.reference_model = self._frozen_copy(base) if reference_of is not None else None
            self.model = base
        else:
            self.model = self._attach_adapters(base) if self.adapters else base
            self.reference_model = None
        if spec.disable_dropout:
            disable_dropout(self.model)  # the LoRA dropouts too
        if spec.gradient_checkpointing:  # true, or a non-empty list of roles
            base.activation_checkpointing_enable()
            roles = None if spec.gradient_checkpointing is True else frozenset(spec.gradient_checkpointing)
            recompute = RecomputeInRole(self, roles)
            for module in base.modules():  # what transformers set up, the role-aware function in its place
                if getattr(module, "gradient_checkpointing", False):
                    module._gradient_checkpointing_func = recompute
        self.heads = nn.ModuleDict(
            {a.name: self._make_head(a) for a in self.adapters.values() if a.head is not None}
        )
        self.teacher_model = self._load_teacher(spec.teacher) if spec.teacher is not None else None
        self._active: str | None = None
        self._use_reference = False
        self._use_teacher = False
        self._frozen_depth = 0
        self._adapters_off = False
        self._tuner_layers: list[nn.Module] | None = None
        first_trainable = next((a.name for a in self.adapters.values() if a.trainable), None)
        self._activate(first_trainable or next(iter(self.adapters), None))
        self.train()

    # -- building -----------------------------------------------------------------------------

    def _reference_adapter_of(self, policy: str | None) -> AdapterSpec | None:
        """The frozen copy of ``policy`` that is the reference, when it starts from a saved adapter."""
        if policy is None or self.full or self.spec.reference == "base":
            return None
        start = self.adapters.get(policy)
        if start is None or start.path is None:
            return None  # a fresh adapter starts as the base itself: adapters off is the starting policy
        if REFERENCE in self.adapters:
            raise ValueError(
                f"adapter name {REFERENCE!r} is reserved for the frozen copy of the loaded policy {policy!r} "
                "(the reference policy): rename the declared adapter, or set bank.reference: base"
            )
        return AdapterSpec(REFERENCE, path=start.path, trainable=False, lora=start.lora)

    def _lora_config(self, adapter: AdapterSpec, base: nn.Module) -> LoraConfig:
        """peft's ``LoraConfig`` of a fresh adapter, built on the bare ``base`` (``resolve_all_linear``)."""
        lora = adapter.lora or self.spec.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            target_parameters=lora.target_parameters or None,
            # GPT-2-style Conv1D layers store the weight transposed.
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in base.modules()),
            task_type="CAUSAL_LM",
        )
        if _is_all_linear(config.target_modules):
            resolve_all_linear(config, base)
        if config.target_parameters and config.lora_dropout > 0:
            if not self.spec.disable_dropout:
                key = f"adapter {adapter.name!r} lora" if adapter.lora else "bank.lora"
                raise InvalidArgument("bank", f"{key}.dropout is {lora.dropout}, but LoRA on parameters (the experts: "
                                      f"{sorted(config.target_parameters)}) has no dropout in peft; set it to 0, or "
                                      "bank.disable_dropout: true")
            config.lora_dropout = 0.0  # disable_dropout zeroes every LoRA dropout anyway
        return config

    def _attach_adapters(self, base) -> PeftModel:
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            ignore_peft_fused_pattern_note()
            return self._wrap_with_adapters(base)

    def _wrap_with_adapters(self, base) -> PeftModel:
        # Every fresh adapter's config built on the bare base, before any adapter wraps it (resolve_all_linear).
        configs = {a.name: self._lora_config(a, base) for a in self.adapters.values() if not a.path}
        experts = fused_expert_parameters(base)
        frozen = {a.name: uncovered_experts(experts, configs[a.name]) for a in self.adapters.values()
                  if a.name in configs and (a.lora or self.spec.lora).target_parameters is None}
        if any(frozen.values()):
            _warn_frozen_experts(sorted(name for name, left in frozen.items() if left),
                                 sorted(set().union(*frozen.values())))
        model = None
        for a in self.adapters.values():
            if model is None:
                if a.path:
                    model = PeftModel.from_pretrained(base, a.path, adapter_name=a.name, is_trainable=a.trainable)
                else:
                    model = get_peft_model(base, configs[a.name], adapter_name=a.name)
            elif a.path:
                model.load_adapter(a.path, adapter_name=a.name, is_trainable=a.trainable)
            else:
                model.add_adapter(a.name, configs[a.name])
            log.info("adapter %r: %s, %s", a.name, a.path or "fresh", "trainable" if a.trainable else "frozen")
        _refuse_unwrappable_lora(model)
        return model

    def _make_head(self, adapter: AdapterSpec) -> ScalarHead:
        # The width the LM head reads, i.e. the trunk's output (some configs project it: OPT's word_embed_proj_dim).
        head = ScalarHead(self.model.get_output_embeddings().weight.shape[-1], adapter.head)
        head_file = Path(adapter.path, HEAD_FILE) if adapter.path else None
        if head_file is not None and head_file.exists():
            head.load_state_dict(load_file(str(head_file)))
        elif head_file is not None and not (adapter.trainable and adapter.head == "value"):
            raise FileNotFoundError(f"adapter {adapter.name!r} needs a {adapter.head} head but {head_file} is missing")
        elif head_file is not None:
            # PPO's shared critic on a loaded SFT policy: the value head is new, as TRL's on its SFT model.
            log.info("adapter %r: %s has no value head; training a fresh one", adapter.name, adapter.path)
        return head

    @staticmethod
    def _load_teacher(teacher: TeacherSpec) -> nn.Module:
        """The separate teacher: frozen, in eval mode, in its own dtype (and quantization)."""
        model = load_base(teacher_load_spec(teacher))
        disable_dropout(model)
        router_logits_on_request(model)
        model.requires_grad_(False)
        model.eval()
        log.info("teacher: %s (%s%s), frozen", teacher.model, teacher.dtype,
                 f", {teacher.quantization}" if teacher.quantization else "")
        return model

    def train(self, mode: bool = True) -> AdapterBank:
        """As ``nn.Module.train``, but the frozen reference copy and a separate teacher always stay in
        eval mode (deterministic, never checkpointed)."""
        super().train(mode)
        for frozen in (self.reference_model, self.teacher_model):
            if frozen is not None:
                frozen.eval()
        return self

    def float32_adapters_and_heads(self) -> None:
        """Put the LoRA adapters and the scalar heads back in float32 after a cast of the whole module to
        half precision (Lightning's ``bf16-true`` / ``16-true``), as the bank built them (peft keeps LoRA in
        float32 on a bf16 base too): the base is what such a cast is for (memory). A bf16 adapter drops
        AdamW's small steps below its rounding: at lr 1e-4, 73% of the toy DPO policy's LoRA A entries never
        moved in 5 steps."""
        for name, param in self.named_parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and (name.startswith("heads.") or adapter_of(name)):
                param.data = param.data.float()

    @staticmethod
    def _frozen_copy(model) -> nn.Module:
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        reference.eval()
        return reference

    # -- roles --------------------------------------------------------------------------------

    @property
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def active(self) -> str | None:
        """The active adapter (``None`` when the bank carries none)."""
        return self._active

    def _activate(self, name: str | None) -> None:
        if name is not None and self.is_peft:
            self.model.set_adapter(name)
        self._active = name
        # peft's set_adapter makes the adapter it activates trainable; trainability is ours to decide.
        self._apply_trainability()

    def _check_role(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} in the bank; it has {sorted(self.adapters)}")

    @contextmanager
    def role(self, name: str) -> Iterator[AdapterBank]:
        """Make adapter ``name`` active; the previously active adapter is restored on exit."""
        self._check_role(name)
        previous = self._active
        if previous == name:
            # Already active (the usual case: the policy): peft's set_adapter walks every module once
            # per adapter layer: ~200 ms per role() on a 24-layer LoRA model (``benchmarks/role_switch.py``).
            yield self
            return
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(previous)

    @property
    def has_reference(self) -> bool:
        return not self.full or self.reference_model is not None

    @contextmanager
    def reference(self) -> Iterator[AdapterBank]:
        """The reference policy, without gradients and in eval mode: the starting policy (the frozen
        ``reference`` adapter when the policy was loaded from a path, else the base with adapters
        off; the frozen copy in ``full`` mode)."""
        if not self.has_reference:
            raise RuntimeError(
                "this bank has no reference policy: in train_mode 'full' the method must ask for one "
                "(reference_of) or use precomputed reference log-probs"
            )
        if self.reference_adapter is None:
            with self._as_loaded():
                yield self
            return
        with torch.no_grad(), self._frozen(), self.role(REFERENCE):
            yield self

    @contextmanager
    def _frozen(self) -> Iterator[None]:
        """Eval mode for a frozen role's pass (the trainable path may be in train mode); nests."""
        if self._frozen_depth > 0:
            yield
            return
        self._frozen_depth += 1
        try:
            with eval_mode(self.model):
                yield
        finally:
            self._frozen_depth -= 1

    @contextmanager
    def _as_loaded(self) -> Iterator[None]:
        """The base as loaded, without gradients, in eval mode: adapters off, or the frozen copy in full mode."""
        with torch.no_grad(), self._frozen():
            if self.is_peft and not self._adapters_off:
                # peft's disable_adapter does not nest: only the outermost block switches adapters off and on.
                self._adapters_off = True
                try:
                    with self._adapter_layers_off():
                        yield
                finally:
                    self._adapters_off = False
            elif self.full:
                previous = self._use_reference
                self._use_reference = True
                try:
                    yield
                finally:
                    self._use_reference = previous
            else:
                yield

    @contextmanager
    def _adapter_layers_off(self) -> Iterator[None]:
        """Every adapter layer passes its input through the base weights alone, for a no-grad pass.

        What peft's ``disable_adapter()`` switches (each layer's ``disable_adapters`` flag), without
        the rest of it: a model-status scan on entry and ``set_adapter`` on exit, which makes the
        active adapter trainable again (even a frozen one) and walks every module once per adapter
        layer. ``reference()`` on a 24-layer LoRA model: 421 ms -> 33 ms per call on a loaded 2-core
        CPU (``benchmarks/role_switch.py``). Trainability is left as the bank set it.
        """
        if self._tuner_layers is None:  # adapters are all attached at construction: the list never changes
            self._tuner_layers = [m for m in self.model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        layers = self._tuner_layers
        previous = [m._disable_adapters for m in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was_disabled in zip(layers, previous):
                layer._disable_adapters = was_disabled

    @property
    def has_separate_teacher(self) -> bool:
        """Whether the teacher is a separate model (``BankSpec.teacher``), not the base."""
        return self.teacher_model is not None

    @contextmanager
    def teacher(self) -> Iterator[AdapterBank]:
        """The distillation teacher, without gradients: the separate teacher model when the spec
        names one, else the base as loaded (adapters off; the frozen copy in full mode). Inside,
        ``bank(...)`` runs the teacher; ``generate(..., teacher=True)`` samples from it."""
        if self.teacher_model is None:
            with self._as_loaded():
                yield self
            return
        previous = self._use_teacher
        with torch.no_grad():
            self._use_teacher = True
            try:
                yield self
            finally:
                self._use_teacher = previous

    # -- forward passes -----------------------------------------------------------------------

    def _current_model(self) -> nn.Module:
        if self._use_teacher:
            return self.teacher_model
        return self.reference_model if self._use_reference else self.model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        """The causal LM output of the active role (the teacher inside ``teacher()``); no KV cache unless
        ``use_cache=True`` is passed."""
        model = self._current_model()
        kwargs.setdefault("use_cache", False)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def output_embeddings(self) -> nn.Module:
        """The active role's LM head (``models.head.head_on`` hooks it)."""
        return self._current_model().get_output_embeddings()

    def active_config(self):
        """The transformers config of the text decoder the active role runs (the teacher's inside ``teacher()``)."""
        return text_config(self._current_model().config)

    def _trunk(self) -> nn.Module:
        """The decoder stack of the active model without its LM head, found the transformers way
        (``base_model_prefix``: ``model`` for Llama, ``transformer`` for GPT-2, ``gpt_neox``...)."""
        model = self._current_model()
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        trunk = model.base_model
        if trunk is model:  # Llama4ForCausalLM: its prefix is the multimodal checkpoint's, its decoder is `model`
            trunk = getattr(model, "model", model)
        if trunk is model:
            raise TypeError(f"{type(model).__name__} has no decoder stack under base_model_prefix {model.base_model_prefix!r}")
        return trunk

    def _hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Last hidden state of the active role, skipping the vocabulary projection."""
        out = self._trunk()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _head(self, adapter: str, kind: str) -> ScalarHead:
        self._check_role(adapter)
        head = self.heads[adapter] if adapter in self.heads else None
        if head is None or head.kind != kind:
            raise KeyError(f"adapter {adapter!r} has no {kind} head (declare it with head: {kind})")
        return head

    def score(self, input_ids, attention_mask, *, adapter: str = "reward", position_ids=None,
              token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence scalar of ``adapter``'s score head at the last attended token. (batch,) float32.

        ``token_index`` names the tokens to read instead, as indices into the flattened ``(batch * seq)``
        positions: a padding-free batch (``models.packing``) has several sequences per row."""
        head = self._head(adapter, "score")
        with self.role(adapter):
            hidden = self._hidden(input_ids, attention_mask, position_ids)
        if token_index is not None:
            return head(hidden).flatten()[token_index]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return head(hidden)[rows, last_token_index(attention_mask)]

    def values(self, input_ids, attention_mask, *, adapter: str = "value", position_ids=None) -> torch.Tensor:
        """Per-token values of ``adapter``'s value head. (batch, seq) float32."""
        head = self._head(adapter, "value")
        with self.role(adapter):
            hidden = self._hidden(input_ids, attention_mask, position_ids)
        return head(hidden)

    def logits_and_values(self, input_ids, attention_mask, *, adapter: str, position_ids=None, logits_to_keep=None):
        """One pass of ``adapter`` giving LM logits and the values of its own value head (shared trunk).

        The values read the hidden state the LM head reads (captured by a hook: some models, e.g.
        OPT, call their decoder around the trunk module), and the logits keep whatever the model
        adds after the head (Gemma 2's soft-capping). With ``logits_to_keep`` (the last positions only,
        for models whose forward takes it) both cover those positions."""
        head = self._head(adapter, "value")
        captured = []
        lm_head = self._current_model().get_output_embeddings()
        hook = lm_head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            with self.role(adapter):
                kept = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
                out = self.forward(input_ids, attention_mask, position_ids, **kept)
        finally:
            hook.remove()
        return out.logits, head(captured[-1])

    @contextmanager
    def generating(self, adapter: str | None, *, teacher: bool = False) -> Iterator[nn.Module]:
        """The transformers model that samples from ``adapter``; with ``adapter=None`` from the
        reference policy, or with ``teacher=True`` from the distillation teacher (see ``teacher()``),
        set up for the duration, without gradients.

        What ``generate`` runs, for rollout engines that drive the model's forward themselves. An adapter's
        LoRA deltas are merged into the base weights for the duration (``models.lora_merge``: one matmul per
        linear, and the exact base restored after)."""
        if teacher and adapter is not None:
            raise ValueError(f"generate samples from one role: adapter {adapter!r} or the teacher, not both")
        with torch.no_grad():
            if adapter is not None:
                with self.role(adapter), lora_merged(self.model, adapter) if self.is_peft else nullcontext():
                    yield self.model
            else:
                with self.teacher() if teacher else self.reference():
                    yield self._current_model()

    def generate(self, input_ids, attention_mask, *, adapter: str | None, teacher: bool = False,
                 **generate_kwargs) -> torch.Tensor:
        """Sample from ``adapter``; with ``adapter=None`` from the reference policy, or with
        ``teacher=True`` from the distillation teacher (see ``teacher()``). Returns prompt + response ids."""
        generate_kwargs.setdefault("use_cache", True)
        with self.generating(adapter, teacher=teacher) as model:
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    # -- trainable state ----------------------------------------------------------------------

    def _is_trainable(self, name: str) -> bool:
        """Whether the parameter ``name`` (relative to this bank) is trained."""
        if name.startswith("heads."):
            return self.adapters[name.split(".")[1]].trainable
        if name.startswith(("reference_model.", "teacher_model.")):
            return False
        if self.full:
            return any(a.trainable for a in self.adapters.values()) or not self.adapters
        adapter = self.adapters.get(adapter_of(name))
        return adapter is not None and adapter.trainable

    def _apply_trainability(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(self._is_trainable(name))

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if self._is_trainable(n)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if self._is_trainable(n)]

    # -- saving -------------------------------------------------------------------------------

    def save_adapter(self, name: str, path: str | Path, *, metadata: dict | None = None) -> Path:
        """Save adapter ``name`` (and its head) in PEFT's own format, loadable by ``PeftModel.from_pretrained``."""
        self._check_role(name)
        if not self.is_peft:
            raise RuntimeError("this bank trains the full model: use export_merged to save it")
        with atomic_directory(path) as tmp:
            config = copy.deepcopy(self.model.peft_config[name])
            config.base_model_name_or_path = self.spec.model
            config.inference_mode = True
            config.save_pretrained(str(tmp))
            state = get_peft_model_state_dict(self.model, adapter_name=name)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
            meta = {"base": self.base_fingerprint, "base_model": model_identity(self.spec.model),
                    "quantization": quantization_record(self.spec), "reference": self._start_of(name),
                    **(metadata or {})}
            write_head_and_meta(tmp, self.heads[name] if name in self.heads else None, meta)
        return Path(path)

    def _start_of(self, name: str) -> str | None:
        """Where adapter ``name`` started, recorded with it as the reference ``lit-rlhf evaluate``
        compares it with: the adapter it was loaded from (an SFT adapter DPO went on from), ``None``
        for a fresh one or with ``bank.reference: base`` (the bare base is then the reference)."""
        start = self.adapters[name].path
        if start is None or self.spec.reference == "base":
            return None
        return str(Path(start).resolve()) if Path(start).exists() else start

    def export_merged(self, path: str | Path, *, adapter: str | None = None, keep_head: bool = False,
                      metadata: dict | None = None) -> Path:
        """Save a plain transformers model (``save_pretrained``) with ``adapter`` merged into the base.

        The merge happens on a fresh unquantized load of the base, so the bank's own base and
        its reference policy are untouched and a 4-bit run exports full-precision weights: the
        dequantized 4-bit weights the adapter was trained against, not the original ones (the
        exported model computes the trained function).

        Args:
            path: the directory to write.
            adapter: the adapter merged (LoRA mode); the active one when ``None``.
            keep_head: also write the adapter's scalar head (``save_pretrained`` drops it) and
                ``metadata`` beside the weights, as a merged reward model needs.
            metadata: the ``META_FILE`` entries written with ``keep_head``.
        """
        tokenizer = load_tokenizer(self.spec)
        adapter = adapter or self._active

        def write(model: nn.Module, directory: Path) -> None:
            model.save_pretrained(str(directory))
            tokenizer.save_pretrained(str(directory))
            if keep_head:
                # The merged model is its own base: no fingerprint of another one to check against.
                write_head_and_meta(directory, self.heads[adapter], {"base": None, **(metadata or {})})

        if self.full:
            config = text_config(self.model.config)
            training = {name: getattr(config, name) for name in self._loaded_config}
            for name, value in self._loaded_config.items():
                setattr(config, name, value)
            try:
                with atomic_directory(path) as tmp:
                    write(self.model, tmp)
            finally:
                for name, value in training.items():
                    setattr(config, name, value)
            return Path(path)
        with tempfile.TemporaryDirectory() as adapter_dir:
            self.save_adapter(adapter, Path(adapter_dir) / "adapter")
            if self.spec.effective_quantization:
                base = load_dequantized_base(self.spec)  # what the adapter trained against
            else:
                base = load_base(self.spec, quantize=False)
            merged = merge_adapter(base, str(Path(adapter_dir) / "adapter"))
            with atomic_directory(path) as tmp:
                write(merged, tmp)
        return Path(path)
