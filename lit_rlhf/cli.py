"""``lit-rlhf``: LightningCLI for fit / validate / test, plus ``export`` beside it.

    lit-rlhf fit --config configs/dpo.yaml [--model.init_args.beta 0.2 ...]
    lit-rlhf export --config configs/dpo.yaml --ckpt_path runs/.../last.ckpt --out exported/ [--merged true]
    lit-rlhf best-of-n --config configs/best_of_n.yaml --out data.jsonl --format preference
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.methods.base import BankMethod, read_checkpoint


class LitRLHFCLI(LightningCLI):
    """LightningCLI over every method and DataModule, validating the data before the Trainer runs."""

    def _prepare_data(self) -> None:
        # The model's config files and every row are checked here, so a bad config or bad data fails
        # before any weights load and before the Trainer creates its log directory.
        self.model.check_config()
        prepare = getattr(self.datamodule, "prepare", None)
        if prepare is not None:
            prepare(self.model.tokenizer)
        check_split = getattr(self.model, "check_rollout_split", None)
        if check_split is not None and getattr(self.datamodule, "batch_size", None) is not None:
            check_split(self.datamodule.batch_size)

    def _read_checkpoints_safely(self) -> None:
        # Lightning hands weights_only=None to torch.load, whose default was False before torch 2.6
        # (and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes it so again); lit_rlhf checkpoints need no pickles.
        arguments = self.config_init[self.subcommand]
        if arguments.get("weights_only") is None:
            arguments["weights_only"] = True

    def before_fit(self) -> None:
        self._read_checkpoints_safely()
        self._prepare_data()

    def before_validate(self) -> None:
        self._read_checkpoints_safely()
        self._prepare_data()

    def before_test(self) -> None:
        self._read_checkpoints_safely()
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


def export_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="lit-rlhf export", description="Export the adapter or merged model of a checkpoint.")
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by that run")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--merged", type=bool, default=False, help="merge the adapter into the base (save_pretrained)")
    opts = parser.parse_args(args)
    cli = build_cli(["--config", opts.config], run=False)
    method: BankMethod = cli.model
    method.configure_model()
    checkpoint = read_checkpoint(opts.ckpt_path)
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
