"""``lit-rlhf``: one command for a run and everything around it.

    lit-rlhf fit --config configs/dpo.yaml [--model.init_args.beta 0.2 ...]
    lit-rlhf evaluate runs/dpo
    lit-rlhf export --config configs/dpo.yaml --ckpt_path runs/.../last.ckpt --out exported/ [--merged true]
    lit-rlhf best-of-n --config configs/best_of_n.yaml --out data.jsonl --format preference

``fit``, ``validate`` and ``test`` are LightningCLI's; the other commands go through the small
dispatcher in ``main`` beside it. Data, config and file errors print one message and exit 1
(``--debug`` or ``LIT_RLHF_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os

# libgomp's default OpenMP wait policy spins at every barrier; the toy models' tiny ops hit thousands
# of barriers per step, and on a small machine shared with other processes a spinning thread waits
# for a descheduled peer: fits ran 4-10x slower than with one thread. Passive waiting keeps the
# intra-op threads without the spinning. libgomp reads this once, when torch loads it, so it is set
# here, before any import of torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import difflib  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

#: Every subcommand: (one line of help, "module:function" for those beside LightningCLI).
COMMANDS: dict[str, tuple[str, str | None]] = {
    "fit": ("train a method on its data (LightningCLI: --config configs/<method>.yaml)", None),
    "validate": ("run a method's validation loop on a checkpoint (LightningCLI)", None),
    "test": ("run a method's test loop on a checkpoint (LightningCLI)", None),
    "export": ("write a checkpoint's adapter (PEFT) or merged model, with a model card", "lit_rlhf.cli:export_main"),
    "best-of-n": ("write a dataset (sft or preference JSONL) from the best/worst of n samples",
                  "lit_rlhf.cli:best_of_n_main"),
    "generate": ("completions of prompts (a file or --prompt) as JSONL", "lit_rlhf.inference:generate_main"),
    "chat": ("talk to a policy in the terminal (chat template, history)", "lit_rlhf.inference:chat_main"),
    "evaluate": ("a policy against its reference on held-out prompts: reward win rate, KL, length",
                 "lit_rlhf.evaluate:main"),
    "report": ("PNG plots and a markdown summary of a run from its logs", "lit_rlhf.report:main"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")
#: Where the options of a config's method and data are (``--config X --help`` lists the Trainer's only).
METHOD_HELP = ("A method's options, with their docs: --model.help DPO (or SFT, RewardModeling, PPO, RLOO, GRPO, "
               "OnlineDPO, BestOfN, SimPO, CPO, ORPO, KTO, GKD), the base model's and LoRA's under its --model.bank; "
               "its data's: --data.help PreferenceDataModule. Any of them overrides the config: "
               "--model.init_args.beta 0.2, --model.init_args.bank.lora.r 16.")


class ConfigError(Exception):
    """A bad command line or config, as jsonargparse reported it; the message is made readable by ``explain``.

    ``options`` are the keys the reporting parser accepts (for "did you mean").
    """

    def __init__(self, message: str, options: list[str] | None = None):
        super().__init__(message)
        self.options = options or []


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: lit-rlhf COMMAND [options]   (lit-rlhf COMMAND --help for a command's options)", "",
             "Align language models on PyTorch Lightning: one base model, many LoRA adapters.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    lines += ["", "A method's options: lit-rlhf fit --model.help DPO (any method class; --data.help for a DataModule).",
              "--debug (or LIT_RLHF_DEBUG=1) shows tracebacks for data, config and file errors."]
    return "\n".join(lines)


# -- LightningCLI ------------------------------------------------------------------------------------


def _option_keys(parser) -> list[str]:
    """Every key ``parser`` and its subcommand parsers accept (``trainer.max_epochs``, ...)."""
    keys = []
    for action in parser._actions:
        keys.append(action.dest)
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            keys += _option_keys(sub)
    return keys


def _cli_classes():
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_info
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from lit_rlhf.errors import InvalidArgument, SourceNotFound
    from lit_rlhf.methods.base import BankMethod
    from lit_rlhf.methods.checkpoints import find_last_checkpoint, finished_message

    class Parser(LightningArgumentParser):
        """The parsers of ``lit-rlhf`` and its subcommands raise their final error instead of
        printing the whole usage (jsonargparse turns ``exit_on_error`` off while it tries alternatives,
        and nested parsers are not this class, so only the final, user-facing error lands here)."""

        def error(self, message: str, ex: Exception | None = None):
            if self.exit_on_error:
                raise ConfigError(message, _option_keys(self)) from ex
            return super().error(message, ex)

    class LitRLHFCLI(LightningCLI):
        """LightningCLI over every method and DataModule, validating the data before the Trainer runs."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: keys for name, keys in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

        def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            if not add_subcommands:
                # A run built without a subcommand (export, best-of-n, tests) reads the config a fit saved beside
                # its logs, or printed: it also holds fit's own keys. Those commands name their checkpoint
                # themselves, so a config's (where that run resumed from) plays no part.
                for key in ("ckpt_path", "weights_only"):
                    self.parser.add_argument(f"--{key}", default=None, help="fit's own key, not used here")

        def parse_arguments(self, parser, args) -> None:
            # lit-rlhf always passes the arguments explicitly (from sys.argv or a caller), so
            # LightningCLI's warning about `args` beside a non-empty sys.argv does not apply.
            self.config = parser.parse_args(args)
            # `--ckpt_path last` names the newest last.ckpt of any version of this run, resolved before
            # LightningCLI reads the checkpoint's hyperparameters (which it does for a file path only).
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand or "", None)
            if config is not None and config.get("ckpt_path") == "last":
                root = config["trainer"].get("default_root_dir") or "."
                found = find_last_checkpoint(root)
                if found is None and subcommand != "fit":  # evaluating the untrained start is not what was asked
                    raise ConfigError(f"--ckpt_path last: no last*.ckpt under {root} (trainer.default_root_dir) "
                                      f"to {subcommand}")
                print(f"--ckpt_path last: {found or f'no last*.ckpt under {root}, starting from scratch'}",
                      file=sys.stderr)
                config["ckpt_path"] = str(found) if found else None
            elif config is not None and subcommand != "fit" and not config.get("ckpt_path"):
                print(f"no --ckpt_path: {subcommand} runs the untrained starting policy", file=sys.stderr)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI replaces the config's model with the hyperparameters saved in the checkpoint:
            # `--model.init_args.beta 0.5`, a moved `bank.model`, even another method's config were
            # silently swapped for the checkpoint's run. Here the config is the run: the checkpoint must
            # be of its method, and where the saved arguments differ the config's are used, and listed.
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand) if subcommand else None
            ckpt_path = config.get("ckpt_path") if config is not None else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            if config.get("model") is None:  # no method in the config: the checkpoint's, as LightningCLI does
                super()._parse_ckpt_path()
                return
            differences = checkpoint_differences(ckpt_path, self.parser, self.config)
            if differences:
                rank_zero_info(f"--ckpt_path {ckpt_path}: the config differs from the checkpoint's run; the config's "
                               "values are used:\n" + "\n".join(f"  {line}" for line in differences))

        def instantiate_classes(self) -> None:
            # A constructor that refuses a value names its argument (InvalidArgument): say which config key
            # set it. jsonargparse reports it inside its Union error, chained as the cause.
            try:
                super().instantiate_classes()
            except ValueError as error:
                invalid = _cause_of_kind(error, InvalidArgument)
                if invalid is None:
                    raise
                raise ConfigError(f"config key '{self._config_key(invalid.argument)}': {invalid}") from invalid

        def _config_key(self, argument: str) -> str:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            for section in ("model", "data"):
                init_args = config.get(section, {}).get("init_args") or {}
                if argument in init_args:
                    return f"{section}.init_args.{argument}"
            return argument

        def _prepare_data(self) -> None:
            # The model's config files and every row are checked here, so a bad config or bad data fails
            # before any weights load and before the Trainer creates its log directory.
            self.model.check_config()
            prepare = getattr(self.datamodule, "prepare", None)
            if prepare is not None:
                try:
                    prepare(self.model.tokenizer)
                except SourceNotFound as missing:
                    raise ConfigError(f"config key '{self._config_key(missing.argument)}': {missing}") from missing
            check_split = getattr(self.model, "check_rollout_split", None)
            if check_split is not None and getattr(self.datamodule, "batch_size", None) is not None:
                check_split(self.datamodule.batch_size)

        def _read_checkpoints_safely(self) -> None:
            # Lightning hands weights_only=None to torch.load, whose default was False before torch 2.6
            # (and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes it so again); lit_rlhf checkpoints need no pickles.
            arguments = self.config_init[self.subcommand]
            if arguments.get("weights_only") is None:
                arguments["weights_only"] = True

        def fit(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
            """``Trainer.fit``, unless the checkpoint already reached the run's limits (then it says so)."""
            if ckpt_path is not None:
                message = finished_message(ckpt_path, self.trainer.max_steps, self.trainer.max_epochs)
                if message is not None:
                    print(message, file=sys.stderr)
                    return
            try:
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
            except BaseException:
                self._remove_run_that_trained_nothing()
                raise
            # Beside the report and export lines of the callbacks: where this run continues from.
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
            if last:
                rank_zero_info(f"last checkpoint -> {last} (continue: --ckpt_path last)")

        def _remove_run_that_trained_nothing(self) -> None:
            # A fit that fails before its first optimizer step (a reward function that raises, say) has
            # written only its config and an empty event file: remove them rather than leave a
            # half-made version directory. A run that trained keeps its logs and checkpoints.
            trainer = self.trainer
            log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
            if trainer.global_step > 0 or not trainer.is_global_zero or log_dir is None or not Path(log_dir).is_dir():
                return
            if not any(Path(log_dir).rglob("*.ckpt")):
                shutil.rmtree(log_dir, ignore_errors=True)

        def before_fit(self) -> None:
            self._read_checkpoints_safely()
            self._prepare_data()

        def before_validate(self) -> None:
            self._read_checkpoints_safely()
            self._prepare_data()

        def before_test(self) -> None:
            # Lightning would fail inside the loop, with a traceback, on a method or data without a test split.
            if not is_overridden("test_step", self.model):
                raise ConfigError(f"{type(self.model).__name__} has no test loop: its validation samples and scores "
                                  "held-out prompts (lit-rlhf validate), as lit-rlhf evaluate does on an export")
            if getattr(self.datamodule, "test", None) is None:
                raise ConfigError("lit-rlhf test runs on the test split: set data.init_args.test (a file in the "
                                  "format of train and val)")
            self._read_checkpoints_safely()
            self._prepare_data()

    return LitRLHFCLI, Parser, BankMethod, LightningDataModule


def _cause_of_kind(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``error`` or the first exception of ``kind`` in its chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def build_cli(args: list[str], *, run: bool = True):
    """The LightningCLI of ``lit-rlhf fit|validate|test`` (``run=False``: parse and build only)."""
    cli_class, parser_class, method, datamodule = _cli_classes()
    return cli_class(
        method,
        datamodule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_class=parser_class,
        parser_kwargs={"prog": "lit-rlhf", **{name: {"description": f"{COMMANDS[name][0]}. {METHOD_HELP}"}
                                              for name in LIGHTNING_COMMANDS}},
        args=args,
        run=run,
    )


# -- commands that read a run: its config through the parser of `fit`, and a checkpoint ----------------


def _import_class(class_path: str) -> type | None:
    """The class ``module.Name`` names, or ``None`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_same_method(ckpt_path: str | Path, checkpoint: dict, method_class: str | type) -> None:
    """Refuse a checkpoint of another method than the config's (its weights would load, partly, into
    the wrong run). LightningCLI saves the class in the hyperparameters; a checkpoint without it passes."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    wanted = _import_class(method_class) if isinstance(method_class, str) else method_class
    if saved is None or _import_class(saved) is wanted:
        return
    name = getattr(wanted, "__name__", method_class)
    raise ConfigError(f"checkpoint {ckpt_path} (--ckpt_path) is of a {saved.rpartition('.')[2]} run, but the config's "
                      f"model is {name}: pass the config that run was trained with (config.yaml in its log directory); "
                      "to start a new method from a run's policy, load its exported adapter (bank.adapters: path)")


def checkpoint_differences(ckpt_path: str, parser, config) -> list[str]:
    """``model.init_args.KEY: SAVED in the checkpoint, NOW in the config`` for each argument of the config's
    method that differs from the hyperparameters saved in the checkpoint (read as LightningCLI reads them)."""
    import torch

    subcommand = config["subcommand"]
    model = config[subcommand]["model"]
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    check_same_method(ckpt_path, checkpoint, model["class_path"])
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved.pop("_instantiator", None)
    saved_class = saved.pop("_class_path", None)
    if saved_class is None or not saved:
        return []
    try:
        as_saved = parser.parse_object({subcommand: {"model": {"class_path": saved_class, "dict_kwargs": saved}}},
                                       copy.deepcopy(config))[subcommand]["model"]
    except (ConfigError, SystemExit):  # arguments of an older version of the method: nothing to compare
        return []
    now, then = dict(model.items()), dict(as_saved.items())
    return [f"model.{key}: {then.get(key)!r} in the checkpoint, {now.get(key)!r} in the config"
            for key in sorted(set(now) | set(then)) if now.get(key) != then.get(key)]


def load_checkpoint(method, ckpt_path: str | Path) -> None:
    """Build ``method``'s bank and load a checkpoint of its run into it: the trained tensors and the
    method's own state (``on_load_checkpoint``: KL coefficient, reward statistics, ...). The file is
    read with ``weights_only=True`` (``read_checkpoint``)."""
    from lit_rlhf.methods.base import read_checkpoint

    checkpoint = read_checkpoint(ckpt_path)
    check_same_method(ckpt_path, checkpoint, type(method))
    method.configure_model()
    method.on_load_checkpoint(checkpoint)
    # A LoRA run's checkpoint holds only the trainable tensors: the frozen base is not in it.
    method.load_state_dict(checkpoint["state_dict"], strict=False)


def checkpoint_arg(text: str) -> str:
    """argparse ``type`` of ``--ckpt_path``: a checkpoint file, a complete sharded checkpoint directory, or
    ``last``; a run directory names the checkpoints under it."""
    import argparse

    from lit_rlhf.methods.checkpoints import is_complete_checkpoint

    if text == "last" or is_complete_checkpoint(text):
        return text
    below = sorted(Path(text).rglob("*.ckpt"))[:3] if Path(text).is_dir() else []
    hint = f" (checkpoints under it: {', '.join(map(str, below))})" if below else ""
    raise argparse.ArgumentTypeError(f"{text}: not a checkpoint file or sharded checkpoint directory{hint}")


def resolve_last(ckpt_path: str, root: str, parser) -> str:
    """``ckpt_path``, or for ``last`` the newest last*.ckpt under the config's ``trainer.default_root_dir``."""
    from lit_rlhf.methods.checkpoints import find_last_checkpoint

    if ckpt_path != "last":
        return ckpt_path
    found = find_last_checkpoint(root)
    if found is None:
        parser.error(f"--ckpt_path last: no last*.ckpt under {root} (the config's trainer.default_root_dir)")
    return str(found)


def export_main(args: list[str]) -> None:
    """Export the adapter (PEFT format) or the merged model of a checkpoint, with a model card."""
    import argparse

    from lit_rlhf.inference import parse_bool
    from lit_rlhf.methods.export import write_model_card

    parser = argparse.ArgumentParser(prog="lit-rlhf export", description=export_main.__doc__)
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--ckpt_path", required=True, type=checkpoint_arg,
                        help="a checkpoint written by that run (file, or FSDP directory); last: the newest last.ckpt "
                             "under the config's trainer.default_root_dir")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--merged", type=parse_bool, default=False,
                        help="merge the adapter into the base (save_pretrained): true or false")
    opts = parser.parse_args(args)
    cli = build_cli(["--config", opts.config], run=False)
    method = cli.model
    ckpt_path = resolve_last(opts.ckpt_path, cli.trainer.default_root_dir, parser)
    load_checkpoint(method, ckpt_path)
    out = method.export(opts.out, merged=opts.merged)
    write_model_card(out, method, datamodule=cli.datamodule, merged=opts.merged or method.bank.full,
                     metrics=_last_logged(Path(ckpt_path).parent.parent), source=f"checkpoint `{ckpt_path}`")
    print(out)


