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

A cell is ``agree`` (every difference <= 1e-5; gradients relative to their largest entry), or
``by design [n]`` with the note saying what differs and where it is documented; where a convention
can be applied to our numbers (TRL's token-mean NLL), the cell also shows the difference after
applying it, which must agree. Anything else prints ``DIFFERS`` and the script exits 1.

    pip install -e ".[bench]"                      # TRL, pinned; never a runtime dependency
    OMP_NUM_THREADS=1 python benchmarks/agree_with_trl_offline.py
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import types
import warnings
from collections import defaultdict
from pathlib import Path

import torch

TOL = 1e-5
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
    "last_turn": "SFT `messages` rows: the loss covers the last assistant message (completion-only); TRL "
                 "trains on every token of a `messages` row (README Data; completion_only_loss: false "
                 "matches TRL, checked)",
}

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


class Table:
    """Per (method, column): the largest difference seen and the note that excuses it, if any."""

    def __init__(self):
        self.cells: dict[tuple[str, str], list[tuple[float, str | None, float | None]]] = defaultdict(list)

    def add(self, method: str, column: str, delta: float, note: str | None = None, aligned: float | None = None):
        self.cells[method, column].append((float(delta), note, aligned))

    def cell(self, method: str, column: str) -> tuple[str, bool]:
        entries = self.cells.get((method, column))
        if not entries:
            return "-", True
        worst = max(delta for delta, _, _ in entries)
        if worst <= TOL:
            return f"agree ({worst:.0e})", True
        notes = sorted({note for delta, note, _ in entries if delta > TOL and note})
        unexcused = [d for d, note, aligned in entries
                     if d > TOL and (note is None or (aligned is not None and aligned > TOL))]
        if unexcused:
            return f"DIFFERS ({max(unexcused):.1e})", False
        aligned = [a for d, note, a in entries if d > TOL and a is not None]
        tail = f", aligned {max(aligned):.0e}" if aligned else ""
        return f"by design [{','.join(str(list(NOTES).index(n) + 1) for n in notes)}]{tail}", True

    def print(self) -> bool:
        methods = list(dict.fromkeys(m for m, _ in self.cells))
        rows = [[m, *(self.cell(m, c)[0] for c in COLUMNS)] for m in methods]
        widths = [max(len(r[i]) for r in rows + [["method", *COLUMNS]]) for i in range(len(COLUMNS) + 1)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        print(line(["method", *COLUMNS]))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            print(line(r))
        print()
        for i, (key, text) in enumerate(NOTES.items(), start=1):
            print(f"[{i}] {text}")
        return all(self.cell(m, c)[1] for m in methods for c in COLUMNS)


def tokenization(table: Table, tokenizer) -> None:
    """Ours against each TRL trainer's ``_prepare_dataset`` on the same rows."""
    from datasets import Dataset
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    from trl.trainer.sft_trainer import SFTTrainer

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
                         [0 if completion_only else 1] * len(e["prompt_ids"]) + [1] * len(e["completion_ids"])]
                        for e in ours("sft", rows, tok)]
                table.add("SFT", "tokenization", float(mine != theirs),
                          note if completion_only and mine != theirs else None)


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


def main() -> int:
    torch.set_num_threads(1)
    from lit_rlhf.models import BankSpec, load_tokenizer
    from lit_rlhf.toy.families import build_tiny

    tokenizer = load_tokenizer(BankSpec(model="assets/toy/base"))
    table = Table()
    with tempfile.TemporaryDirectory() as root:
        models = {family: str(build_tiny(family, Path(root) / family))
                  for family in ("llama", "qwen2", "gpt2", "gemma2")}
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
