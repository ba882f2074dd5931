"""Safe loading: no remote code unless asked, weights from safetensors only, checkpoints read with
``weights_only=True``, a reward function imported only from the module its name gives."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from lit_rlhf.cli import main
from lit_rlhf.methods.base import read_checkpoint
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer
from lit_rlhf.models.loading import load_base
from lit_rlhf.models.spec import TeacherSpec
from lit_rlhf.rollout import ModelReward, load_function

from tests.paths import TOY_BASE, TOY_TEACHER


class Planted:
    """A pickled object whose unpickling runs code: it creates the file ``MARKER``."""

    MARKER = Path("/nonexistent")

    def __reduce__(self):
        return (Path.touch, (self.MARKER,))


def remote_code_model(path: Path) -> Path:
    """A model directory whose config needs its own Python code (``auto_map``); importing that code
    creates ``ran.txt`` beside it."""
    path.mkdir()
    config = json.loads(Path(TOY_BASE, "config.json").read_text())
    config.update(model_type="planted", auto_map={"AutoConfig": "planted.PlantedConfig",
                                                  "AutoModelForCausalLM": "planted.PlantedModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "planted.py").write_text(f"open({str(path / 'ran.txt')!r}, 'w').close()\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(TOY_BASE, name), path / name)
    return path


def test_remote_code_does_not_run_unless_asked(tmp_path):
    model = remote_code_model(tmp_path / "planted")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AdapterBank(BankSpec(model=str(model)), require=[AdapterSpec("policy")])
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_base(BankSpec(model=str(model), random_init=True))
    assert not (model / "ran.txt").exists()


def test_every_loader_passes_trust_remote_code_false_by_default(monkeypatch):
    import transformers

    calls = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", False)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    AdapterBank(BankSpec(model=TOY_BASE, teacher=TeacherSpec(model=TOY_TEACHER)), require=[AdapterSpec("policy")])
    load_tokenizer(BankSpec(model=TOY_BASE))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(trust is False for _, trust in calls), calls


def pickled_only(path: Path, weights: str) -> Path:
    shutil.copytree(TOY_BASE, path, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({}, path / weights)
    return path


def test_a_model_with_only_pickled_weights_is_refused_with_the_conversion(tmp_path):
    model = pickled_only(tmp_path / "bin_model", "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle file\(s\) \(pytorch_model.bin\).*save_pretrained\(path\)"):
        load_base(BankSpec(model=str(model)))
    with pytest.raises(ValueError, match=r"reward model at .* only as pickle file\(s\)"):
        ModelReward(str(model)).setup()


def test_an_adapter_with_only_pickled_weights_is_refused(tmp_path):
    bank = AdapterBank(BankSpec(model=TOY_BASE), require=[AdapterSpec("policy")])
    saved = bank.save_adapter("policy", tmp_path / "adapter")
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter 'policy' at .* \(adapter_model.bin\).*PeftModel"):
        AdapterBank(BankSpec(model=TOY_BASE, adapters=[AdapterSpec("policy", path=str(saved))]))


def planted_checkpoint(tmp_path: Path) -> Path:
    Planted.MARKER = tmp_path / "ran.txt"
    path = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "note": Planted()}, path)
    return path


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lit-rlhf"])
    ckpt = planted_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="refused to load, it holds pickled objects"):
        read_checkpoint(ckpt)
    with pytest.raises(ValueError, match="refused to load"):
        main(["export", "--config", "configs/dpo.yaml", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    assert not Planted.MARKER.exists() and not (tmp_path / "out").exists()


def test_fit_resumes_with_weights_only_whatever_torch_defaults_to(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load(weights_only=None) -> False
    monkeypatch.setattr("sys.argv", ["lit-rlhf"])
    seen = {}

    @functools.wraps(pl.Trainer.fit)  # the CLI reads fit's signature for its arguments
    def fit(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    main(["fit", "--config", "configs/dpo.yaml", "--trainer.default_root_dir", str(tmp_path)])
    assert seen["weights_only"] is True


def test_a_reward_function_comes_only_from_the_module_it_names():
    from lit_rlhf import toy

    assert load_function("lit_rlhf.toy:reward") is toy.reward
    for name in ("lit_rlhf.toy:reward()", "__import__('os').system:x", "lit_rlhf.toy:reward; import os", "reward"):
        with pytest.raises(ValueError, match="dotted Python names"):
            load_function(name)
    with pytest.raises(AttributeError, match="module 'lit_rlhf.toy.rules' has no attribute 'reward'"):
        load_function("lit_rlhf.toy.rules:reward")  # lit_rlhf.toy has it; the module named is the only one read