def best_of_n_main(args: list[str]) -> None:
    """Write a best-of-n dataset (sft or preference JSONL) from the prompts of a config's data."""
    import argparse

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lit_rlhf.methods import best_of_n
    from lit_rlhf.methods.online import OnlineMethod

    parser = argparse.ArgumentParser(prog="lit-rlhf best-of-n", description=best_of_n_main.__doc__)
    parser.add_argument("--config", required=True, help="a best-of-n (or any online method) YAML, e.g. configs/best_of_n.yaml")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--format", choices=best_of_n.FORMATS, default="sft")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="which prompts of the config's data")
    parser.add_argument("--n", type=int, default=None, help="responses per prompt (default: the config's num_samples_per_prompt)")
    parser.add_argument("--min_score", type=float, default=None, help="drop prompts whose best reward is below this")
    parser.add_argument("--with_scores", action="store_true", help="also write the rewards of the kept responses")
    parser.add_argument("--ckpt_path", default=None, type=checkpoint_arg,
                        help="sample from the policy of this checkpoint of the config's run (last: the newest)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed_everything")
    opts = parser.parse_args(args)

    cli = build_cli(["--config", opts.config], run=False)  # seeds from the config's seed_everything, as `fit` does
    method, data = cli.model, cli.datamodule
    if not isinstance(method, OnlineMethod):
        parser.error(f"{opts.config}: best-of-n samples from an online method's policy and rewards (BestOfN, PPO, "
                     f"RLOO, GRPO, ...); the config's model is {type(method).__name__}")
    if opts.seed is not None:
        pl.seed_everything(opts.seed)
    if opts.n is not None:
        method.num_samples_per_prompt = opts.n
    # Built before any sampling, with or without a checkpoint, so a seed gives the same samples either way.
    method.configure_model()
    if opts.ckpt_path:
        load_checkpoint(method, resolve_last(opts.ckpt_path, cli.trainer.default_root_dir, parser))
    data.prepare(method.tokenizer)
    examples = data.train_examples if opts.split == "train" else data.val_examples
    if not examples:
        parser.error(f"the config's data has no {opts.split} prompts")
    batches = DataLoader(examples, batch_size=data.batch_size, shuffle=False, collate_fn=data.collator)
    rows = best_of_n.iter_best_of_n(method, batches, format=opts.format, min_score=opts.min_score,
                                    with_scores=opts.with_scores)
    count = best_of_n.write_jsonl_atomic(rows, opts.out)
    print(f"{count} {opts.format} rows from {len(examples)} prompts x {method.num_samples_per_prompt} samples -> {opts.out}")


