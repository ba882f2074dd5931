"""Light, typed specs of the bank: what LightningCLI parses; nothing heavy is built here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoraSpec:
    """LoRA hyperparameters (Hu et al. 2021, arXiv 2106.09685).

    Args:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"`` for every linear layer but the output, as
            peft (0.21) resolves it on transformers 5: on the mixtures of experts peft remaps from
            transformers 4 (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3...) also the experts (3-D parameters; the
            fused ``gate_up_proj`` with twice the rank and alpha) and the router's weight; not on the others
            (Qwen2-MoE), whose experts stay frozen (the bank warns).
        target_parameters: parameter names to adapt as well (peft's ``target_parameters``, matched as name
            suffixes), e.g. ``[mlp.experts.gate_up_proj, mlp.experts.down_proj]`` for the experts of
            Qwen2-MoE: one LoRA per expert, without dropout. ``None``: none beyond ``target_modules``' (and a
            warning where experts get no LoRA); ``[]``: the same, without the warning.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    target_parameters: list[str] | None = None


@dataclass
class AdapterSpec:
    """One named LoRA adapter on the shared base.

    Args:
        name: the role name methods ask for (``policy``, ``reward``, ``value``...).
        path: a saved adapter directory (PEFT format, plus ``head.safetensors`` when it has a head);
            ``None`` starts a fresh adapter.
        trainable: whether the optimizer updates it.
        head: a scalar head read at the last token (``score``, reward models) or at every token
            (``value``, critics); ``None`` for a language-model adapter.
        lora: hyperparameters of a fresh adapter; the bank's ``lora`` when ``None``.
    """

    name: str
    path: str | None = None
    trainable: bool = True
    head: Literal["score", "value"] | None = None
    lora: LoraSpec | None = None


@dataclass
class TeacherSpec:
    """A separate, frozen teacher model for distillation (GKD, KD, SeqKD).

    It is loaded beside the bank's base, never trained, and never written to checkpoints. It
    must share the student's tokenizer (checked when the bank is built).

    Args:
        model: a local directory or hub id for ``from_pretrained``.
        tokenizer: where to load the teacher's tokenizer from (to check it against the
            student's); ``model`` when ``None``.
        dtype: weights dtype of the teacher (``float32``, ``bfloat16``, ``float16``); independent of the student's.
        quantization: ``4bit`` or ``8bit`` through bitsandbytes; ``None`` for none.
        quant_type: 4-bit data type, ``nf4`` or ``fp4``.
        double_quant: quantize the 4-bit quantization constants as well.
        trust_remote_code: allow code shipped with a hub model to run (off unless you trust it).
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
    """

    model: str
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["4bit", "8bit"] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class BankSpec:
    """How to build the one base model and what it carries.

    Args:
        model: a local directory or hub id for ``from_pretrained``.
        tokenizer: where to load the tokenizer from; ``model`` when ``None``.
        dtype: weights dtype of the base (``float32``, ``bfloat16``, ``float16``).
        train_mode: ``lora`` (adapters on a frozen base), ``qlora`` (adapters on a 4-bit base) or
            ``full`` (the base itself is trained; the reference is a frozen copy).
        quantization: ``4bit`` or ``8bit`` through bitsandbytes; ``qlora`` implies ``4bit``.
        quant_type: 4-bit data type, ``nf4`` or ``fp4``.
        double_quant: quantize the 4-bit quantization constants as well.
        quant_storage: the dtype the packed 4-bit weights are stored in. DeepSpeed ZeRO-3 partitions
            only tensors of the model's dtype: set it to ``dtype`` (e.g. ``bfloat16``) there.
        lora: default hyperparameters of fresh adapters.
        adapters: adapters to create or load besides those a method asks for.
        gradient_checkpointing: trade compute for activation memory: a training forward keeps only each
            decoder layer's inputs and recomputes the layer in backward, with the adapter that ran it.
            ``true``: every trainable role; a list of trainable adapter names: only those roles (PPO's
            ``[policy]`` recomputes the policy's forwards, the value adapter keeps its activations);
            ``false``: none. In ``full`` mode the one trainable role is the base, so a list naming it
            is ``true``. The frozen reference and teacher, and every no-grad forward, never recompute.
        disable_dropout: set every dropout of the base, the adapters and the teacher to 0 (as TRL does):
            the reference is then deterministic and an online method's first update has ratio
            exactly 1. ``false`` trains with the configured dropouts (``lora.dropout``, the base's own).
        reference: the reference policy of the DPO family, KTO, PPO, RLOO, GRPO and Online DPO.
            ``start`` (default): the starting policy, i.e. a frozen copy of the policy adapter when it is
            loaded from a path (an SFT adapter), else the base with adapters off (a fresh LoRA adapter starts as the
            base); in ``full`` mode a frozen copy of the base. ``base``: always the base with adapters off.
        random_init: build the architecture of ``model``'s config with fresh random weights.
        trust_remote_code: allow code shipped with a hub model to run (off unless you trust it).
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        teacher: a separate frozen teacher model (distillation); ``None`` makes the teacher the
            reference policy (the base without adapters, or its frozen copy in ``full`` mode).
    """

    model: str = "assets/toy/base"
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    train_mode: Literal["lora", "qlora", "full"] = "lora"
    quantization: Literal["4bit", "8bit"] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    lora: LoraSpec = field(default_factory=LoraSpec)
    adapters: list[AdapterSpec] = field(default_factory=list)
    gradient_checkpointing: bool | list[str] = False
    disable_dropout: bool = True
    reference: Literal["start", "base"] = "start"
    random_init: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    teacher: TeacherSpec | None = None

    @property
    def effective_quantization(self) -> str | None:
        if self.train_mode == "qlora":
            return self.quantization or "4bit"
        return self.quantization
