"""Loading the base model and tokenizer: dtype, quantization, pad token, safe defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lit_rlhf.errors import InvalidArgument
from lit_rlhf.models.spec import BankSpec

log = logging.getLogger("lit_rlhf.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(spec: BankSpec):
    """The tokenizer of ``spec``, with a pad token guaranteed.

    Pad-token rule for tokenizers that lack one: use the EOS token, else the UNK token,
    else fail. Masks in lit_rlhf come from lengths, never from comparing ids with the pad
    id, so pad == eos is safe.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer or spec.model, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        for name in ("eos_token", "unk_token"):
            token = getattr(tokenizer, name)
            if token is not None:
                tokenizer.pad_token = token
                log.warning("tokenizer %s has no pad token: using its %s %r as pad", spec.tokenizer or spec.model, name, token)
                break
        else:
            raise ValueError(
                f"tokenizer {spec.tokenizer or spec.model!r} has neither a pad, an EOS nor an UNK token; "
                "set one with tokenizer.pad_token = ... or choose another tokenizer"
            )
    return tokenizer


def quantization_config(spec: BankSpec) -> BitsAndBytesConfig | None:
    mode = spec.effective_quantization
    if mode is None:
        return None
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        # bf16 compute on a float32 spec would silently lose precision: compute in the spec's dtype.
        bnb_4bit_compute_dtype=DTYPES[spec.dtype],
        bnb_4bit_quant_storage=getattr(torch, spec.quant_storage),
    )


def quantization_record(spec: BankSpec) -> dict | None:
    """What an adapter trained on ``spec``'s base records of its quantization (``None``: full precision):
    the weights it corrects depend on each of these."""
    mode = spec.effective_quantization
    if mode != "4bit":
        return None if mode is None else {"mode": mode}
    return {"mode": mode, "quant_type": spec.quant_type, "double_quant": spec.double_quant}


