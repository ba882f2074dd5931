"""Differential check of the offline methods against TRL 1.16: the same rows, weights and settings on
both sides, compared at each stage where a silent wrong-training bug could hide.

1. tokenization: prompt / completion ids and the tokens that carry loss, from TRL's own dataset
   preparation (each trainer's ``_prepare_dataset``) and ours (``build_examples``) on the same rows:
   plain text, conversational, implicit prompts, a chat template that writes BOS itself, over-long
   completions cut (the collated batches, where TRL truncates in its collators);
2. log-probs: per-sequence summed completion log-probs, ours (padding-free rows, LM head on completion
   positions only, fused head where the model allows) against TRL's fused LM head, on tiny random
   Llama, Qwen2, GPT-2 and Gemma 2 models (the toy tokenizer);
3. loss, logged metrics and gradients: TRL's own loss code (``DPOTrainer`` / ``KTOTrainer._compute_loss``,
   the experimental CPO / ORPO trainers' ``get_batch_loss_metrics``, ``RewardTrainer.compute_loss``,
   SFT's token-mean NLL) on the same batch and weights, reference log-probs precomputed (the same
   numbers on both sides).

``--lora`` instead trains LoRA adapters two AdamW steps on both sides (weight decay, clipping, constant
learning rate), through Lightning here and each TRL trainer's own ``train()`` there, from the same adapter
weights and the same ``LoraConfig`` (r 4, alpha 12, all linear layers, no dropout): DPO and KTO with a fresh
adapter (reference: the base with adapters off; DPO also on a 4-bit base, on Llama) and from a saved SFT adapter
(reference: its frozen copy, TRL's ``ref`` adapter, or log-probs precomputed from it; DPO also from one saved
with the LM head in ``modules_to_save``, on Llama), reward modelling (TRL: a sequence-classification model, ``task_type=SEQ_CLS``)
and SFT, on each model; on Llama also the rest of the DPO family (``lora_dpo_family``: every DPO loss type fresh, from
the SFT adapter and precomputed from it, RPO, TR-DPO, ``reference_free``, SimPO, CPO, CPO-SimPO, gradient
checkpointing); DPO and SFT on the tiny mixtures of experts (``MOE``). Columns: the trained tensors (the same names and starting values), each step's loss,
the first step's clipped gradients, the weights after both steps (tolerances: ``LORA_GRADIENTS_TOL``,
``WEIGHTS_TOL``).

A cell is ``agree`` (every difference <= 1e-5; gradients relative to their largest entry), or
``by design [n]`` with the note saying what differs and where it is documented; where a convention
can be applied to our numbers (TRL's token-mean NLL), the cell also shows the difference after
applying it, which must agree. Anything else prints ``DIFFERS`` and the script exits 1.

    pip install -e ".[bench]"                      # TRL, pinned; never a runtime dependency
    OMP_NUM_THREADS=1 python benchmarks/agree_with_trl_offline.py
    OMP_NUM_THREADS=1 python benchmarks/agree_with_trl_offline.py --lora
    OMP_NUM_THREADS=1 python benchmarks/agree_with_trl_offline.py --lora --only TR-DPO SimPO   # runs named so
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import types
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

TOL = 1e-5
ONLY: list[str] = []  # --only: run the LoRA rows whose name holds one of these words
PREFERENCE, UNPAIRED, SFT_DATA = (f"assets/toy/data/{name}_train.jsonl" for name in ("preference", "unpaired", "sft"))
COLUMNS = ("tokenization", "logps", "loss", "metrics", "gradients")
NOTES = {
    "join": "plain text: we join prompt and completion with one space unless either side has one; TRL "
            "concatenates (rows here give completions a leading space, so both read the same text; "
            "lit_rlhf/data/tokenize.py)",
    "rewards_norm": "ipo / sigmoid_norm: our implicit rewards use the length-normalised log-ratios the loss "
                    "compares; TRL logs the plain ones (losses.dpo_loss docstring, README loss table)",
    "nll_mean": "NLL of the chosen completion: we average each example's tokens, then the batch; TRL averages "
                "the batch's tokens (README loss table; losses.dpo_loss `sft`, losses.cpo_loss)",
    "orpo_nll": "ORPO's NLL: ours is the chosen completion's (the paper's L_SFT), per-example mean; TRL's "
                "covers prompt and completion tokens, batch token mean (README loss table)",
    "avg_logps": "logps/chosen, logps/rejected: we log summed log-probs for every method; TRL's CPO/ORPO "
                 "trainers log the length-averaged ones where the loss uses them (ipo, simpo, ORPO)",
    "last_turn": "SFT `messages` rows: the loss covers every assistant turn (completion-only, as TRL's "
                 "assistant_only_loss); TRL's completion_only_loss trains on every token of a `messages` row "
                 "(README Data; completion_only_loss: false matches TRL, checked)",
}

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


class Table:
    """Per (method, column): the largest difference seen and the note that excuses it, if any."""

    def __init__(self, columns: tuple[str, ...] = COLUMNS, notes: dict[str, str] = NOTES,
                 tolerances: dict[str, float] | None = None):
        self.columns, self.notes, self.tolerances = columns, notes, tolerances or {}
        self.cells: dict[tuple[str, str], list[tuple[float, str | None, float | None]]] = defaultdict(list)

    def add(self, method: str, column: str, delta: float, note: str | None = None, aligned: float | None = None):
        self.cells[method, column].append((float(delta), note, aligned))

    def cell(self, method: str, column: str) -> tuple[str, bool]:
        entries = self.cells.get((method, column))
        if not entries:
            return "-", True
        tol = self.tolerances.get(column, TOL)
        worst = max(delta for delta, _, _ in entries)
        if worst <= tol:
            return f"agree ({worst:.0e})", True
        notes = sorted({note for delta, note, _ in entries if delta > tol and note})
        unexcused = [d for d, note, aligned in entries
                     if d > tol and (note is None or (aligned is not None and aligned > tol))]
        if unexcused:
            return f"DIFFERS ({max(unexcused):.1e})", False
        aligned = [a for d, note, a in entries if d > tol and a is not None]
        tail = f", aligned {max(aligned):.0e}" if aligned else ""
        return f"by design [{','.join(str(list(self.notes).index(n) + 1) for n in notes)}]{tail}", True

    def print(self) -> bool:
        methods = list(dict.fromkeys(m for m, _ in self.cells))
        rows = [[m, *(self.cell(m, c)[0] for c in self.columns)] for m in methods]
        widths = [max(len(r[i]) for r in rows + [["method", *self.columns]]) for i in range(len(self.columns) + 1)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        print(line(["method", *self.columns]))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            print(line(r))
        print()
        for i, (key, text) in enumerate(self.notes.items(), start=1):
            print(f"[{i}] {text}")
        return all(self.cell(m, c)[1] for m in methods for c in self.columns)


def tokenization(table: Table, tokenizer) -> None:
    """Ours against each TRL trainer's ``_prepare_dataset`` on the same rows."""
    from datasets import Dataset
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    from lit_rlhf.data import SFTCollator
    from lit_rlhf.data.formats import Where
    from lit_rlhf.data.tokenize import build_examples

    with_bos = copy.deepcopy(tokenizer)
    with_bos.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    out = tempfile.mkdtemp()
    config = dict(output_dir=out, use_cpu=True, bf16=False, report_to=[], max_length=None)

    def ours(fmt, rows, tok, **limits):
        limits = {"max_length": None, **limits}
        examples, errors = build_examples(fmt, [(Where("rows", i + 1), r) for i, r in enumerate(rows)], tok, **limits)
        assert not errors, errors
        return examples

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    plain = [{"prompt": "the class was", "chosen": " really love so .", "rejected": " worst great ."},
             {"prompt": "honestly the team felt", "chosen": " bit fun .</s>", "rejected": " boring quite ."}]
    chat = [{"prompt": user("the class was"), "chosen": assistant("really love ."), "rejected": assistant("bad .")},
            {"prompt": [{"role": "system", "content": "be nice"}, *user("the team felt")],
             "chosen": assistant("bit fun ."), "rejected": assistant("boring .")}]
    implicit = [{"chosen": "the class was really love so .", "rejected": "the class was worst great ."}]
    implicit_chat = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat]
    # Our plain rows without the leading space: the join puts it back.
    unspaced = [{k: v if k == "prompt" else v.lstrip() for k, v in r.items()} for r in plain]

    dpo_args = DPOConfig(**config)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    for method in ("DPO family", "Reward"):
        for rows, trl_rows, tok, note in ((plain, plain, tokenizer, None), (unspaced, plain, tokenizer, "join"),
                                          (chat, chat, tokenizer, None), (chat, chat, with_bos, None),
                                          (implicit, implicit, tokenizer, None),
                                          (implicit_chat, implicit_chat, tokenizer, None)):
            if method == "DPO family":
                theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(trl_rows),
                                                     tok, dpo_args, "train")
                theirs = [[r[k] for k in keys] for r in theirs]
                mine = [[e[k] for k in keys] for e in ours("preference", rows, tok)]
            else:  # the reward model reads whole sequences
                theirs = RewardTrainer._prepare_dataset(None, Dataset.from_list(trl_rows), tok,
                                                        RewardConfig(**config), "train")
                theirs = [[r["chosen_ids"], r["rejected_ids"]] for r in theirs]
                mine = [[e["prompt_ids"] + e["chosen_ids"], e["prompt_ids"] + e["rejected_ids"]]
                        for e in ours("preference", rows, tok)]
            table.add(method, "tokenization", float(mine != theirs), note if mine == theirs else None)

    unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in plain + chat for side in ("chosen", "rejected")]
    kto_stub = types.SimpleNamespace(calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    for rows, tok in ((unpaired[:4], tokenizer), (unpaired[4:], tokenizer), (unpaired[4:], with_bos)):
        kto_stub._tokenizer = tok
        theirs = KTOTrainer._prepare_dataset(kto_stub, Dataset.from_list(rows), tok, KTOConfig(**config), "train")
        theirs = [[r["prompt_ids"], r["completion_ids"]] for r in theirs]
        mine = [[e["prompt_ids"], e["completion_ids"]] for e in ours("unpaired", rows, tok)]
        table.add("KTO", "tokenization", float(mine != theirs))

    sft_rows = [
        ([{"prompt": "the class was", "completion": " really love ."}, {"prompt": "", "completion": "bad ."}], None),
        ([{"text": "the class was really love ."}], None),
        ([{"prompt": user("the class was"), "completion": assistant("good .")}], None),
        ([{"messages": user("a") + assistant("good .") + user("b") + assistant("bad .")}], "last_turn"),
    ]
    for completion_only in (True, False):
        for rows, note in sft_rows:
            for tok in (tokenizer, with_bos):
                stub = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=completion_only)
                args = SFTConfig(**config, completion_only_loss=completion_only)
                theirs = SFTTrainer._prepare_dataset(stub, Dataset.from_list(rows), tok, args, False, None, "train")
                theirs = [[r["input_ids"], [int(t != -100) for t in r["labels"]]] for r in theirs]
                mine = [[e["prompt_ids"] + e["completion_ids"],
                         SFTCollator(0, completion_only)([e])["completion_mask"][0].tolist()]
                        for e in ours("sft", rows, tok)]
                table.add("SFT", "tokenization", float(mine != theirs),
                          note if completion_only and mine != theirs else None)
    # TRL's assistant_only_loss reads the assistant turns from {% generation %} markers: the toy template with
    # them around each turn's content and end (it renders the same text) gives the masks we find without them.
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}"
                            "{% generation %}{{ m['content'] }} </s>{% endgeneration %} {% else %}{{ m['content'] }} "
                            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    rows = [{"messages": user("a") + assistant("good .") + user("b") + assistant("bad .") + user("c")
             + assistant("fun .")}]
    assert marked.apply_chat_template(rows[0]["messages"], tokenize=False) == tokenizer.apply_chat_template(
        rows[0]["messages"], tokenize=False)
    stub = types.SimpleNamespace(_tokenizer=marked, chat_template=None, completion_only_loss=True)
    theirs = SFTTrainer._prepare_dataset(stub, Dataset.from_list(rows), marked,
                                         SFTConfig(**config, assistant_only_loss=True), False, None, "train")
    theirs = [[r["input_ids"], [int(t != -100) for t in r["labels"]]] for r in theirs]
    mine = [[e["prompt_ids"] + e["completion_ids"], SFTCollator(0)([e])["completion_mask"][0].tolist()]
            for e in ours("sft", rows, tokenizer)]
    table.add("SFT", "tokenization", float(mine != theirs))


