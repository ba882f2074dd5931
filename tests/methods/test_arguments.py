"""Every offline method refuses a bad argument when it is built, naming the argument (and, from the
command line, the config key), instead of failing or silently misbehaving at a later step."""

from __future__ import annotations

import typing

import pytest

from lit_rlhf.cli import console
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, F_DIVERGENCES, KTO_LOSS_TYPES
from lit_rlhf.methods import CPO, DPO, KTO, ORPO, SFT, RewardModeling, SimPO
from lit_rlhf.methods.base import LR_SCHEDULERS, BankMethod
from lit_rlhf.methods.reward import NORMALIZE_ON

BAD = [
    (DPO, {"beta": 0.0}, "beta"),
    (DPO, {"loss_type": "sigmiod"}, "loss_type"),
    (DPO, {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights"),
    (DPO, {"label_smoothing": 0.5}, "label_smoothing"),
    (DPO, {"f_divergence": "kl"}, "f_divergence"),
    (DPO, {"discopop_tau": 0.0}, "discopop_tau"),
    (DPO, {"ld_alpha": 1.5}, "ld_alpha"),
    (DPO, {"sync_ref_model": True, "ref_model_sync_steps": 0}, "ref_model_sync_steps"),
    (SimPO, {"beta": -1.0}, "beta"),
    (SimPO, {"label_smoothing": -0.1}, "label_smoothing"),
    (CPO, {"loss_type": "kto"}, "loss_type"),
    (CPO, {"alpha": -1.0}, "alpha"),
    (ORPO, {"beta": 0.0}, "beta"),
    (KTO, {"loss_type": "apo_zero"}, "loss_type"),
    (KTO, {"beta": 0.0}, "beta"),
    (KTO, {"desirable_weight": 0.0}, "desirable_weight"),
    (KTO, {"undesirable_weight": -1.0}, "undesirable_weight"),
    (RewardModeling, {"center_coefficient": -0.01}, "center_coefficient"),
    (RewardModeling, {"normalize_on": "test"}, "normalize_on"),
    (SFT, {"lr_scheduler": "cosin"}, "lr_scheduler"),
    (SFT, {"learning_rate": 0.0}, "learning_rate"),
    (SFT, {"warmup_steps": -1}, "warmup_steps"),
]


@pytest.mark.parametrize("method, kwargs, argument", BAD, ids=[f"{m.__name__}-{a}" for m, _, a in BAD])
def test_a_bad_value_fails_at_construction_naming_the_argument(method, kwargs, argument):
    with pytest.raises(InvalidArgument, match=argument) as caught:
        method(**kwargs)
    assert caught.value.argument == argument


@pytest.mark.parametrize(
    "config, option, value, message",
    [
        ("configs/dpo.yaml", "beta", "-1", "beta must be > 0"),
        ("configs/kto.yaml", "desirable_weight", "0", "desirable_weight must be > 0"),
        ("configs/sft.yaml", "lr_scheduler", "cosin", None),  # refused by the signature's Literal, before __init__
    ],
)
def test_the_command_line_names_the_config_key(config, option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        console(["fit", "--config", config, f"--model.init_args.{option}", value,
                 "--trainer.default_root_dir", str(tmp_path)])
    assert exit_code.value.code == 1
    error = capsys.readouterr().err
    if message:
        assert f"config key 'model.init_args.{option}': " in error and message in error, error
    else:
        assert f'Parser key "{option}"' in error, error
    assert not any(tmp_path.iterdir()), "nothing is written before the arguments are accepted"


def _literal_values(method: type, argument: str) -> tuple:
    hint = typing.get_type_hints(method.__init__)[argument]
    literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal] or [hint]
    return tuple(value for literal in literals for value in typing.get_args(literal))


@pytest.mark.parametrize(
    "method, argument, allowed",
    [
        (DPO, "loss_type", DPO_LOSS_TYPES),
        (DPO, "f_divergence", F_DIVERGENCES),
        (CPO, "loss_type", CPO_LOSS_TYPES),
        (KTO, "loss_type", KTO_LOSS_TYPES),
        (RewardModeling, "normalize_on", NORMALIZE_ON[:-1]),
        (BankMethod, "lr_scheduler", LR_SCHEDULERS),
    ],
)
def test_the_signature_accepts_exactly_the_names_the_checks_accept(method, argument, allowed):
    # LightningCLI validates a config against the signature, Python callers meet the check: one list for both.
    assert _literal_values(method, argument) == allowed
