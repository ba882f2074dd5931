"""``lit-rlhf``: LightningCLI for fit / validate / test, plus ``export`` beside it.

    lit-rlhf fit --config configs/dpo.yaml [--model.init_args.beta 0.2 ...]
    lit-rlhf export --config configs/dpo.yaml --ckpt_path runs/.../last.ckpt --out exported/ [--merged true]
    lit-rlhf best-of-n --config configs/best_of_n.yaml --out data.jsonl --format preference
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.methods.base import BankMethod


class LitRLHFCLI(LightningCLI):
    """LightningCLI over every method and DataModule, validating the data before the Trainer runs."""

    def _prepare_data(self) -> None:
        # Every row is validated (and tokenized) here, so bad data fails before any model is built.
        prepare = getattr(self.datamodule, "prepare", None)
        if prepare is not None:
            prepare(self.model.tokenizer)

    def before_fit(self) -> None:
        self._prepare_data()

    def before_validate(self) -> None:
        self._prepare_data()

    def before_test(self) -> None:
        self._prepare_data()


def build_cli(args: list[str] | None = None, *, run: bool = True) -> LitRLHFCLI:
    return LitRLHFCLI(
        BankMethod,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file, or a sharded checkpoint directory (FSDP, ``torch.distributed.checkpoint``)
    consolidated in this one process's memory."""
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def export_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="lit-rlhf export", description="Export the adapter or merged model of a checkpoint.")
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by that run (file, or FSDP directory)")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--merged", type=bool, default=False, help="merge the adapter into the base (save_pretrained)")
    opts = parser.parse_args(args)
    cli = build_cli(["--config", opts.config], run=False)
    method: BankMethod = cli.model
    method.configure_model()
    checkpoint = read_checkpoint(Path(opts.ckpt_path))
    method.on_load_checkpoint(checkpoint)
    method.load_state_dict(checkpoint["state_dict"], strict=False)
    print(method.export(opts.out, merged=opts.merged))


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "best-of-n":
        from lit_rlhf.methods.best_of_n import main as best_of_n_main

        best_of_n_main(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
