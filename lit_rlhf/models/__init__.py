"""The AdapterBank and what builds it: specs, loading, heads."""

from lit_rlhf.models.bank import AdapterBank, eval_mode, model_identity
from lit_rlhf.models.heads import ScalarHead, last_token_index
from lit_rlhf.models.loading import load_base, load_tokenizer
from lit_rlhf.models.saving import read_adapter_meta
from lit_rlhf.models.spec import AdapterSpec, BankSpec, LoraSpec, TeacherSpec

__all__ = [
    "AdapterBank",
    "AdapterSpec",
    "BankSpec",
    "LoraSpec",
    "ScalarHead",
    "TeacherSpec",
    "eval_mode",
    "last_token_index",
    "load_base",
    "load_tokenizer",
    "model_identity",
    "read_adapter_meta",
]
