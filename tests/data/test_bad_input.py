"""Every kind of bad input, one row of a table each: the error names the file, the line (or row) and
the field, with a key phrase of the problem; with ``on_invalid="skip"`` exactly the bad rows go and
the count is logged. Then the impossible configs, which fail before any weights load.

A data case writes a file (or a folder) holding good rows and one bad thing, and asserts:

- ``on_invalid="error"``: one ``DataError`` whose message has ``{file}{at}`` (``:3`` for a JSONL or
  CSV line, ``: row 3`` for a JSON array or Parquet row), ``field '{field}'`` (unless the problem is
  the whole line) and ``phrase``;
- ``on_invalid="skip"``: the good rows are kept, and the warning says how many were skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lit_rlhf.data import DataError, PreferenceDataModule, PromptDataModule, SFTDataModule, UnpairedDataModule

MODULES = {"prompt": PromptDataModule, "preference": PreferenceDataModule, "unpaired": UnpairedDataModule,
           "sft": SFTDataModule}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


PROMPT = {"prompt": "the class was"}
PROMPT_CHAT = {"prompt": [user("the class was")]}
PAIR = {"prompt": "the class was", "chosen": "good .", "rejected": "bad ."}
PAIR_CHAT = {"prompt": [user("the class was")], "chosen": [assistant("good .")], "rejected": [assistant("bad .")]}
UNPAIRED = {"prompt": "the class was", "completion": "good .", "label": True}
TEXT = {"text": "the class was good ."}
PROMPT_COMPLETION = {"prompt": "the class was", "completion": "good ."}
MESSAGES = {"messages": [user("the class was"), assistant("good .")]}


@dataclass
class Case:
    """One kind of bad input.

    ``rows``: JSONL rows (dicts dumped as JSON; str / bytes written as they are), or ``files``:
    ``{name: bytes}`` written into a folder that is the source. ``bad``: the file the error is in
    (the only file of ``rows``). ``at``: ``:N`` or ``: row N``. ``kept``: rows left with skip.
    ``problems``: errors reported for the bad row (one per bad field).
    """

    id: str
    fmt: str
    at: str
    field: str | None
    phrase: str
    kept: int
    rows: list = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    bad: str = "data.jsonl"
    kwargs: dict[str, Any] = field(default_factory=dict)
    problems: int = 1


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


CASES = [
    # -- prompt format ----------------------------------------------------------------------------
    Case("prompt/missing", "prompt", ":2", "prompt", "is missing", 1, [PROMPT, {"query": "the car was"}]),
    Case("prompt/null", "prompt", ":2", "prompt", "is missing", 1, [PROMPT, {"prompt": None}]),
    Case("prompt/wrong-type", "prompt", ":2", "prompt", "is a int; this dataset is plain text", 1,
         [PROMPT, {"prompt": 5}]),
    Case("prompt/empty", "prompt", ":2", "prompt", "is empty", 1, [PROMPT, {"prompt": ""}]),
    Case("prompt/whitespace-only", "prompt", ":2", "prompt", "is empty", 1, [PROMPT, {"prompt": " \t "}]),
    Case("prompt/over-max-length", "prompt", ":2", "prompt", "is 9 tokens, longer than max_length=6", 1,
         [PROMPT, {"prompt": "the class was very very very good ."}], kwargs={"max_length": 6}),
    Case("prompt/chat-ends-with-assistant", "prompt", ":2", "prompt[1].role", "is 'assistant', the last message", 1,
         [PROMPT_CHAT, {"prompt": [user("the class was"), assistant("good .")]}]),
    Case("prompt/chat-system-not-first", "prompt", ":2", "prompt[1].role", "is 'system' at position 1", 1,
         [PROMPT_CHAT, {"prompt": [user("hi"), system("be kind"), user("the class was")]}]),
    Case("prompt/chat-message-not-object", "prompt", ":2", "prompt[0]", "each message must be an object", 1,
         [PROMPT_CHAT, {"prompt": ["the class was"]}]),
    Case("prompt/chat-missing-role", "prompt", ":2", "prompt[0].role", "unknown role None", 1,
         [PROMPT_CHAT, {"prompt": [{"content": "the class was"}]}]),
    Case("prompt/chat-empty-list", "prompt", ":2", "prompt", "is an empty list of messages", 1,
         [PROMPT_CHAT, {"prompt": []}]),
    Case("prompt/chat-only-empty-content", "prompt", ":2", "prompt", "has only empty messages", 1,
         [PROMPT_CHAT, {"prompt": [user("  ")]}]),
    Case("prompt/plain-row-in-chat-data", "prompt", ":2", "prompt", "is a str; this dataset is conversational", 1,
         [PROMPT_CHAT, PROMPT]),
    # -- preference format ------------------------------------------------------------------------
    Case("preference/prompt-row", "preference", ":2", "chosen", "looks like prompt data", 1,
         [PAIR, {"prompt": "the car was"}]),
    Case("preference/sft-row", "preference", ":2", "chosen", "looks like sft data", 1, [PAIR, TEXT]),
    Case("preference/unpaired-row", "preference", ":2", "chosen", "looks like unpaired data", 1, [PAIR, UNPAIRED]),
    Case("preference/missing-rejected", "preference", ":2", "rejected", "is missing", 1,
         [PAIR, {"prompt": "the car was", "chosen": "good ."}]),
    Case("preference/null-chosen", "preference", ":2", "chosen", "is missing", 1, [PAIR, {**PAIR, "chosen": None}]),
    Case("preference/chosen-equals-rejected", "preference", ":2", "chosen", "identical to 'rejected'", 1,
         [PAIR, {**PAIR, "rejected": "good ."}]),
    Case("preference/empty-chosen", "preference", ":2", "chosen", "is empty", 1, [PAIR, {**PAIR, "chosen": ""}]),
    Case("preference/whitespace-rejected", "preference", ":2", "rejected", "is empty", 1,
         [PAIR, {**PAIR, "rejected": "\n "}]),
    Case("preference/empty-prompt", "preference", ":2", "prompt", "is empty", 1, [PAIR, {**PAIR, "prompt": " "}]),
    Case("preference/chosen-wrong-type", "preference", ":2", "chosen", "must be a string", 1,
         [PAIR, {**PAIR, "chosen": 3.5}]),
    Case("preference/nan-literal", "preference", ":2", "rejected", "is a float", 1,
         [PAIR, b'{"prompt": "the car was", "chosen": "good .", "rejected": NaN}']),
    Case("preference/chat-unknown-role", "preference", ":2", "rejected[0].role", "unknown role 'bot'", 1,
         [PAIR_CHAT, {**PAIR_CHAT, "rejected": [{"role": "bot", "content": "bad ."}]}]),
    Case("preference/chat-content-not-string", "preference", ":2", "chosen[0].content",
         "is a dict; a message's content must be a string", 1,
         [PAIR_CHAT, {**PAIR_CHAT, "chosen": [{"role": "assistant", "content": {"text": "good ."}}]}]),
    Case("preference/chat-system-after-a-turn", "preference", ":2", "chosen[1].role",
         "is 'system' at position 1", 1,
         [PAIR_CHAT, {**PAIR_CHAT, "chosen": [assistant("good ."), system("be kind")]}]),
    Case("preference/chat-chosen-repeats-prompt", "preference", ":2", "chosen", "repeats the prompt's messages", 1,
         [PAIR_CHAT, {**PAIR_CHAT, "chosen": [user("the class was"), assistant("good .")]}]),
    Case("preference/chat-rejected-opens-with-system", "preference", ":2", "rejected[0].role",
         "is 'system' right after the prompt", 1,
         [PAIR_CHAT, {**PAIR_CHAT, "rejected": [system("be kind"), assistant("bad .")]}]),
    Case("preference/implicit-chat-nothing-shared", "preference", ":2", "chosen", "shares no leading message", 1,
         [PAIR_CHAT, {"chosen": [system("be kind"), user("hi"), assistant("good .")],
                      "rejected": [user("hi"), assistant("bad .")]}]),
    Case("preference/implicit-nothing-shared", "preference", ":2", "chosen", "shares no leading text", 1,
         [PAIR, {"chosen": "good .", "rejected": "bad ."}]),
    Case("preference/implicit-prefix", "preference", ":2", "chosen", "has no tokens after the prefix", 1,
         [PAIR, {"chosen": "the class was good .", "rejected": "the class was good . very"}]),
    Case("preference/over-max-length", "preference", ":2", "rejected", "is 12 tokens, longer than max_length=8", 1,
         [PAIR, {**PAIR, "rejected": "bad bad bad bad bad bad ."}], kwargs={"max_length": 8}),
    Case("preference/prompt-over-max-prompt-length", "preference", ":2", "prompt",
         "longer than max_prompt_length=4", 1, [PAIR, {**PAIR, "prompt": "the class was very bad"}],
         kwargs={"max_prompt_length": 4}),
    # -- unpaired format --------------------------------------------------------------------------
    Case("unpaired/label-string", "unpaired", ":2", "label", "is 'yes'; it must be a boolean", 1,
         [UNPAIRED, {**UNPAIRED, "label": "yes"}]),
    Case("unpaired/label-int", "unpaired", ":2", "label", "is 1; it must be a boolean", 1,
         [UNPAIRED, {**UNPAIRED, "label": 1}]),
    Case("unpaired/label-missing", "unpaired", ":2", "label", "is missing", 1,
         [UNPAIRED, {"prompt": "the car was", "completion": "bad ."}]),
    Case("unpaired/label-null", "unpaired", ":2", "label", "is missing", 1, [UNPAIRED, {**UNPAIRED, "label": None}]),
    Case("unpaired/empty-completion", "unpaired", ":2", "completion", "is empty", 1,
         [UNPAIRED, {**UNPAIRED, "completion": ""}]),
    Case("unpaired/completion-messages-in-plain-data", "unpaired", ":2", "completion", "is a list of messages", 1,
         [UNPAIRED, {**UNPAIRED, "completion": [assistant("good .")]}]),
    Case("unpaired/chat-completion-repeats-prompt-turn", "unpaired", ":2", "completion",
         "repeats the prompt's messages", 1,
         [{**UNPAIRED, **PROMPT_CHAT, "completion": [assistant("good .")]},
          {**UNPAIRED, "prompt": [system("be kind"), user("the class was")],
           "completion": [user("the class was"), assistant("good .")]}]),
    Case("unpaired/preference-row", "unpaired", ":2", "completion", "looks like preference data", 1,
         [UNPAIRED, PAIR]),
    # -- sft format -------------------------------------------------------------------------------
    Case("sft/prompt-row", "sft", ":2", "text", "looks like prompt data", 1, [TEXT, PROMPT]),
    Case("sft/preference-row", "sft", ":2", "text", "looks like preference data", 1, [TEXT, PAIR]),
    Case("sft/no-known-field", "sft", ":2", "text", "needs 'text', 'messages', or 'prompt' and 'completion'", 1,
         [TEXT, {"body": "the class was good ."}]),
    Case("sft/empty-text", "sft", ":2", "text", "is empty", 1, [TEXT, {"text": ""}]),
    Case("sft/text-not-string", "sft", ":2", "text", "is a list of messages; this dataset is plain text", 1,
         [TEXT, {"text": ["the class was good ."]}]),
    Case("sft/messages-in-plain-data", "sft", ":2", "messages", "is present but this dataset is plain text", 1,
         [TEXT, MESSAGES]),
    Case("sft/text-in-chat-data", "sft", ":2", "text", "is present but this dataset is conversational", 1,
         [MESSAGES, TEXT]),
    Case("sft/empty-completion", "sft", ":2", "completion", "is empty", 1,
         [PROMPT_COMPLETION, {**PROMPT_COMPLETION, "completion": "   "}]),
    Case("sft/messages-end-with-user", "sft", ":2", "messages", "must end with a non-empty assistant message", 1,
         [MESSAGES, {"messages": [user("the class was")]}]),
    Case("sft/messages-system-not-first", "sft", ":2", "messages[1].role", "is 'system' at position 1", 1,
         [MESSAGES, {"messages": [user("hi"), system("be kind"), assistant("good .")]}]),
    Case("sft/chat-completion-repeats-prompt", "sft", ":2", "completion", "repeats the prompt's messages", 1,
         [MESSAGES, {"prompt": [user("the class was")], "completion": [user("the class was"), assistant("good .")]}]),
    Case("sft/messages-empty-list", "sft", ":2", "messages", "is an empty list of messages", 1,
         [MESSAGES, {"messages": []}]),
    # -- files and lines --------------------------------------------------------------------------
    Case("file/undecodable-bytes", "preference", ":2", "chosen", "not valid UTF-8", 1,
         [PAIR, b'{"prompt": "the car was", "chosen": "good \xff\xfe .", "rejected": "bad ."}']),
    Case("file/truncated-json", "preference", ":3", None, "line is not valid JSON", 2,
         [PAIR, PAIR, b'{"prompt": "the car was", "chosen": "go']),
    Case("file/json-array-line", "prompt", ":2", None, "is a list; each row must be an object", 1,
         [PROMPT, b'[{"prompt": "the car was"}]']),
    Case("file/json-string-line", "prompt", ":2", None, "is a str; each row must be an object", 1,
         [PROMPT, b'"the car was"']),
    Case("file/empty-file-in-folder", "sft", ":1", None, "the file holds no rows", 1,
         files={"a.jsonl": jsonl(TEXT), "b.jsonl": b""}, bad="b.jsonl"),
    Case("file/blank-lines-only", "sft", ":1", None, "the file holds no rows", 1,
         files={"a.jsonl": jsonl(TEXT), "b.jsonl": b"\n  \n\n"}, bad="b.jsonl"),
    Case("file/json-array-non-object", "prompt", ": row 2", None, "is a int; each row must be an object", 1,
         files={"p.json": json.dumps([PROMPT, 5]).encode()}, bad="p.json"),
    Case("file/csv-missing-column", "preference", ":2", "rejected", "is missing", 0,
         files={"p.csv": b"prompt,chosen\nthe class was,good .\n"}, bad="p.csv"),
    Case("file/csv-extra-cells", "unpaired", ":3", None, "has 4 cells but the header has 3 columns", 1,
         files={"u.csv": b"prompt,completion,label\nthe class was,good .,true\nthe car was,bad, sad .,false\n"},
         bad="u.csv"),
    Case("file/csv-undecodable-bytes", "unpaired", ":3", "completion", "not valid UTF-8", 1,
         files={"u.csv": b"prompt,completion,label\nthe class was,good .,true\nthe car was,bad \xc3(.,false\n"},
         bad="u.csv"),
    Case("file/csv-label-not-boolean", "unpaired", ":2", "label", "is 'maybe'", 1,
         files={"u.csv": b"prompt,completion,label\nthe car was,bad .,maybe\nthe class was,good .,1\n"}, bad="u.csv"),
    Case("file/folder-of-mixed-formats", "preference", ":1", "chosen", "looks like sft data", 1,
         files={"a.jsonl": jsonl(PAIR), "b.jsonl": jsonl(TEXT)}, bad="b.jsonl"),
    Case("file/folder-of-plain-and-chat", "preference", ":1", "prompt", "is a list of messages; this dataset is "
         "plain text (plain text as detected from the first row", 1,
         files={"a.jsonl": jsonl(PAIR), "b.jsonl": jsonl(PAIR_CHAT)}, bad="b.jsonl", problems=3),
]


def _write(case: Case, tmp_path: Path) -> tuple[str, Path]:
    """The source to give the DataModule, and the file the error must name."""
    if case.rows:
        path = tmp_path / case.bad
        path.write_bytes(jsonl(*case.rows))
        return str(path), path
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in case.files.items():
        (folder / name).write_bytes(content)
    source = folder if len(case.files) > 1 else folder / case.bad
    return str(source), folder / case.bad


def test_the_table_covers_at_least_forty_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert {c.fmt for c in CASES} == set(MODULES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_by_file_line_and_field(case, tmp_path, toy_tokenizer):
    source, bad_file = _write(case, tmp_path)
    with pytest.raises(DataError) as info:
        MODULES[case.fmt](train=source, tokenizer=toy_tokenizer, **case.kwargs).prepare()
    message = str(info.value)
    assert f"{bad_file}{case.at}: " in message, message
    if case.field is not None:
        assert f"field '{case.field}'" in message, message
    assert case.phrase in message, message
    assert f"{case.problems} problem(s)" in message, message  # nothing reported twice


@pytest.mark.parametrize("case", [c for c in CASES if c.kept], ids=[c.id for c in CASES if c.kept])
def test_skip_keeps_the_good_rows_and_counts_the_bad(case, tmp_path, toy_tokenizer, caplog):
    source, bad_file = _write(case, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data"):
        module = MODULES[case.fmt](train=source, tokenizer=toy_tokenizer, on_invalid="skip", **case.kwargs).prepare()
    assert module.num_train_rows == case.kept
    assert "skipped 1 invalid row(s)" in caplog.text and f"{bad_file}{case.at}" in caplog.text


def test_a_file_with_no_good_row_is_an_error_even_with_skip(tmp_path, toy_tokenizer):
    (case,) = [c for c in CASES if c.id == "file/csv-missing-column"]
    source, _ = _write(case, tmp_path)
    with pytest.raises(DataError, match="no usable training rows"):
        PreferenceDataModule(train=source, tokenizer=toy_tokenizer, on_invalid="skip").prepare()


# -- impossible configs: each fails before any weights are read ------------------------------------

TOY_FINGERPRINT = {"model_type": "llama", "vocab_size": 65, "hidden_size": 64, "num_hidden_layers": 2}


@pytest.fixture
def no_weights(monkeypatch):
    """Every way lit_rlhf reads weights raises: a config case that reaches one fails the test."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    def loaded(*args, **kwargs):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr("lit_rlhf.models.bank.load_file", loaded)
    monkeypatch.setattr("torch.load", loaded)