class Sides:
    """One tiny model's weights on both sides: ours through a method, TRL's as a plain transformers model."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        torch.manual_seed(1)
        self.weights = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        for value in self.weights.values():  # off the saved model, so nothing is left at initialisation
            value.add_(torch.randn_like(value), alpha=0.02)

    def ours(self, cls, **kwargs):
        from lit_rlhf.models import BankSpec

        method = cls(bank=BankSpec(model=self.model_dir, train_mode="full"), **kwargs)
        method.configure_model()
        method.bank.model.load_state_dict(self.weights)
        method.eval()
        return method

    def trl(self, fused: bool = True, outputs=("log_probs",)):
        from transformers import AutoModelForCausalLM
        from trl.trainer.utils import add_fused_lm_head

        model = AutoModelForCausalLM.from_pretrained(self.model_dir)
        model.load_state_dict(self.weights)
        model.eval()
        if fused:
            add_fused_lm_head(model, outputs=outputs)
        return model


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_delta(ours_model, ours_loss, trl_model, trl_loss) -> float:
    ours_model.zero_grad()
    trl_model.zero_grad()
    ours_loss().backward()
    trl_loss().backward()
    mine, theirs = grads(ours_model), grads(trl_model)
    if set(mine) != set(theirs):
        return float("inf")
    scale = max(g.abs().max().item() for g in theirs.values())
    return max((mine[k] - theirs[k]).abs().max().item() for k in theirs) / scale


def token_mean_nll(method, batch: dict, rows: slice, whole_sequence: bool = False) -> float:
    """TRL's NLL convention on our log-probs: minus the sum over the batch's tokens / their count."""
    ids, attention = batch["input_ids"][rows], batch["attention_mask"][rows]
    mask = attention if whole_sequence else batch["completion_mask"][rows]
    with torch.no_grad():
        per_token, kept, _ = method.completion_token_logps(ids, attention, mask)
    return (-per_token.sum() / kept.sum()).item()


def truncation(table: Table, tokenizer) -> None:
    """Over-long completions cut on the right, prompts intact (TRL's default ``keep_start``, which ours matches
    while the prompt fits): the collated batches of DPO and KTO, SFT's prepared rows."""
    from datasets import Dataset
    from trl import DPOConfig, KTOConfig, SFTConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    from lit_rlhf.data import PreferenceCollator, SFTCollator, UnpairedCollator
    from lit_rlhf.data.formats import Where
    from lit_rlhf.data.tokenize import build_examples

    limit, pad = 9, tokenizer.pad_token_id
    config = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], max_length=None)
    rows = [{"prompt": "the class was", "chosen": " really love so very good and fun .", "rejected": " bad ."},
            {"prompt": "honestly the team felt", "chosen": " fun .", "rejected": " boring quite very bad and sad ."}]
    keys = ("input_ids", "attention_mask", "completion_mask")

    def ours(fmt, rows):
        examples, errors = build_examples(fmt, [(Where("rows", i + 1), r) for i, r in enumerate(rows)], tokenizer,
                                          max_length=limit, truncation="truncate")
        assert not errors, errors
        return examples

    def differs(mine: dict, theirs: dict, names) -> float:
        return float(any(not torch.equal(mine[k], theirs[k]) for k in names))

    theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(rows),
                                         tokenizer, DPOConfig(**config), "train")
    theirs = DataCollatorForPreference(pad, max_length=limit)(list(theirs))
    table.add("DPO family", "tokenization", differs(PreferenceCollator(pad)(ours("preference", rows)), theirs, keys))
    unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    stub = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    theirs = list(KTOTrainer._prepare_dataset(stub, Dataset.from_list(unpaired), tokenizer, KTOConfig(**config),
                                              "train"))
    for example, partner in zip(theirs, theirs[1:] + theirs[:1]):  # our pairing: row i with completion i+1
        example["KL_completion_ids"] = partner["completion_ids"]
    mine = UnpairedCollator(pad, max_length=limit)(ours("unpaired", unpaired))
    theirs = DataCollatorForUnpairedPreference(pad, max_length=limit)(theirs)
    theirs.update({f"kl_{k}": theirs[f"KL_{k}"] for k in keys})
    table.add("KTO", "tokenization", differs(mine, theirs, keys + tuple(f"kl_{k}" for k in keys)))
    completions = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    stub = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    args = SFTConfig(**{**config, "max_length": limit})
    theirs = SFTTrainer._prepare_dataset(stub, Dataset.from_list(completions), tokenizer, args, False, None, "train")
    mine = SFTCollator(pad)(ours("sft", completions))
    width = mine["input_ids"].shape[1]
    theirs = {"input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in theirs]),
              "completion_mask": torch.tensor([[int(t != -100) for t in r["labels"]] + [0] * (width - len(r["labels"]))
                                               for r in theirs])}
    table.add("SFT", "tokenization", differs(mine, theirs, ("input_ids", "completion_mask")))