def _last_logged(log_dir: Path) -> dict[str, float] | None:
    """The last value of each scalar in a run's TensorBoard logs (a checkpoint lives in <log_dir>/checkpoints)."""
    from lit_rlhf.report import SKIP, read_scalars

    if not list(log_dir.glob("events.out.tfevents.*")):
        return None
    return {tag: points[-1][1] for tag, points in read_scalars(log_dir).items() if points and not SKIP.match(tag)}


# -- errors ----------------------------------------------------------------------------------------


def _accepted_options(class_path: str) -> list[str]:
    """The init options jsonargparse accepts for ``class_path`` (empty if it cannot be imported)."""
    from jsonargparse import ArgumentParser

    cls = _import_class(class_path)
    if cls is None:
        return []
    try:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "x")
    except Exception:  # a suggestion is a courtesy; never let it hide the real error
        return []
    return [a.dest.removeprefix("x.") for a in parser._actions
            if a.dest.startswith("x.") and not a.dest.endswith(".help")]


#: A TRL argument given as a method option, and the key that means the same here (a ``model.init_args``
#: key is offered only when the method has it: RLOO's β is TRL's ``beta`` but ``kl_coef`` here, PPO's both).
TRL_NAMES = {
    "num_generations": "model.init_args.num_samples_per_prompt",
    "num_ppo_epochs": "model.init_args.update_epochs",
    "num_iterations": "model.init_args.update_epochs",
    "max_completion_length": "model.init_args.sampling.max_new_tokens",
    "beta": "model.init_args.kl_coef",
    "kl_coef": "model.init_args.beta",
    "lr_scheduler_type": "model.init_args.lr_scheduler",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "max_grad_norm": "trainer.gradient_clip_val",
    "max_length": "data.init_args.max_length",
    "max_prompt_length": "data.init_args.max_prompt_length",
    "per_device_train_batch_size": "data.init_args.batch_size",
    "num_train_epochs": "trainer.max_epochs",
}