def fake_adapter(path: Path, *, fingerprint: dict | None = None, weights: str = "adapter_model.safetensors") -> str:
    """A saved-adapter directory whose weights file is never read (it holds no tensors)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (path / "lit_rlhf.json").write_text(json.dumps({"base": fingerprint or TOY_FINGERPRINT, "head": "score"}))
    (path / weights).write_bytes(b"never read")
    return str(path)


def pickled_base(path: Path) -> str:
    """The toy base's config and tokenizer, with its weights as a pickle only."""
    import shutil

    shutil.copytree("assets/toy/base", path, ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "pytorch_model.bin").write_bytes(b"never read")
    return str(path)


def reward_adapter_config(tmp_path: Path, adapter: str) -> str:
    """A second config putting a reward adapter from ``adapter`` on configs/ppo.yaml's bank."""
    tmp_path.mkdir()
    override = tmp_path / "reward_adapter.yaml"
    override.write_text(
        "model:\n  init_args:\n    rewards:\n      - kind: adapter\n        adapter: reward\n"
        f"    bank:\n      adapters:\n        - name: policy\n        - name: value\n"
        f"        - name: reward\n          path: {adapter}\n"
    )
    return str(override)


@pytest.fixture
def saved(tmp_path) -> dict[str, str]:
    """Directories an impossible config may point at: no weights in them are ever read."""
    return {
        "rm7b": fake_adapter(tmp_path / "rm7b", fingerprint={**TOY_FINGERPRINT, "hidden_size": 4096,
                                                             "num_hidden_layers": 32}),
        "rm_bin": fake_adapter(tmp_path / "rm_bin", weights="adapter_model.bin"),
        "base_bin": pickled_base(tmp_path / "base_bin"),
    }


