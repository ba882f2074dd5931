"""Exporting what a run trained: a PEFT adapter directory or a merged transformers model, each with
a model card (``README.md``) the way the Hugging Face Hub expects one."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.methods.base import BankMethod
from lit_rlhf.strategies import gather_trainable, is_sharded


def _data_files(datamodule) -> dict[str, object]:
    return {split: getattr(datamodule, split, None) for split in ("train", "val") if getattr(datamodule, split, None)}


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def write_model_card(path: str | Path, method: BankMethod, *, datamodule=None, merged: bool = False,
                     metrics: dict[str, float] | None = None, source: str | None = None) -> Path:
    """Write ``<path>/README.md``: base model, method, data files, key hyperparameters, final
    metrics and the lines that load the export with plain peft / transformers.

    Args:
        path: the exported adapter or merged model directory.
        method: the method that trained it (its ``hparams`` and bank spec are reported).
        datamodule: the run's data (its ``train`` / ``val`` sources are listed).
        merged: whether ``path`` is a merged model (else a PEFT adapter).
        metrics: final metric values (e.g. ``trainer.callback_metrics``).
        source: where the weights came from (e.g. a checkpoint path), if not the end of ``fit``.
    """
    path = Path(path)
    spec = method.bank_spec
    name = type(method).__name__
    hparams = {k: v for k, v in dict(method.hparams).items()
               if k != "bank" and not k.startswith("_") and v is not None}  # _class_path etc.: LightningCLI's
    rows = [("base model", f"`{spec.model}`"), ("method", f"{name} (`{type(method).__module__}.{name}`)"),
            ("train mode", spec.train_mode)]
    if spec.train_mode != "full":
        rows.append(("LoRA", f"r={spec.lora.r}, alpha={spec.lora.alpha}, dropout={spec.lora.dropout}, "
                             f"target modules {_value(spec.lora.target_modules)}"))
    rows += [(f"{split} data", f"`{_value(files)}`") for split, files in _data_files(datamodule).items()]
    if source:
        rows.append(("weights from", source))
    library = "transformers" if merged else "peft"
    tags = ["lit-rlhf", name.lower(), "lora" if spec.train_mode != "full" else "full-fine-tune"]
    lines = ["---", f"base_model: {spec.model}", f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags]
    lines += ["---", "", f"# {name} {'model (adapter merged)' if merged else 'LoRA adapter'} trained with lit_rlhf", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | `{_value(v)}` |" for k, v in sorted(hparams.items())]
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Load it", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")']
    elif spec.effective_quantization:
        # The adapter corrects the quantized weights: on the full-precision base it is another model.
        quantized = ("load_in_8bit=True" if spec.effective_quantization == "8bit" else
                     f'load_in_4bit=True, bnb_4bit_quant_type="{spec.quant_type}", '
                     f'bnb_4bit_use_double_quant={spec.double_quant}, bnb_4bit_compute_dtype=torch.{spec.dtype}')
        lines += ["import torch", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", "",
                  "# trained on the quantized base: load it quantized the same way",
                  f'base = AutoModelForCausalLM.from_pretrained("{spec.model}", '
                  f'quantization_config=BitsAndBytesConfig({quantized}))',
                  f'model = PeftModel.from_pretrained(base, "{path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{spec.tokenizer or spec.model}")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{spec.model}")',
                  f'model = PeftModel.from_pretrained(base, "{path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{spec.tokenizer or spec.model}")']
    lines += ["```", "", f"or try it: `lit-rlhf chat {path}`, `lit-rlhf evaluate {path}`"]
    card = path / "README.md"
    card.write_text("\n".join(lines) + "\n")
    return card


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last logged value of every scalar metric (``trainer.callback_metrics``)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


class ExportOnFitEnd(pl.Callback):
    """Export the trained adapter (and optionally the merged model), each with a model card, when ``fit`` ends.

    Args:
        dirpath: where to write; ``<log_dir>/export`` when ``None``.
        merged: also write a merged model (``save_pretrained``) under ``<dirpath>/merged``.
    """

    def __init__(self, dirpath: str | None = None, merged: bool = False):
        self.dirpath = dirpath
        self.merged = merged

    def on_fit_end(self, trainer: pl.Trainer, pl_module: BankMethod) -> None:
        # trainer.log_dir is a collective under DDP (a broadcast): every rank must ask for it.
        root = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")
        if is_sharded(pl_module.bank):
            # FSDP: every rank gathers the trainable shards (a collective); rank 0 loads them into an
            # unsharded bank of its own (on CPU) and writes from it.
            trained = gather_trainable(pl_module.bank)
            if not trainer.is_global_zero:
                return
            pl_module = pl_module.unsharded_copy(trained)
        if not trainer.is_global_zero:
            return
        card = dict(datamodule=trainer.datamodule, metrics=final_metrics(trainer))
        if not pl_module.bank.full:
            out = pl_module.export(root / "adapter")
            write_model_card(out, pl_module, merged=False, **card)
            rank_zero_info(f"adapter {pl_module.trained_adapter!r} -> {out}")
        if self.merged or pl_module.bank.full:
            out = pl_module.export(root / "merged", merged=True)
            write_model_card(out, pl_module, merged=True, **card)
            rank_zero_info(f"merged model -> {out}")