def log_probs(table: Table, models: dict[str, str], tokenizer) -> None:
    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.methods import DPO

    data = PreferenceDataModule(train=PREFERENCE, max_length=64).prepare(tokenizer)
    examples = data.train_examples[:4]
    examples[0] = {**examples[0], "chosen_ids": examples[0]["chosen_ids"] * 3}  # one long row: packing has work
    batch = data.collator(examples)
    for family, model_dir in models.items():
        sides = Sides(model_dir)
        ours = sides.ours(DPO, precompute_ref_logps=True)
        trl = sides.trl()
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad():
            mine, counts = ours.sequence_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            theirs = trl(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                         fused_lm_head=True, use_cache=False).log_probs.sum(1)
        table.add(f"log-probs {family}", "logps", (mine - theirs).abs().max().item())
        counted = batch["completion_mask"][:, 1:].sum(1)
        table.add(f"log-probs {family}", "tokenization", (counts - counted).abs().max().item())


def metrics_of(trainer) -> dict[str, float]:
    mode = "train" if trainer.model.training else "eval"
    got = {k: v[-1] for k, v in trainer._metrics[mode].items() if v}
    trainer._metrics[mode].clear()
    return got


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def dpo_family(table: Table, sides: Sides, tokenizer, out: str) -> None:
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.methods import DPO

    data = PreferenceDataModule(train=PREFERENCE, max_length=64).prepare(tokenizer)
    batch = data.collator(data.train_examples[:6])
    torch.manual_seed(3)
    batch["ref_chosen_logps"] = torch.randn(6) * 3 - 40
    batch["ref_rejected_logps"] = torch.randn(6) * 3 - 40
    args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], precompute_ref_log_probs=True,
                     max_length=None, use_weighting=True)
    trainer = DPOTrainer(model=sides.trl(fused=False), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]))
    trainer.model.eval()

    def run(name, ours_kwargs, trl_attrs, note_metrics=None, nll_note=False, gradients=False):
        settings = {**dict(beta=0.3, label_smoothing=0.0, loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None,
                           use_weighting=False, f_divergence_type="reverse_kl"), **trl_attrs}
        for key, value in settings.items():
            setattr(trainer, key, value)
        ours = sides.ours(DPO, precompute_ref_logps=True, beta=0.3, **ours_kwargs)
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, dict(batch), False).item()
            loss, metrics = ours.compute_loss(dict(batch))
        trl_metrics = metrics_of(trainer)
        aligned = None
        if nll_note:  # TRL's `sft` term is the batch's token mean: put it in place of ours
            weight = dict(zip(settings["loss_types"], settings["loss_weights"]))["sft"]
            nll = token_mean_nll(ours, batch, slice(0, 6))
            ours_nll = metrics["nll_loss"].item() if "nll_loss" in metrics else loss.item() / weight
            aligned = abs(loss.item() - weight * ours_nll + weight * nll - trl_loss)
        table.add(name, "loss", abs(loss.item() - trl_loss), "nll_mean" if nll_note else None, aligned)
        for key in DPO_METRICS:
            table.add(name, "metrics", abs(metrics[key].item() - trl_metrics[key]), note_metrics)
        if gradients:
            table.add(name, "gradients", grad_delta(ours.bank.model, lambda: ours.compute_loss(dict(batch))[0],
                                                    trainer.model,
                                                    lambda: trainer._compute_loss(trainer.model, dict(batch), False)))

    for loss_type in ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
                      "apo_down", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "bco_pair"):
        eps = 0.2 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        name = "DPO sigmoid" if loss_type == "sigmoid" else f"DPO {loss_type}" + (f" (ε={eps})" if eps else "")
        run(name, dict(loss_type=loss_type, label_smoothing=eps), dict(loss_types=[loss_type], label_smoothing=eps),
            note_metrics="rewards_norm" if loss_type in ("ipo", "sigmoid_norm") else None,
            gradients=loss_type in ("sigmoid", "ipo"))
    run("DPO f-divergence js", dict(f_divergence="js_divergence"), dict(f_divergence_type="js_divergence"))
    run("DPO f-divergence alpha (0.3)", dict(f_divergence="alpha_divergence", f_alpha=0.3),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3))
    run("DPO ld_alpha=0.5", dict(ld_alpha=0.5), dict(ld_alpha=0.5))
    run("DPO use_weighting (WPO)", dict(use_weighting=True), dict(use_weighting=True), gradients=True)
    run("DPO sft", dict(loss_type="sft"), dict(loss_types=["sft"]), nll_note=True)
    run("DPO [sigmoid, sft] (0.5)", dict(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5]),
        dict(loss_types=["sigmoid", "sft"], loss_weights=[1, 0.5]), nll_note=True)
    # Reference-free: our DPO compares with log-prob 0; TRL has no switch, so give it zeros.
    batch["ref_chosen_logps"] = torch.zeros(6)
    batch["ref_rejected_logps"] = torch.zeros(6)
    ours = sides.ours(DPO, reference_free=True, beta=0.3)
    for key, value in dict(loss_types=["sigmoid"], loss_weights=[1.0], use_weighting=False, ld_alpha=None).items():
        setattr(trainer, key, value)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, dict(batch), False).item()
        loss, metrics = ours.compute_loss({k: v for k, v in batch.items() if not k.startswith("ref_")})
    trl_metrics = metrics_of(trainer)
    table.add("DPO reference-free", "loss", abs(loss.item() - trl_loss))
    for key in DPO_METRICS:
        table.add("DPO reference-free", "metrics", abs(metrics[key].item() - trl_metrics[key]))