def _online(cls_name: str, *, rewards=None, adapters=(), train_mode="lora", **kwargs):
    from lit_rlhf import methods
    from lit_rlhf.models import AdapterSpec, BankSpec

    bank = BankSpec(model="assets/toy/base", train_mode=train_mode,
                    adapters=[AdapterSpec(**a) for a in adapters])
    rewards = rewards or [{"kind": "function", "function": "lit_rlhf.toy:reward"}]
    return getattr(methods, cls_name)(bank=bank, rewards=rewards, **kwargs)


def _reward_adapter_ppo(path: str):
    return _online("PPO", rewards=[{"kind": "adapter", "adapter": "reward"}],
                   adapters=[{"name": "reward", "path": path}])


def _dpo_on(model: str):
    from lit_rlhf.methods import DPO
    from lit_rlhf.models import BankSpec

    return DPO(bank=BankSpec(model=model))


# (id, what raises given the `saved` directories, the key phrase of the error). The method's
# ``check_config`` is what the CLI calls before the Trainer starts (see the CLI test below).
CONFIG_CASES = [
    ("rloo-one-sample", lambda d: _online("RLOO", num_samples_per_prompt=1), "RLOO needs num_samples_per_prompt >= 2"),
    ("grpo-one-sample", lambda d: _online("GRPO", num_samples_per_prompt=1), "GRPO needs num_samples_per_prompt >= 2"),
    ("ppo-critic-adapter-in-full-mode", lambda d: _online("PPO", train_mode="full", critic="adapter"),
     "critic 'adapter' needs LoRA adapters, and train_mode 'full' has none"),
    ("zero-mini-batches", lambda d: _online("GRPO", num_mini_batches=0), "num_mini_batches must be >= 1"),
    ("rollout-not-divisible", lambda d: _online("GRPO", num_mini_batches=3).check_rollout_split(8),
     "batch_size=8 prompts x num_samples_per_prompt=4 = 32 rows does not split into num_mini_batches=3"),
    ("reward-adapter-on-another-base", lambda d: _reward_adapter_ppo(d["rm7b"]).check_config(),
     "adapter 'reward' at {rm7b} was trained on a different base model"),
    ("reward-adapter-pickle-only", lambda d: _reward_adapter_ppo(d["rm_bin"]).check_config(),
     "adapter 'reward' at {rm_bin} has its weights only as pickle file(s) (adapter_model.bin)"),
    ("reward-adapter-not-declared", lambda d: _online("PPO", rewards=[{"kind": "adapter"}]).configure_model(),
     "the reward source 'adapter' reads adapter 'reward', so declare it with the path"),
    ("base-pickle-only", lambda d: _dpo_on(d["base_bin"]).check_config(),
     "model at {base_bin} has its weights only as pickle file(s) (pytorch_model.bin)"),
    ("reward-function-not-module-function",
     lambda d: _online("GRPO", rewards=[{"kind": "function", "function": "os.system"}]),
     "a reward function is named 'module:function'"),
    ("reward-function-not-a-name",
     lambda d: _online("GRPO", rewards=[{"kind": "function", "function": "lit_rlhf.toy:reward(1)"}]),
     "(dotted Python names)"),
    ("reward-nonfinite-unknown",
     lambda d: _online("GRPO", rewards=[{"kind": "function", "function": "lit_rlhf.toy:reward", "nonfinite": "zero"}]),
     "reward nonfinite must be 'error' or 'skip', got 'zero'"),
]