def _trl_hint(option: str, options: list[str]) -> str:
    """``; TRL's X is Y here`` when ``option`` is a TRL argument with another name here, else ``""``."""
    key = TRL_NAMES.get(option)
    if key is None or (key.startswith("model.init_args.") and key.removeprefix("model.init_args.").split(".")[0]
                       not in options):
        return ""
    return f"; TRL's {option} is {key} here"


def explain(message: str, options: list[str] = ()) -> str:
    """jsonargparse's nested error text as one line, with "did you mean" for an unknown option
    (``options``: the keys of the parser that reported it)."""
    # A field of a dataclass inside a class's arguments (bank.lora.r), from a file or the command line.
    nested = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message) or \
        re.search(r"unrecognized arguments: --([^\s=]+\.)([^\s=.]+)", message)
    classes = re.findall(r"class_path '([^']+)'", message)
    if nested and classes:
        option = ".".join(part.strip(".") for part in nested.groups())
        parent = ".init_args.".join(re.findall(r'Parser key "([^"]+)"', message))
        close = difflib.get_close_matches(option, _accepted_options(classes[-1]), n=1, cutoff=0.6)
        return f"config key '{parent}.{option}' does not exist" + (
            f"; did you mean '{parent}.{close[0]}'?" if close else "")
    rejected = re.search(r"does not accept option '([^']+)'", message) or \
        re.search(r"unrecognized arguments: --(\S+)", message)
    if rejected:
        close = difflib.get_close_matches(rejected.group(1), options, n=1, cutoff=0.6)
        return f"config key '{rejected.group(1)}' does not exist" + (f"; did you mean '{close[0]}'?" if close else "")
    unknown = re.findall(r"Option '([^']+)' is not accepted", message)
    given = re.findall(r"NestedArg\(key='([^']+)'", message)
    top = re.match(r'Parser key "([^"]+)"', message)
    if unknown and classes:
        key = f"{top.group(1)}.init_args.{given[-1] if given else unknown[-1]}" if top else unknown[-1]
        options = _accepted_options(classes[-1])
        close = difflib.get_close_matches(unknown[-1], options, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else (
            _trl_hint(unknown[-1], options) or (f"; options: {', '.join(options)}" if options else ""))
        return f"config key '{key}': {classes[-1]} has no option '{unknown[-1]}'{hint}"
    missing_config = re.match(r"""Parser key "config": File does not exist: '([^']+)'""", message)
    if missing_config:
        return f"--config {missing_config.group(1)}: no such file"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    expected = re.search(r"Expected a <class '([^']+)'>\. Got value: (.*)", message)
    if keys and expected:
        key = keys[0] + "".join(f".init_args.{k}" for k in keys[1:])
        return f"config key '{key}': expected a {expected.group(1)}, got {expected.group(2).strip()!r}"
    # Otherwise the innermost lines that say something (not the Union bookkeeping around them).
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
             "- Expected a <class 'NoneType'>")
    lines = [ln.strip().removeprefix("- ") for ln in message.splitlines()
             if ln.strip() and not any(n in ln for n in noise)]
    return " / ".join(dict.fromkeys(lines)) or message