def saved_quantization(config) -> dict | None:
    """How a model saved quantized is quantized (``quantization_config`` in its config.json), as
    ``quantization_record`` writes it; ``None`` for a full-precision checkpoint."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != "bitsandbytes":
        return {"mode": saved.get("quant_method")}
    if saved.get("load_in_8bit"):
        return {"mode": "8bit"}
    return {"mode": "4bit", "quant_type": saved.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(saved.get("bnb_4bit_use_double_quant", False))}


def require_safetensors(path: str, *, what: str, convert: str) -> None:
    """Fail clearly when a local directory holds its weights only as pickles (``.bin``, ``.pt``).

    Unpickling can run arbitrary code, so weights load from safetensors only; without this
    check transformers and peft fail with a message that does not say what to do (or, for
    adapters, fall back to the pickle). Hub ids are left to ``use_safetensors=True``.

    Args:
        path: the model or adapter directory.
        what: how the message names it (``model``, ``adapter 'reward'``).
        convert: the one-line conversion the message suggests.
    """
    directory = Path(path)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ValueError(
            f"{what} at {path} has its weights only as pickle file(s) ({', '.join(pickles)}); lit_rlhf loads weights "
            f"from safetensors only (unpickling can run arbitrary code). Convert it once, in a session you trust: "
            f"{convert}"
        )


#: The conversions ``require_safetensors`` suggests (save_pretrained writes safetensors by default).
CONVERT_MODEL = "AutoModelForCausalLM.from_pretrained(path, use_safetensors=False).save_pretrained(path)"
CONVERT_ADAPTER = "PeftModel.from_pretrained(base_model, path).save_pretrained(path)"


def text_config(config):
    """The config of ``config``'s text decoder: its ``text_config`` for a multimodal checkpoint (Gemma 3 4B and
    up, saved as ``Gemma3ForConditionalGeneration``), the config itself otherwise. Vocabulary, width, depth and
    positions live there; the top level of a multimodal config names none of them."""
    return config.get_text_config(decoder=True)


def text_decoder_prefix(model) -> str:
    """Where ``model``'s text decoder sits (``model.language_model.`` in Gemma 3's ``Gemma3ForConditionalGeneration``),
    ``""`` for a text model, which is all text decoder (and its LM head)."""
    if text_config(model.config) is model.config:
        return ""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder) + "."


def load_config(model: str, *, trust_remote_code: bool, what: str = "bank.model"):
    """The transformers config of ``model``, refused unless ``AutoModelForCausalLM`` loads it.

    Some multimodal checkpoints are registered there (Gemma 3's ``gemma3`` loads its whole
    ``Gemma3ForConditionalGeneration``, which runs on text alone; Llama 4's ``llama4`` loads its text model
    alone), others are not (Mistral-Small-3.1's ``mistral3``, Qwen2.5-VL, LLaVA): those fail here, before any
    weights load, with what to do, rather than deep inside transformers. Remote-code models register themselves
    through ``auto_map``."""
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in getattr(config, "auto_map", {}):
        return config
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "an unnamed architecture"
    text = text_config(config)
    if text is config:
        how = "lit_rlhf trains decoder-only causal language models: choose one (config.json model_type)"
    else:
        how = (f"lit_rlhf trains a multimodal model's text decoder only where AutoModelForCausalLM loads it; save "
               f"this one's language model on its own (a {text.model_type!r} causal LM built from its text_config, "
               f"holding its language model's and LM head's weights) and set {what} to that directory")
    raise InvalidArgument(
        "bank",
        f"{what} {model!r} is a {config.model_type!r} checkpoint ({architectures}) that transformers' "
        f"AutoModelForCausalLM does not load: {how}",
    )


def load_base(spec: BankSpec, *, quantize: bool = True):
    """The transformers causal LM of ``spec`` (weights from safetensors; no remote code unless asked)."""
    common = {"trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        common["attn_implementation"] = spec.attn_implementation
    if spec.random_init:
        if spec.effective_quantization and quantize:
            raise ValueError("random_init cannot be combined with quantization: quantize a saved model instead")
        config = load_config(spec.model, trust_remote_code=spec.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype], **common)
    require_safetensors(spec.model, what="model", convert=CONVERT_MODEL)
    # A model saved quantized loads as saved (``check_bank_spec`` has the bank's settings agree to train on it).
    saved = saved_quantization(AutoConfig.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code))
    qconfig = quantization_config(spec) if quantize and saved is None else None
    kwargs = dict(common, dtype=DTYPES[spec.dtype], use_safetensors=True)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs)
    if qconfig is not None:
        _require_quantized(model, spec)
    return model


def _require_quantized(model, spec: BankSpec) -> None:
    """Fail where bitsandbytes quantized none of ``model``'s layers.

    transformers (5.x) replaces layers whose type is exactly ``nn.Linear`` (or ``Conv1D``); Falcon's are
    ``FalconLinear``, a subclass, and load in full precision with only a log line (naming another
    quantizer). The run would train a full-precision base (upcast to float32 by
    ``prepare_model_for_kbit_training``) while its adapters record a quantized one."""
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        return
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    raise ValueError(
        f"{spec.effective_quantization} quantization of {spec.model!r} quantized none of its layers: transformers "
        f"quantizes plain torch.nn.Linear and Conv1D layers only, and {type(model).__name__}'s are {kinds} (its LM "
        "head is never quantized). Set bank.train_mode: lora without bank.quantization (or the teacher's "
        "quantization: null) to train on the full-precision base"
    )


def fingerprint(config) -> dict:
    """What an adapter saved on a base must match to load onto another base: from the base's
    ``config.json`` (a ``PretrainedConfig``), so it is checked before any weights load. The sizes are the text
    decoder's, the only part an adapter adapts (``text_config``)."""
    text = text_config(config)
    return {
        "model_type": config.model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
    }


def load_dequantized_base(spec: BankSpec):
    """The base of a quantized ``spec`` in full precision, holding the weights its adapters trained against.

    A QLoRA adapter learns to correct the 4-bit (or 8-bit) weights, not the originals: merged into
    the original base it gives another function (on the tiny test models, logits off by a third of
    their size). Here every quantized linear of a fresh quantized load is dequantized into an
    unquantized load of the same model (quantization is deterministic), so the merge reproduces the
    model that was trained. GPT-2's ``Conv1D`` layers are quantized as ``nn.Linear``: transposed back.
    A multimodal model's vision tower and projector keep their original weights: no adapter trained against
    them (the bank runs text only), and rounded they would only serve images worse.
    """
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    from transformers.pytorch_utils import Conv1D

    base = load_base(spec, quantize=False)
    if getattr(base, "hf_quantizer", None) is not None:  # saved quantized: its weights are the only ones there are
        return base.dequantize(dtype=DTYPES[spec.dtype])
    quantized = load_base(spec)
    text = text_decoder_prefix(base)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            weight = getattr(module, "weight", None)
            if type(weight).__name__ not in ("Params4bit", "Int8Params") or not name.startswith(text):
                continue
            value = dequantize_bnb_weight(weight, getattr(module, "state", None))
            target = base.get_submodule(name)
            if isinstance(target, Conv1D):
                value = value.t()
            target.weight.copy_(value.to(target.weight.dtype))
    return base