def cpo_simpo_orpo(table: Table, sides: Sides, tokenizer) -> None:
    """CPO, CPO-SimPO, SimPO, ORPO against TRL's experimental trainers' loss code, on a stub of their settings."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.methods import CPO, ORPO, SimPO

    data = PreferenceDataModule(train=PREFERENCE, max_length=64).prepare(tokenizer)
    examples = data.train_examples[:6]
    batch = data.collator(examples)
    old = {}  # their batch layout: each side padded on its own, labels -100 off the completion
    for side in ("chosen", "rejected"):
        seqs = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
        width = max(map(len, seqs))
        old[f"{side}_input_ids"] = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        old[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        old[f"{side}_labels"] = torch.tensor([[-100] * len(e["prompt_ids"]) + e[f"{side}_ids"]
                                              + [-100] * (width - len(s)) for e, s in zip(examples, seqs)])
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trl_model = sides.trl(fused=False)

    def stub(cls, **settings):
        s = types.SimpleNamespace(is_encoder_decoder=False, pad_token_id=tokenizer.pad_token_id,
                                  padding_value=tokenizer.pad_token_id, accelerator=accelerator,
                                  aux_loss_enabled=False, **{"label_smoothing": 0.0, "alpha": 0.0, **settings})
        for name in ("concatenated_forward", "cpo_loss" if cls is CPOTrainer else "odds_ratio_loss"):
            setattr(s, name, types.MethodType(getattr(cls, name), s))
        s.get_batch_logps, s.concatenated_inputs = cls.get_batch_logps, cls.concatenated_inputs
        return s

    def run(name, cls, ours_kwargs, trl_cls, settings, nll_weight: float, averaged: bool, gradients=False):
        s = stub(trl_cls, **settings)
        ours = sides.ours(cls, **ours_kwargs)
        ours_batch = {k: v for k, v in batch.items()}
        with torch.no_grad():
            trl_loss, trl_metrics = trl_cls.get_batch_loss_metrics(s, trl_model, old)
            loss, metrics = ours.compute_loss(ours_batch)
            pair = ours.policy_pair_logps(ours_batch)
        trl_loss = float(trl_loss)
        aligned, note = None, None
        if nll_weight:
            orpo = trl_cls is ORPOTrainer
            note = "orpo_nll" if orpo else "nll_mean"
            nll = token_mean_nll(ours, batch, slice(0, 6), whole_sequence=orpo)
            aligned = abs(loss.item() - nll_weight * metrics["nll_loss"].item() + nll_weight * nll - trl_loss)
        table.add(name, "loss", abs(loss.item() - trl_loss), note, aligned)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            table.add(name, "metrics", abs(metrics[key].item() - float(trl_metrics[key])))
        for key, logps, lengths in (("logps/chosen", pair.chosen, pair.chosen_lengths),
                                    ("logps/rejected", pair.rejected, pair.rejected_lengths)):
            mine = metrics[key].item()
            theirs = float(trl_metrics[key])
            table.add(name, "metrics", abs(mine - theirs), "avg_logps" if averaged else None,
                      abs((logps / lengths).mean().item() - theirs) if averaged else None)
        if gradients:
            table.add(name, "gradients", grad_delta(
                ours.bank.model, lambda: ours.compute_loss(dict(batch))[0],
                trl_model, lambda: trl_cls.get_batch_loss_metrics(s, trl_model, old)[0]))

    for loss_type in ("sigmoid", "hinge", "ipo", "simpo"):
        run(f"CPO {loss_type}" if loss_type != "simpo" else "CPO-SimPO", CPO,
            dict(beta=0.3, alpha=1.0, loss_type=loss_type, simpo_gamma=0.5), CPOTrainer,
            dict(beta=0.3, cpo_alpha=1.0, loss_type=loss_type, simpo_gamma=0.5), 1.0, loss_type in ("ipo", "simpo"))
    run("CPO sigmoid (ε=0.2)", CPO, dict(beta=0.3, label_smoothing=0.2), CPOTrainer,
        dict(beta=0.3, cpo_alpha=1.0, loss_type="sigmoid", simpo_gamma=0.5, label_smoothing=0.2), 1.0, False)
    run("CPO AlphaPO (a=0.1)", CPO, dict(beta=0.3, alphapo_alpha=0.1), CPOTrainer,
        dict(beta=0.3, cpo_alpha=1.0, loss_type="sigmoid", simpo_gamma=0.5, alpha=0.1), 1.0, False)
    # SimPO is TRL's CPO with loss_type simpo and no NLL; our γ/β ratio 0.25 at β = 2 is its γ = 0.5.
    run("SimPO", SimPO, dict(beta=2.0, gamma_beta_ratio=0.25), CPOTrainer,
        dict(beta=2.0, cpo_alpha=0.0, loss_type="simpo", simpo_gamma=0.5), 0.0, True, gradients=True)
    run("ORPO", ORPO, dict(beta=0.2), ORPOTrainer, dict(beta=0.2), 1.0, True)


def kto(table: Table, sides: Sides, tokenizer, out: str) -> None:
    from datasets import Dataset
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    from lit_rlhf.data import UnpairedDataModule
    from lit_rlhf.methods import KTO

    data = UnpairedDataModule(train=UNPAIRED, max_length=64).prepare(tokenizer)
    examples = data.train_examples[:8]
    batch = data.collator(examples)
    torch.manual_seed(4)
    # Reference log-probs below the policy's on the KL rows, so the KL estimate is positive and matters.
    batch["ref_logps"] = torch.randn(8) * 3 - 40
    with torch.no_grad():
        policy_kl = sides.ours(KTO).sequence_logps(batch["kl_input_ids"], batch["kl_attention_mask"],
                                                  batch["kl_completion_mask"]).logps
    batch["ref_kl_logps"] = policy_kl - 2.0 + torch.randn(8)
    # The same mismatched rows on both sides (TRL rotates the other way: row i with completion i-1).
    theirs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["completion_mask"], "label": batch["labels"],
              "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": batch["kl_completion_mask"], "ref_logps": batch["ref_logps"],
              "ref_KL_logps": batch["ref_kl_logps"]}
    args = KTOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], precompute_ref_log_probs=True,
                     max_length=None, per_device_train_batch_size=2)
    trainer = KTOTrainer(model=sides.trl(fused=False), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "completion": " b", "label": True},
                                                          {"prompt": "a", "completion": " c", "label": False}]))
    trainer.model.eval()

    def run(name, ours_kwargs, trl_attrs, rows=slice(None), gradients=False):
        for key, value in {**dict(beta=0.3, loss_type="kto", calculate_KL=True, desirable_weight=1.0,
                                  undesirable_weight=1.0), **trl_attrs}.items():
            setattr(trainer, key, value)
        ours = sides.ours(KTO, precompute_ref_logps=True, beta=0.3, **ours_kwargs)
        mine_batch = {k: v[rows] for k, v in batch.items()}
        their_batch = {k: v[rows] for k, v in theirs.items()}
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, dict(their_batch), False).item()
            loss, metrics = ours.compute_loss(dict(mine_batch))
        trl_metrics = metrics_of(trainer)
        table.add(name, "loss", abs(loss.item() - trl_loss))
        for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            present = (key in metrics, key in trl_metrics)
            table.add(name, "metrics", abs(metrics[key][0].item() - trl_metrics[key]) if all(present)
                      else 0.0 if not any(present) else float("inf"))
        if gradients:
            table.add(name, "gradients", grad_delta(
                ours.bank.model, lambda: ours.compute_loss(dict(mine_batch))[0],
                trainer.model, lambda: trainer._compute_loss(trainer.model, dict(their_batch), False)))
        return metrics

    metrics = run("KTO", {}, {}, gradients=True)
    assert metrics["kl"][0] > 0, "the KL estimate should be positive here, or the check does not test it"
    run("KTO weights (1.3, 0.7)", dict(desirable_weight=1.3, undesirable_weight=0.7),
        dict(desirable_weight=1.3, undesirable_weight=0.7))
    run("KTO apo_zero_unpaired", dict(loss_type="apo_zero_unpaired"), dict(loss_type="apo_zero_unpaired",
                                                                         calculate_KL=False))
    undesirable = [i for i, label in enumerate(batch["labels"].tolist()) if not label][:3]
    run("KTO one-class batch", {}, {}, rows=torch.tensor(undesirable))


def sft(table: Table, sides: Sides, tokenizer) -> None:
    """Mean NLL over the batch's loss tokens (TRL's SFT loss), padded and packed, completion-only or not."""
    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.data.collate import PackingCollator, SFTCollator
    from lit_rlhf.methods import SFT

    examples = SFTDataModule(train=SFT_DATA, max_length=64).prepare(tokenizer).train_examples[:5]
    trl = sides.trl()
    ours = sides.ours(SFT)
    for completion_only in (True, False):
        for layout, collator in (("padded", SFTCollator(tokenizer.pad_token_id, completion_only)),
                                 ("packed", PackingCollator(tokenizer.pad_token_id, completion_only, max_length=48))):
            batch = collator(examples)
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}

            def trl_loss():
                out = trl(input_ids=batch["input_ids"], labels=labels, fused_lm_head=True, use_cache=False, **kwargs)
                return -out.log_probs.sum() / (labels[:, 1:] != -100).sum()

            name = f"SFT {layout}" + ("" if completion_only else " (all tokens)")
            with torch.no_grad():
                table.add(name, "loss", abs(ours.compute_loss(batch)[0].item() - trl_loss().item()))
            table.add(name, "gradients",
                      grad_delta(ours.bank.model, lambda: ours.compute_loss(batch)[0], trl, trl_loss))


def reward(table: Table) -> None:
    """Bradley-Terry loss (margin, centring) and logged accuracy and margin for the same scores."""
    from trl.trainer.reward_trainer import RewardTrainer

    from lit_rlhf.methods import RewardModeling

    torch.manual_seed(5)
    scores = torch.randn(12)
    ids = torch.ones(12, 4, dtype=torch.long)
    for margin, center in ((None, None), (torch.rand(6), None), (None, 0.01), (torch.rand(6), 0.01)):
        stub = types.SimpleNamespace(model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
                                     args=types.SimpleNamespace(center_rewards_coefficient=center),
                                     accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x,
                                                                       gather=lambda x: x),
                                     _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if margin is not None:
            inputs["margin"] = margin
        trl_loss = RewardTrainer.compute_loss(stub, lambda **_: types.SimpleNamespace(logits=scores[:, None]),
                                              dict(inputs)).item()
        trl_metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
        ours = RewardModeling(center_coefficient=center)
        ours.pair_scores = lambda batch: (scores[:6], scores[6:])
        loss, correct, metrics = ours.compute_loss(dict(inputs))
        name = "Reward (BT" + (", margin" if margin is not None else "") + (", centring" if center else "") + ")"
        table.add(name, "loss", abs(loss.item() - trl_loss))
        table.add(name, "metrics", abs(correct.mean().item() - trl_metrics["accuracy"]))
        table.add(name, "metrics", abs(metrics["rewards/margins"].item() - trl_metrics["margin"]))


# -- LoRA: the same adapter on both sides, trained two optimizer steps ----------------------------------------

#: Adam divides each gradient entry by its own running size, so its steps (about lr each) move with the ratios of
#: an entry's gradients over the steps, and an entry whose gradient is small carries the float32 rounding
#: differences of the two forwards (1e-6 of the largest gradient: padding-free rows, the fused head) into its step
#: at up to 1e-3 of it. An entry whose gradient is rounding noise (within 100x of Adam's eps, 1e-8 on both sides)
#: may even take a step of the other sign: those are left out. What the column catches is larger: weight decay
#: (0.5 here, on weights up to about 1) moves an entry by 0.25 of the run's largest step, a 10% different learning
#: rate by 0.1, one more step by 0.5.
ADAM_EPS = 1e-8
WEIGHTS_TOL = 1e-2
#: The first step's gradients, relative to the largest: float32 rounding of the two forwards reaches 1.4e-5 (Qwen2:
#: DPO, reward); with both sides in float64 the same runs agree to 2e-7.
LORA_GRADIENTS_TOL = 5e-5
LORA_COLUMNS = ("adapter", "loss", "gradients", "weights")
LORA = dict(r=4, alpha=12, target_modules="all-linear")  # alpha / r = 3: a scaling slip shows
OPTIM = dict(learning_rate=1e-2, weight_decay=0.5, max_grad_norm=0.05, steps=2, rows=8)
LORA_NOTES = {
    "score_bias": "reward: our score head has a bias (zero at start; the Bradley-Terry loss's gradient on it is 0 "
                  "without centring, so it stays 0); TRL's sequence-classification head has none "
                  "(README, LoRA settings against TRL and peft)",
    "sft_dropout": "SFT: TRL's SFTTrainer trains with the model's dropout (GPT-2's config: 0.1); our bank zeroes every "
                   "dropout by default (`bank.disable_dropout`, as TRL's DPO, KTO and reward trainers do): compared "
                   "with TRL's dropout zeroed (README, LoRA settings against TRL and peft)",
    "bco_delta": "bco_pair: our δ is the running mean of past batch-mean rewards (the paper, TRL 0.x); TRL 1.16's "
                 "is 0 (README loss table): compared with ours at δ = 0",
    "qlora_dtype": "QLoRA: TRL casts the adapter of a quantized model to bfloat16; ours stays in the bank's dtype "
                   "(float32 here): compared with TRL's cast back to float32 (README, LoRA settings against TRL and peft)",
}


class Steps:
    """Every optimizer step of the run in progress: the gradients it applied (after clipping; read after the step,
    as Lightning runs the forward and backward inside `optimizer.step(closure)`) and the losses."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.grads: list[dict[int, torch.Tensor]] = []
        self.losses: list[float] = []
        self._handle = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.grads.append({id(p): p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]
                           if p.grad is not None})

    def wrap_loss(self, obj, name: str):
        """Record the first value ``obj.<name>`` returns (the loss) at every call."""
        inner = getattr(obj, name)

        def recorded(*args, **kwargs):
            out = inner(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out["loss"] if isinstance(out, dict) else out
            self.losses.append(float(loss.detach()))
            return out

        setattr(obj, name, recorded)

    def close(self):
        self._handle.remove()


def canonical(name: str, adapter: str) -> str:
    """One name for a trained tensor on both sides: the module path under the peft wrapper without the adapter's
    name; a score head (ours ``heads.<adapter>.linear``, TRL's ``score`` module saved whole) is ``score``."""
    if name.startswith("heads."):
        return "score." + name.rsplit(".", 1)[1]
    name = name.split("base_model.model.", 1)[1]
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def trained(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {canonical(n, adapter): p for n, p in model.named_parameters() if p.requires_grad}


def lora_row(table: Table, name: str, ours: dict, theirs: dict, start: dict, ours_steps: Steps, trl_steps: Steps,
             excused: dict[str, str] | None = None) -> None:
    """Compare one LoRA run: the trained tensors (names and starting values), the loss of each step, the clipped
    gradient each step applied (relative to its largest entry) and the weights after the run (relative to the
    largest change the run made)."""
    excused = excused or {}
    for key, note in excused.items():
        assert key in ours and key not in theirs, key
        largest = max(g[id(ours[key])].abs().max().item() for g in ours_steps.grads)
        assert largest < TOL, f"{name}: {key} has a gradient ({largest:.1e})"
        table.add(name, "adapter", float("inf"), note)
    ours = {k: v for k, v in ours.items() if k not in excused}
    if set(ours) != set(theirs):
        print(f"{name}: trained only by us: {sorted(set(ours) - set(theirs))[:6]}; "
              f"only by TRL: {sorted(set(theirs) - set(ours))[:6]}")
        table.add(name, "adapter", float("inf"))
        return
    table.add(name, "adapter", max((start["ours"][k] - start["trl"][k]).abs().max().item() for k in ours))
    if len(ours_steps.losses) != len(trl_steps.losses) or len(ours_steps.grads) != len(trl_steps.grads):
        print(f"{name}: {len(ours_steps.grads)} optimizer steps here, {len(trl_steps.grads)} in TRL")
        table.add(name, "loss", float("inf"))
        return
    for mine, their in zip(ours_steps.losses, trl_steps.losses):
        table.add(name, "loss", abs(mine - their))
    for mine, their in zip(ours_steps.grads, trl_steps.grads):
        missing = [k for k in ours if id(ours[k]) not in mine] + [k for k in theirs if id(theirs[k]) not in their]
        if missing:
            print(f"{name}: no gradient applied to {missing[:6]}")
            table.add(name, "gradients", float("inf"))
            return
    # The first step only: after it the weights differ by float32 rounding, amplified by Adam (see WEIGHTS_TOL).
    mine, their = ours_steps.grads[0], trl_steps.grads[0]
    scale = max(their[id(p)].abs().max().item() for p in theirs.values())
    table.add(name, "gradients", max((mine[id(ours[k])] - their[id(theirs[k])]).abs().max().item() for k in ours) / scale)
    # Entries whose gradient was ever within 100x of Adam's eps are left out (see WEIGHTS_TOL).
    conditioned = {k: torch.stack([g[id(theirs[k])].abs() for g in trl_steps.grads]).amin(0) > 100 * ADAM_EPS
                   for k in theirs}
    moved = max((theirs[k].detach() - start["trl"][k]).abs().max().item() for k in theirs)
    table.add(name, "weights", max((ours[k].detach() - theirs[k].detach())[conditioned[k]].abs().max().item()
                                   for k in ours) / moved)


def lora_pair(method_cls, trainer_cls, config_cls, model_dir: str, rows: list[dict], data_cls, *, adapter: str,
              trl_model, out: str, peft_config=None, bank_adapters=(), ours_kwargs=None, trl_kwargs=None,
              trl_rows=None, copy_start: bool = True, excused=None, table: Table, name: str,
              trl_dropout_note: str | None = None, train_mode: str = "lora", bank_kwargs=None, trl_callbacks=(),
              aligned: tuple[Callable, str] | None = None, float64: bool = False) -> None:
    """One method on one model: ours through Lightning, TRL through its trainer, from the same LoRA weights.
    ``aligned``: a change to our method that applies TRL's convention where it differs by design, and its note.
    ``float64``: both sides in float64, for a run whose float32 rounding Adam amplifies past the tolerances."""
    import json

    import lightning.pytorch as pl
    from datasets import Dataset

    from lit_rlhf.models import BankSpec, LoraSpec

    if ONLY and not any(word in name for word in ONLY):
        return
    rows_file = Path(out) / f"{name.replace(' ', '_').replace('/', '_')}.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = method_cls(bank=BankSpec(model=model_dir, train_mode=train_mode, lora=LoraSpec(**LORA),
                                    adapters=list(bank_adapters), **(bank_kwargs or {})),
                      learning_rate=OPTIM["learning_rate"], weight_decay=OPTIM["weight_decay"], **(ours_kwargs or {}))
    ours.configure_model()
    if float64:
        ours.bank.double()
        trl_model = trl_model.double()
    if aligned is not None:
        aligned[0](ours)
        table.add(name, "adapter", float("inf"), aligned[1])
    ours_trained = trained(ours.bank, adapter)
    if copy_start:  # B away from 0, so that A has a gradient and the reference differs from the policy
        torch.manual_seed(7)
        with torch.no_grad():
            for key, p in ours_trained.items():
                if ".lora_" in key:
                    p.copy_(torch.randn_like(p) * 0.3)
                elif key == "score.bias":
                    p.zero_()
    args = config_cls(output_dir=str(Path(out) / "trl"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                      max_steps=OPTIM["steps"], per_device_train_batch_size=OPTIM["rows"],
                      learning_rate=OPTIM["learning_rate"], weight_decay=OPTIM["weight_decay"],
                      max_grad_norm=OPTIM["max_grad_norm"], lr_scheduler_type="constant", warmup_steps=0,
                      logging_steps=1, seed=0, **(trl_kwargs or {}))
    trainer = trainer_cls(model=trl_model, args=args, processing_class=ours.tokenizer, peft_config=peft_config,
                          train_dataset=Dataset.from_list(trl_rows or rows), callbacks=list(trl_callbacks))
    if trl_dropout_note and any(m.p > 0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)):
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(trainer.model)
        table.add(name, "adapter", float("inf"), trl_dropout_note)
    if train_mode == "qlora":
        for module in trainer.model.modules():  # as the bank does: bitsandbytes' CPU repacking drops gradients
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.float()
                table.add(name, "adapter", float("inf"), "qlora_dtype")
    theirs = trained(trainer.model, "default")
    with torch.no_grad():
        if copy_start:
            for key, p in theirs.items():
                if key in ours_trained:
                    p.copy_(ours_trained[key])
    start = {"ours": {k: p.detach().clone() for k, p in ours_trained.items()},
             "trl": {k: p.detach().clone() for k, p in theirs.items()}}
    ours_steps = Steps()
    try:
        ours_steps.wrap_loss(ours, "training_step")
        pl.Trainer(max_steps=OPTIM["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   gradient_clip_val=OPTIM["max_grad_norm"]).fit(
            ours, data_cls(train=str(rows_file), batch_size=OPTIM["rows"], max_length=64))
    finally:
        ours_steps.close()
    trl_steps = Steps()
    try:
        trl_steps.wrap_loss(trainer, "compute_loss")
        trainer.train()
    finally:
        trl_steps.close()
    lora_row(table, name, ours_trained, theirs, start, ours_steps, trl_steps, excused)


def lora(table: Table, models: dict[str, str], out: str) -> None:
    """DPO and KTO (fresh adapter: the reference is the base with adapters off; started from a saved SFT adapter:
    the reference is a frozen copy of it, TRL's ``ref`` adapter), reward modelling (TRL: a sequence-classification
    model, ``task_type=SEQ_CLS``, its ``score`` head trained whole) and SFT, each on each model."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    from lit_rlhf.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
    from lit_rlhf.methods import DPO, KTO, SFT, RewardModeling
    from lit_rlhf.models import AdapterSpec

    def first(path, n=OPTIM["rows"]):  # completions with their leading space: both sides read the same text
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:n]]
        return [{k: (" " + v if k in ("chosen", "rejected", "completion") else v) for k, v in r.items()} for r in rows]

    preference, unpaired, sft_rows = first(PREFERENCE), first(UNPAIRED), first(SFT_DATA)
    peft = dict(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"], lora_dropout=0.0)
    length = dict(max_length=None)
    for family, model_dir in models.items():
        causal = lambda: AutoModelForCausalLM.from_pretrained(model_dir)  # noqa: E731
        if family in MOE:
            moe_pair(table, family, model_dir, causal, out, preference, sft_rows, peft)
            continue

        def loaded(path: Path) -> dict:  # both start from it; the reference: TRL's frozen `ref` copy, our `reference`
            return dict(trl_model=PeftModel.from_pretrained(causal(), str(path), is_trainable=True),
                        bank_adapters=[AdapterSpec("policy", path=str(path))], copy_start=False)

        lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, preference, PreferenceDataModule, adapter="policy",
                  trl_model=causal(), peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out,
                  ours_kwargs=dict(beta=0.3), trl_kwargs=dict(beta=0.3, **length), table=table, name=f"DPO {family}")
        if family == "llama":  # the same on a 4-bit base (nf4, double quantization, float32 compute)
            from lit_rlhf.models import BankSpec
            from lit_rlhf.models.loading import quantization_config

            quantized = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=quantization_config(BankSpec(model=model_dir, train_mode="qlora")))
            lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, preference, PreferenceDataModule, adapter="policy",
                      trl_model=quantized, peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out,
                      train_mode="qlora", ours_kwargs=dict(beta=0.3), trl_kwargs=dict(beta=0.3, **length),
                      table=table, name=f"DPO QLoRA {family}")
        # An SFT adapter saved by peft, as TRL's SFTTrainer leaves one, then loaded by both sides; on Llama also one
        # that trained the LM head whole (`modules_to_save`, as TRL's SFT does for added tokens).
        for saved_modules in [None] + [["lm_head"]] * (family == "llama"):
            sft_dir = Path(out) / f"sft_adapter_{family}{'_lm_head' if saved_modules else ''}"
            torch.manual_seed(8)
            saved = get_peft_model(causal(), LoraConfig(**peft, task_type="CAUSAL_LM", modules_to_save=saved_modules))
            with torch.no_grad():
                for n, p in saved.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn_like(p) * 0.3)
            saved.save_pretrained(str(sft_dir))
            lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, preference, PreferenceDataModule, adapter="policy",
                      **loaded(sft_dir), out=out, ours_kwargs=dict(beta=0.3), trl_kwargs=dict(beta=0.3, **length),
                      table=table, name=f"DPO from SFT adapter{' + lm_head' if saved_modules else ''} {family}")
        if family == "llama":
            lora_dpo_family(table, model_dir, out, preference, peft, loaded, causal)
        if family == "llama":  # reference log-probs computed once before training, from the loaded adapter
            lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, preference, PreferenceDataModule, adapter="policy",
                      **loaded(Path(out) / f"sft_adapter_{family}"), out=out,
                      ours_kwargs=dict(beta=0.3, precompute_ref_logps=True),
                      trl_kwargs=dict(beta=0.3, precompute_ref_log_probs=True, **length), table=table,
                      name=f"DPO from SFT adapter, precomputed reference {family}")
        # TRL pairs row i with completion i-1 for the KL rows, ours with i+1: TRL reads the rows reversed; ours
        # precomputes the reference (the KL pairs are then fixed in the data, as TRL's are).
        kto = dict(trl_rows=unpaired[::-1], ours_kwargs=dict(beta=0.3, precompute_ref_logps=True),
                   trl_kwargs=dict(beta=0.3, **length), table=table)
        # TRL's reference for a `peft_config` adapter is the base with adapters off; ours precomputes the starting
        # policy, which the B moved off zero above makes differ from the base: `bank.reference: base` is TRL's.
        lora_pair(KTO, KTOTrainer, KTOConfig, model_dir, unpaired, UnpairedDataModule, adapter="policy",
                  trl_model=causal(), peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out, **kto,
                  bank_kwargs=dict(reference="base"), name=f"KTO {family}")
        lora_pair(KTO, KTOTrainer, KTOConfig, model_dir, unpaired, UnpairedDataModule, adapter="policy",
                  **loaded(Path(out) / f"sft_adapter_{family}"), out=out, **kto, name=f"KTO from SFT adapter {family}")
        scorer = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        lora_pair(RewardModeling, RewardTrainer, RewardConfig, model_dir, preference, PreferenceDataModule,
                  adapter="reward", trl_model=scorer, peft_config=LoraConfig(**peft, task_type="SEQ_CLS"), out=out,
                  ours_kwargs=dict(normalize_on=None), trl_kwargs=length, excused={"score.bias": "score_bias"},
                  table=table, name=f"Reward {family}")
        lora_pair(SFT, SFTTrainer, SFTConfig, model_dir, sft_rows, SFTDataModule, adapter="policy",
                  trl_model=causal(), peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out,
                  trl_kwargs=length, trl_dropout_note="sft_dropout", table=table, name=f"SFT {family}")


#: Mixtures of experts run by ``--lora`` (DPO and SFT): all-linear as peft remaps it (experts and router LoRA on
#: Mixtral, Qwen3-MoE, OLMoE; attention and the shared expert on Qwen2-MoE), the router load-balancing loss in both
#: sides' losses at the config's coefficient.
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def moe_model(family: str, root: Path) -> str:
    """A tiny ``family`` model without Mixtral's router jitter: TRL's ``disable_dropout`` leaves it on (ours does
    not), and its training forwards would be random."""
    import json

    from lit_rlhf.toy.families import build_tiny

    model_dir = build_tiny(family, root / family)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "router_jitter_noise": 0.0}))
    return str(model_dir)


def moe_pair(table: Table, family: str, model_dir: str, causal: Callable, out: str, preference: list[dict],
             sft_rows: list[dict], peft: dict) -> None:
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    from lit_rlhf.data import PreferenceDataModule, SFTDataModule
    from lit_rlhf.methods import DPO, SFT

    length = dict(max_length=None)
    lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, preference, PreferenceDataModule, adapter="policy",
              trl_model=causal(), peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out,
              ours_kwargs=dict(beta=0.3), trl_kwargs=dict(beta=0.3, **length), table=table, name=f"DPO {family}")
    lora_pair(SFT, SFTTrainer, SFTConfig, model_dir, sft_rows, SFTDataModule, adapter="policy", trl_model=causal(),
              peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"), out=out, trl_kwargs=length,
              trl_dropout_note="sft_dropout", table=table, name=f"SFT {family}")


def tr_dpo_sync(alpha: float, steps: int):
    """TR-DPO on TRL's side (its DPOTrainer refuses ``sync_ref_model`` with peft): after every ``steps``-th optimizer
    step its frozen ``ref`` adapter (the loaded adapter's copy) moves toward the trained one, ``ref <- a policy +
    (1-a) ref`` on each LoRA factor and saved module, as ours mixes its ``policy_reference`` adapter."""
    from transformers import TrainerCallback

    class Sync(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % steps:
                return
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, ref in params.items():
                    if ".ref." in name:
                        ref.lerp_(params[name.replace(".ref.", ".default.")], alpha)

    return Sync()


def lora_dpo_family(table: Table, model_dir: str, out: str, rows: list[dict], peft: dict, loaded: Callable,
                    causal: Callable) -> None:
    """The rest of the DPO family, LoRA, on one model: every other DPO loss type (fresh adapter; from the saved SFT
    adapter with its live frozen copy; and with reference log-probs precomputed from it), RPO's NLL term, TR-DPO from
    an adapter with a saved LM head, ``reference_free``, SimPO, CPO and CPO-SimPO (TRL's experimental CPO trainer;
    ``reference_free`` DPO is its sigmoid loss without NLL), and gradient checkpointing (non-reentrant) on both
    sides. ORPO is left out: TRL's NLL covers the prompt tokens too (README loss table), which no choice of rows
    aligns."""
    from peft import LoraConfig
    from trl import DPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.losses import DPO_LOSS_TYPES
    from lit_rlhf.methods import CPO, DPO, SimPO

    sft_dir, lm_head_dir = (Path(out) / f"sft_adapter_llama{tail}" for tail in ("", "_lm_head"))
    fresh = lambda: dict(trl_model=causal(), peft_config=LoraConfig(**peft, task_type="CAUSAL_LM"))  # noqa: E731
    starts = {"": fresh, " from SFT adapter": lambda: loaded(sft_dir)}
    common = dict(out=out, table=table, adapter="policy")
    # The NLL terms average the chosen tokens per example, then over the batch; TRL averages the batch's tokens
    # (README loss table): rows whose chosen completions are one length make the two equal, so they must agree.
    even = [{**r, "chosen": " " + " ".join(r["chosen"].split()[:3]) + " ."} for r in rows]

    def dpo(name, ours, trl, start, data=rows, **kwargs):
        lora_pair(DPO, DPOTrainer, DPOConfig, model_dir, data, PreferenceDataModule, **start(), **common, name=name,
                  ours_kwargs=dict(beta=0.3, **ours), trl_kwargs=dict(beta=0.3, max_length=None, **trl), **kwargs)

    def cpo(name, method, ours, trl, start, data=rows, **kwargs):
        lora_pair(method, CPOTrainer, CPOConfig, model_dir, data, PreferenceDataModule, **start(), **common, name=name,
                  ours_kwargs=ours, trl_kwargs=dict(max_length=None, **trl), **kwargs)

    no_delta = (lambda method: setattr(method, "bco_delta", lambda chosen, rejected: 0.0), "bco_delta")
    for loss_type in DPO_LOSS_TYPES:
        if loss_type in ("sigmoid", "sft"):  # the sigmoid rows above; sft below, with RPO
            continue
        eps = 0.2 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        settings = dict(ours=dict(loss_type=loss_type, label_smoothing=eps),
                        trl=dict(loss_type=[loss_type], label_smoothing=eps),
                        aligned=no_delta if loss_type == "bco_pair" else None)
        label = f"DPO {loss_type}" + (f" (ε={eps})" if eps else "")
        for where, start in starts.items():
            dpo(label + where, start=start, **settings)
        dpo(label + " from SFT adapter, precomputed", start=starts[" from SFT adapter"],
            ours={**settings["ours"], "precompute_ref_logps": True},
            trl={**settings["trl"], "precompute_ref_log_probs": True}, aligned=settings["aligned"])
    rpo = dict(ours=dict(rpo_alpha=0.5), trl=dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), data=even)
    for where, start in starts.items():
        dpo("DPO RPO (α=0.5)" + where, start=start, **rpo)
    dpo("DPO RPO (α=0.5) from SFT adapter, precomputed", start=starts[" from SFT adapter"],
        ours=dict(rpo_alpha=0.5, precompute_ref_logps=True),
        trl=dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], precompute_ref_log_probs=True), data=even)
    dpo("DPO [sft]", start=fresh, ours=dict(loss_type="sft"), trl=dict(loss_type=["sft"]), data=even)
    for alpha in (1.0, 0.5):
        dpo(f"TR-DPO (α={alpha}, every step) from SFT adapter + lm_head", start=lambda: loaded(lm_head_dir),
            ours=dict(sync_ref_model=True, ref_model_mixup_alpha=alpha, ref_model_sync_steps=1), trl={},
            trl_callbacks=[tr_dpo_sync(alpha, 1)])
    checkpointing = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    for where, start in starts.items():
        dpo("DPO, gradient checkpointing" + where, start=start, ours={}, trl=checkpointing,
            bank_kwargs=dict(gradient_checkpointing=True))
    for where, start in starts.items():
        cpo("DPO reference_free (TRL: CPO sigmoid, no NLL)" + where, DPO, dict(beta=0.3, reference_free=True),
            dict(beta=0.3, cpo_alpha=0.0, loss_type="sigmoid"), start)
        cpo("SimPO" + where, SimPO, dict(beta=2.0, gamma_beta_ratio=0.25),
            dict(beta=2.0, cpo_alpha=0.0, loss_type="simpo", simpo_gamma=0.5), start)
    cpo("SimPO (ε=0.2)", SimPO, dict(beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.2),
        dict(beta=2.0, cpo_alpha=0.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.2), fresh)
    for loss_type in ("sigmoid", "hinge", "ipo", "simpo"):
        for where, start in starts.items():
            cpo(("CPO-SimPO" if loss_type == "simpo" else f"CPO {loss_type}") + where, CPO,
                dict(beta=0.3, alpha=1.0, loss_type=loss_type, simpo_gamma=0.5),
                dict(beta=0.3, cpo_alpha=1.0, loss_type=loss_type, simpo_gamma=0.5), start, data=even)
    # In float32 one LoRA entry's first gradient is 3.4e-8 (3x Adam's eps), where Adam's step is the ratio of two
    # rounding-sized numbers: the sides' first steps differ there by 3.3e-4, enough to turn the sign of second-step
    # gradients near 1e-5 elsewhere, and the weights after two steps differ by 0.49 of a step (losses 9e-6,
    # first-step gradients 2e-6). In float64 the run agrees (weights 4e-6).
    cpo("CPO sigmoid (ε=0.2), float64", CPO, dict(beta=0.3, label_smoothing=0.2),
        dict(beta=0.3, cpo_alpha=1.0, loss_type="sigmoid", label_smoothing=0.2), fresh, data=even, float64=True)
    cpo("CPO, gradient checkpointing from SFT adapter", CPO, dict(beta=0.3),
        dict(beta=0.3, cpo_alpha=1.0, loss_type="sigmoid", **checkpointing), starts[" from SFT adapter"], data=even,
        bank_kwargs=dict(gradient_checkpointing=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters trained two optimizer steps on both sides "
                        "(DPO, DPO from an SFT adapter, KTO, reward, SFT) instead of the full-parameter checks")
    parser.add_argument("--only", nargs="+", default=[], help="--lora: only the runs whose name holds one of these "
                        "words (e.g. TR-DPO SimPO)")
    args = parser.parse_args(argv)
    lora_mode = args.lora
    ONLY[:] = args.only
    torch.set_num_threads(1)
    from lit_rlhf.models import BankSpec, load_tokenizer
    from lit_rlhf.toy.families import build_tiny

    tokenizer = load_tokenizer(BankSpec(model="assets/toy/base"))
    with tempfile.TemporaryDirectory() as root:
        models = {family: str(build_tiny(family, Path(root) / family))
                  for family in ("llama", "qwen2", "gpt2", "gemma2")}
        if lora_mode:
            table = Table(LORA_COLUMNS, LORA_NOTES, {"weights": WEIGHTS_TOL, "gradients": LORA_GRADIENTS_TOL})
            lora(table, models | {family: moe_model(family, Path(root)) for family in MOE}, root)
            return 0 if table.print() else 1
        table = Table()
        tokenization(table, tokenizer)
        truncation(table, tokenizer)
        log_probs(table, models, tokenizer)
        sides = Sides(models["llama"])
        dpo_family(table, sides, tokenizer, root)
        cpo_simpo_orpo(table, sides, tokenizer)
        kto(table, sides, tokenizer, root)
        sft(table, sides, tokenizer)
        reward(table)
    return 0 if table.print() else 1


if __name__ == "__main__":
    sys.exit(main())