def clean_message(error: BaseException) -> str | None:
    """The one-line message for a user error, or ``None`` for a bug (whose traceback should show)."""
    if isinstance(error, ConfigError):
        return explain(str(error), error.options)
    from lit_rlhf.data import DataError

    # lit_rlhf raises ValueError for a value it refuses (an impossible config, a bad argument), always
    # with the reason and the fix; a bug's traceback still shows with --debug.
    if isinstance(error, (DataError, OSError)):
        return str(error)
    if isinstance(error, ValueError):  # raised in a constructor, jsonargparse wraps it in its Union report
        return explain(str(error))
    return None


def key_location(key: str, argv: list[str]) -> str | None:
    """``file:line`` where a config key (``model.init_args.beta``) is set: in the last ``--config`` file of
    ``argv`` that sets it, as a later file overrides an earlier one; ``None`` when the command line sets it
    or no file does."""
    import yaml

    if any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in argv):
        return None
    files = [value for flag, value in zip(argv, argv[1:]) if flag in ("--config", "-c")]
    files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    found = None
    for path in files:
        try:
            node = yaml.compose(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        line = None
        for part in key.split("."):
            entry = next(((k, v) for k, v in node.value if k.value == part), None) \
                if isinstance(node, yaml.MappingNode) else None
            if entry is None:
                line = None
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        if line is not None:
            found = f"{path}:{line}"
    return found


def _with_location(message: str, argv: list[str]) -> str:
    """``message`` led by the file and line of the config key it names, when a config file set it."""
    named = re.match(r"config key '([^']+)'", message)
    where = key_location(named.group(1), argv) if named else None
    return f"{where}: {message}" if where else message


# -- the dispatcher --------------------------------------------------------------------------------


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown command '{command}'{hint} (lit-rlhf --help lists them)")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    _, target = COMMANDS[command]
    if target is None:
        build_cli([command, *rest])
        return
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(rest)


def main(args: list[str] | None = None) -> None:
    """Run one ``lit-rlhf`` command (``args`` defaults to ``sys.argv[1:]``); errors propagate, for
    Python callers and tests. The ``lit-rlhf`` script is :func:`console`."""
    from lit_rlhf import quiet

    quiet.install()
    dispatch(list(sys.argv[1:] if args is None else args))


def console(args: list[str] | None = None) -> None:
    """The ``lit-rlhf`` script: :func:`main`, with a data, config or file error printed as one line
    and exit status 1; ``--debug`` or ``LIT_RLHF_DEBUG=1`` lets the traceback through."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LIT_RLHF_DEBUG", "") not in ("", "0")
    try:
        main([a for a in argv if a != "--debug"])
    except Exception as error:
        message = clean_message(error)
        if debug or message is None:
            raise
        print(f"lit-rlhf: error: {_with_location(message, argv)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    # `python -m lit_rlhf.cli` runs this file as `__main__`, and the commands import `lit_rlhf.cli`: a second
    # copy, whose ConfigError the first copy's `console` would not know (a traceback instead of one line).
    from lit_rlhf.cli import console as single_console

    single_console()
