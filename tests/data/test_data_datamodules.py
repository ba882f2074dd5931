from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_rlhf.data import (
    DataError,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    UnpairedDataModule,
    epoch_sampler,
)
from lit_rlhf.data.datamodules import ExampleDataset, evaluation_batches

KEYS = {
    PromptDataModule: {"prompt_input_ids", "prompt_attention_mask", "prompts", "raw_prompts"},
    PreferenceDataModule: {"input_ids", "attention_mask", "completion_mask"},
    UnpairedDataModule: {"input_ids", "attention_mask", "completion_mask", "labels", "kl_input_ids",
                         "kl_attention_mask", "kl_completion_mask"},
    SFTDataModule: {"input_ids", "attention_mask", "completion_mask"},
}
FILES = {PromptDataModule: "prompt", PreferenceDataModule: "preference", UnpairedDataModule: "unpaired",
         SFTDataModule: "sft"}


def test_sampler_order_depends_only_on_seed_and_epoch():
    dataset = ExampleDataset(list(range(50)))

    def order(seed, epoch):
        sampler = epoch_sampler(dataset, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3)
    assert sorted(order(0, 3)) == list(range(50))
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 1)


class _Recorder(L.LightningModule):
    """A stand-in method: exposes `.tokenizer` and records the batches it sees."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch)
        return self.weight.sum() * 0 + self.weight.pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("module_cls", list(KEYS), ids=lambda c: c.__name__)
def test_setup_takes_tokenizer_from_lightning_module(module_cls, toy_tokenizer, toy_data, tmp_path):
    name = FILES[module_cls]
    data = module_cls(train=str(toy_data / f"{name}_train.jsonl"), val=str(toy_data / f"{name}_val.jsonl"),
                      batch_size=4)
    model = _Recorder(toy_tokenizer)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    assert data.num_train_rows > 0 and len(model.batches) == 2 and len(model.val_batches) == 1
    for batch in model.batches + model.val_batches:
        assert set(batch) == KEYS[module_cls]
    first = model.batches[0]
    rows = 8 if module_cls is PreferenceDataModule else 4
    tensor = first["prompt_input_ids"] if module_cls is PromptDataModule else first["input_ids"]
    assert tensor.shape[0] == rows


def test_packed_sft_batches(toy_tokenizer, toy_data):
    data = SFTDataModule(train=str(toy_data / "sft_val.jsonl"), tokenizer=toy_tokenizer, packing=True, max_length=32,
                         batch_size=8).prepare()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "position_ids", "completion_mask"} and batch["input_ids"].shape[1] <= 32


def test_conversational_files(tmp_path, toy_tokenizer, write_jsonl):
    rows = [{"prompt": [{"role": "user", "content": f"the {thing} was"}],
             "chosen": [{"role": "assistant", "content": "good ."}],
             "rejected": [{"role": "assistant", "content": "bad ."}]} for thing in ("class", "car", "team")]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = PreferenceDataModule(train=str(path), tokenizer=toy_tokenizer, batch_size=3).prepare()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (6, 8)
    assert toy_tokenizer.decode(batch["input_ids"][0]).startswith("<|user|> the")
    assert batch["completion_mask"].sum(1).tolist() == [3] * 6  # "good . </s>" and "bad . </s>"


def test_mixed_plain_and_conversational_rows_are_errors(tmp_path, toy_tokenizer, write_jsonl):
    rows = [{"prompt": "the class was"}, {"prompt": [{"role": "user", "content": "the car was"}]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt': is a list of messages; this dataset is plain "
                                        r"text \(plain text as detected from the first row"):
        PromptDataModule(train=str(path), tokenizer=toy_tokenizer).prepare()


def test_val_fraction_holds_out_a_seeded_split(toy_tokenizer, toy_data):
    def split(seed):
        data = PromptDataModule(train=str(toy_data / "prompt_train.jsonl"), val_fraction=0.25, split_seed=seed,
                                tokenizer=toy_tokenizer).prepare()
        return [e["prompt_text"] for e in data.train_examples], [e["prompt_text"] for e in data.val_examples]

    train, val = split(0)
    assert len(val) == 12 and len(train) == 36 and not set(train) & set(val)
    assert split(0) == (train, val) and split(1) != (train, val)


def test_prepare_is_idempotent(toy_tokenizer, toy_data, monkeypatch):
    import lit_rlhf.data.datamodules as datamodules

    calls = []
    load = datamodules.load_rows
    monkeypatch.setattr(datamodules, "load_rows", lambda *a, **k: calls.append(a) or load(*a, **k))
    data = PromptDataModule(train=str(toy_data / "prompt_val.jsonl"))
    data.prepare(toy_tokenizer)
    data.prepare(toy_tokenizer)
    data.setup("fit")  # no trainer, no tokenizer argument: reuses the prepared one
    assert len(calls) == 1 and data.num_train_rows == 12


def test_no_tokenizer_is_a_clear_error(toy_data):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptDataModule(train=str(toy_data / "prompt_val.jsonl")).setup("fit")


def test_state_dict_round_trip_warns_on_different_data(toy_tokenizer, toy_data, caplog):
    data = PromptDataModule(train=str(toy_data / "prompt_val.jsonl"), tokenizer=toy_tokenizer, seed=5).prepare()
    state = data.state_dict()
    assert state == {"seed": 5, "num_train_rows": 12}
    other = PromptDataModule(train=str(toy_data / "prompt_train.jsonl"), tokenizer=toy_tokenizer, seed=5).prepare()
    with caplog.at_level("WARNING", logger="lit_rlhf.data"):
        other.load_state_dict(state)
    assert "different data" in caplog.text


def test_trainer_epochs_follow_seed_and_epoch(toy_tokenizer, toy_data, tmp_path):
    data = PromptDataModule(train=str(toy_data / "prompt_val.jsonl"), batch_size=4, seed=3)  # no val: none run
    model = _Recorder(toy_tokenizer)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    seen = [p for batch in model.batches for p in batch["prompts"]]
    assert len(seen) == 24 and not model.val_batches
    expected = []
    for epoch in (0, 1):
        sampler = epoch_sampler(ExampleDataset(data.train_examples), seed=3)
        sampler.set_epoch(epoch)
        expected += [data.train_examples[i]["prompt_text"] for i in sampler]
    assert seen == expected and seen[:12] != seen[12:]


def test_kto_batches_never_hold_a_single_row(tmp_path, toy_tokenizer, write_jsonl):
    """KTO pairs each prompt with another row's completion: one row would be paired with itself."""
    with pytest.raises(ValueError, match=r"UnpairedDataModule: batch_size must be >= 2, got 1: KTO"):
        UnpairedDataModule(str(tmp_path / "unused.jsonl"), batch_size=1)
    rows = [{"prompt": f"the car {i} was", "completion": "good .", "label": i % 2 == 0} for i in range(7)]
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:5]), write_jsonl(tmp_path / "val.jsonl", rows)
    dm = UnpairedDataModule(str(train), val=str(val), batch_size=2).prepare(toy_tokenizer)
    # 5 rows in batches of 2 leave one: dropped (7 val rows likewise).
    assert [len(b["labels"]) for b in dm.train_dataloader()] == [2, 2]
    assert [len(b["labels"]) for b in dm.val_dataloader()] == [2, 2, 2]
    dm = UnpairedDataModule(str(val), batch_size=4).prepare(toy_tokenizer)
    assert [len(b["labels"]) for b in dm.train_dataloader()] == [4, 3]  # a remainder of 2 or more is kept
    with pytest.raises(ValueError, match="at least 2 rows"):
        dm.collator(dm.train_examples[:1])