@pytest.mark.parametrize("build, phrase", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_impossible_config_fails_before_weights_load(build, phrase, saved, no_weights):
    with pytest.raises(ValueError) as info:
        build(saved)
    assert phrase.format(**saved) in str(info.value), str(info.value)


def test_rollout_split_is_checked_in_setup_before_configure_model(no_weights):
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.rollout import SamplingConfig

    import lightning.pytorch as pl

    method = _online("GRPO", num_mini_batches=3, sampling=SamplingConfig(max_new_tokens=4))
    data = PromptDataModule(train="assets/toy/data/prompt_train.jsonl", batch_size=8, max_length=32)
    fit = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="does not split into num_mini_batches=3"):
        fit.fit(method, datamodule=data)


@pytest.mark.parametrize("args, phrase", [
    (["--config", "configs/ppo.yaml", "--config", "{override}"], "adapter 'reward' at {rm7b} was trained on a different"),
    (["--config", "configs/grpo.yaml", "--model.init_args.num_mini_batches", "5"],
     "= 32 rows does not split into num_mini_batches=5"),
], ids=["reward-adapter-on-another-base", "rollout-not-divisible"])
def test_cli_checks_the_config_before_the_trainer_writes_anything(args, phrase, saved, tmp_path, no_weights,
                                                                  monkeypatch):
    from lit_rlhf.cli import main

    monkeypatch.setattr("sys.argv", ["lit-rlhf"])
    names = {**saved, "override": reward_adapter_config(tmp_path / "override", saved["rm7b"])}
    root = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        main(["fit", *(a.format(**names) for a in args), "--trainer.default_root_dir", str(root)])
    assert phrase.format(**names) in str(info.value), str(info.value)
    assert not root.exists(), sorted(root.rglob("*"))  # no log directory, event file or checkpoint


def test_full_mode_bank_checks_come_before_weights(tmp_path, no_weights):
    from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec

    with pytest.raises(ValueError, match="'full' cannot train a quantized base"):
        AdapterBank(BankSpec(train_mode="full", quantization="4bit"))
    with pytest.raises(ValueError, match=r"adapter\(s\) \['policy'\] cannot be loaded from a path"):
        AdapterBank(BankSpec(train_mode="full", adapters=[AdapterSpec("policy", path=fake_adapter(tmp_path / "a"))]))
    with pytest.raises(ValueError, match="one trainable role"):
        AdapterBank(BankSpec(train_mode="full"), require=[AdapterSpec("policy"), AdapterSpec("value", head="value")])


@pytest.mark.parametrize("kwargs, phrase", [
    ({"on_invalid": "drop"}, "on_invalid must be 'error' or 'skip'"),
    ({"truncation": "left"}, "truncation must be 'error' or 'truncate'"),
    ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
])
def test_impossible_data_settings_fail_at_construction(kwargs, phrase):
    with pytest.raises(ValueError) as info:
        PreferenceDataModule(train="assets/toy/data/preference_train.jsonl", **kwargs)
    assert phrase in str(info.value)
