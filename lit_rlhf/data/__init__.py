"""Data for lit_rlhf: formats and validation, sources, tokenisation, collators, DataModules.

Flow: ``load_rows`` -> ``build_examples`` (validate every row, render, tokenise, truncate)
-> ``report_invalid`` -> a collator. The DataModules run it all in ``setup()``.
"""

from lit_rlhf.data.collate import (
    PackingCollator,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    UnpairedCollator,
    pad_token_id_of,
)
from lit_rlhf.data.datamodules import (
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    UnpairedDataModule,
    epoch_sampler,
)
from lit_rlhf.data.formats import FORMATS, ROLES, DataError, Where, check_row, report_invalid
from lit_rlhf.data.sources import load_rows
from lit_rlhf.data.tokenize import build_examples, tokenize_record

__all__ = [
    "FORMATS",
    "ROLES",
    "DataError",
    "PackingCollator",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "SFTCollator",
    "SFTDataModule",
    "UnpairedCollator",
    "UnpairedDataModule",
    "Where",
    "build_examples",
    "check_row",
    "epoch_sampler",
    "load_rows",
    "pad_token_id_of",
    "report_invalid",
    "tokenize_record",
]