@pytest.mark.parametrize("rows, batch_size, world, min_rows, sizes", [
    (96, 8, 1, 1, [8] * 12),  # one process: the batches in order, untouched
    (7, 3, 1, 2, [3, 3]),  # a last batch below min_rows is dropped
    (7, 3, 2, 1, [3, 2, 1, 1]),  # 3 batches for 2 ranks: the last two split into three
    (9, 3, 2, 2, [3, 2, 2, 2]),  # halving the last 3 would leave a batch of 1: the last two into three
    (8, 8, 2, 1, [4, 4]),
])
def test_evaluation_batches_give_every_rank_as_many_and_every_row_once(rows, batch_size, world, min_rows, sizes):
    batches = evaluation_batches(rows, batch_size, world, min_rows)
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == list(range(sum(sizes)))  # in order, none twice
    assert len(batches) % world == 0


def test_evaluation_batches_refuse_fewer_rows_than_the_ranks_need():
    with pytest.raises(ValueError, match="3 validation rows cannot give each of the 2 ranks as many batches of at "
                                         "least 2 row"):
        evaluation_batches(3, 2, world=2, min_rows=2)


def test_each_rank_validates_on_its_batches_of_the_one_process_order(toy_tokenizer, toy_data):
    shares = []
    for rank in (0, 1):
        rows = str(toy_data / "sft_val.jsonl")
        data = SFTDataModule(rows, val=rows, batch_size=9, max_length=64)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what the loaders read of it
        shares.append(list(data.prepare(toy_tokenizer).val_dataloader().sampler))
    one = evaluation_batches(96, 9, world=2)  # 10 batches of 9 and one of 6, split into two of 3
    assert len(one) == 12
    assert shares == [one[0::2], one[1::2]]
