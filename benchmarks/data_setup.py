"""Data setup at scale: a DataModule's ``prepare`` (load + validate + tokenise) against TRL 1.16's own
dataset preparation of the same rows, in the same run.

Synthetic JSONL of ``--rows`` rows per case, shaped like the public sets people train on:

| case            | rows like                    | ours                          | anchor (TRL 1.16, ``datasets.map``, 1 process) |
|-----------------|------------------------------|-------------------------------|-------------------------------------------------|
| preference      | plain prompt/chosen/rejected | ``PreferenceDataModule``      | ``DPOTrainer._prepare_dataset``                 |
| preference_chat | UltraFeedback (binarized)    | ``PreferenceDataModule``      | ``DPOTrainer._prepare_dataset``                 |
| unpaired        | KTO, conversational          | ``UnpairedDataModule``        | ``KTOTrainer._prepare_dataset``                 |
| sft_messages    | UltraChat (1-6 exchanges)    | ``SFTDataModule``             | ``SFTTrainer._prepare_dataset``                 |
| prompt          | prompt sets                  | ``PromptDataModule``          | ``maybe_apply_chat_template`` + tokenizer (what GRPO does per batch) |

Both sides read the JSONL file (TRL's through ``json`` + ``Dataset.from_list``, in memory: no arrow cache).
The tokenizer is a fast byte-level BPE with a real family's chat template and special tokens
(``tests/data/real_tokenizers.py``, ``--family``). Reported per side: wall and CPU seconds per 10k rows
(median of ``--repeats``, the sides interleaved), with ``--memory`` the peak RSS above the RSS before
(``VmHWM`` reset through ``/proc/self/clear_refs``; each side once, in its own process), then ours / TRL.
TRL's side does less for ``sft_messages``: its default trains on every token, so it renders each
conversation once, where ours finds every assistant turn (``prompt_loss_mask``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_setup.py                 # ~1 minute
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_setup.py --rows 10000 --repeats 1 --memory
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_setup.py --profile sft_messages   # cProfile of ours
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

CASES = ("preference", "preference_chat", "unpaired", "sft_messages", "prompt")


# -- synthetic rows ---------------------------------------------------------------------------------


def _words(rng: random.Random, vocab: list[str], mean: int) -> str:
    """A text of about ``mean`` words (lognormal lengths, as real prompts and answers are long-tailed)."""
    n = max(3, int(rng.lognormvariate(0, 0.6) * mean * 0.85))
    words = rng.choices(vocab, k=n)
    for i in range(12, n, rng.randint(10, 20)):  # sentences
        words[i] += "."
    return " ".join(words)


def _vocab(rng: random.Random) -> list[str]:
    from tests.data.real_tokenizers import CORPUS

    known = sorted({w for line in CORPUS for w in line.split() if w.isalpha()})
    # Words the BPE has not seen whole: several tokens each, as rare words are in a real vocabulary.
    made = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(300)]
    return known * 6 + made


def make_rows(case: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``case``; lengths in words: prompts ~60, answers ~150, UltraChat turns ~40 / ~120."""
    rng = random.Random(seed)
    vocab = _vocab(rng)

    def user(mean=60):
        return {"role": "user", "content": _words(rng, vocab, mean)}

    def assistant(mean=150):
        return {"role": "assistant", "content": _words(rng, vocab, mean)}

    rows = []
    for i in range(n):
        if case == "preference":
            rows.append({"prompt": _words(rng, vocab, 60) + "\n", "chosen": _words(rng, vocab, 150),
                         "rejected": _words(rng, vocab, 150)})
        elif case == "preference_chat":
            rows.append({"prompt": [user()], "chosen": [assistant()], "rejected": [assistant()]})
        elif case == "unpaired":
            rows.append({"prompt": [user()], "completion": [assistant()], "label": bool(i % 2)})
        elif case == "sft_messages":
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
            for _ in range(rng.choice((1, 2, 3, 3, 4, 4, 5, 6))):
                messages += [user(40), assistant(120)]
            rows.append({"messages": messages})
        elif case == "prompt":
            rows.append({"prompt": [user()]})
        else:
            raise ValueError(f"unknown case {case!r}; use one of {', '.join(CASES)}")
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# -- the two sides -----------------------------------------------------------------------------------


def ours(case: str, path: Path, tokenizer) -> int:
    from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule, UnpairedDataModule

    module = {"preference": PreferenceDataModule, "preference_chat": PreferenceDataModule,
              "unpaired": UnpairedDataModule, "sft_messages": SFTDataModule, "prompt": PromptDataModule}[case]
    data = module(str(path), tokenizer=tokenizer, max_length=None).prepare()
    return data.num_train_rows


def trl(case: str, path: Path, tokenizer) -> int:
    from datasets import Dataset, disable_progress_bars
    from trl import DPOConfig, KTOConfig, SFTConfig
    from trl.data_utils import maybe_apply_chat_template
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    disable_progress_bars()
    with path.open() as f:
        dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    config = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], max_length=None)
    stub = types.SimpleNamespace(_tokenizer=tokenizer)
    if case in ("preference", "preference_chat"):
        out = DPOTrainer._prepare_dataset(stub, dataset, tokenizer, DPOConfig(**config), "train")
    elif case == "unpaired":
        stub.calculate_KL, stub.desirable_weight, stub.undesirable_weight = False, 1.0, 1.0
        out = KTOTrainer._prepare_dataset(stub, dataset, tokenizer, KTOConfig(**config), "train")
    elif case == "sft_messages":
        stub.chat_template, stub.completion_only_loss = None, True
        out = SFTTrainer._prepare_dataset(stub, dataset, tokenizer, SFTConfig(**config), False, None, "train")
    else:  # GRPO renders and tokenises prompts per batch; all of them here, as its loop would over an epoch
        out = dataset.map(lambda row: maybe_apply_chat_template(row, tokenizer)).map(
            lambda row: {"prompt_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]})
    return len(out)


# -- measuring ----------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure(fn, *args) -> dict:
    """Wall and CPU seconds of ``fn(*args)``, and its peak RSS above the RSS before it (MiB): a fair
    peak only in a fresh process, where no earlier run left freed memory to reuse (``--memory``)."""
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    wall, cpu = time.perf_counter(), time.process_time()
    rows = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rows": rows, "wall_s": wall, "cpu_s": cpu, "peak_mib": (_rss_kib("VmHWM") - before) / 1024}


def peak_in_own_process(case: str, side: str, path: Path, family: str) -> float:
    """The peak RSS of one side's run (MiB above the RSS before it), in a fresh process."""
    command = [sys.executable, __file__, "--child", case, side, str(path), "--family", family]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600, help="rows per case")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the median is reported")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--family", default="qwen2.5", help="a chat family of tests/data/real_tokenizers.py")
    parser.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    parser.add_argument("--profile", choices=CASES, help="cProfile ours on this case instead, top 25 by own time")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak RSS of each side, each run once in a fresh process (slower)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "SIDE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from tests.data.real_tokenizers import build_family

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp())
    tokenizer = build_family(args.family, work)
    for name in ("lit_rlhf.data", "trl", "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer", "trl.trainer.sft_trainer",
                 "datasets"):
        __import__(name)  # imported before measuring: their import is no part of preparing data
    if args.child:
        case, side, path = args.child
        print(json.dumps(measure({"ours": ours, "trl": trl}[side], case, Path(path), tokenizer)))
        return
    if args.profile:
        import cProfile
        import pstats

        path = write_jsonl(make_rows(args.profile, args.rows), work / f"{args.profile}.jsonl")
        profile = cProfile.Profile()
        profile.runcall(ours, args.profile, path, tokenizer)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    sides = {"ours": ours, "trl": trl}
    results = {}
    print(f"{args.rows} rows per case, tokenizer {args.family}, median of {args.repeats} (sides interleaved); "
          "per 10k rows: wall s, CPU s" + ("; peak RSS above the start, MiB (own process)" if args.memory else ""))
    print(f"{'case':16} {'side':5} {'wall/10k':>9} {'cpu/10k':>9}" + (f" {'peak MiB':>9}" if args.memory else ""))
    scale = 10_000 / args.rows
    for case in args.cases:
        path = write_jsonl(make_rows(case, args.rows), work / f"{case}.jsonl")
        runs = {side: [] for side in args.sides}
        for _ in range(args.repeats):
            for side in args.sides:
                r = measure(sides[side], case, path, tokenizer)
                assert r.pop("rows") == args.rows, (case, side)
                runs[side].append(r)
        results[case] = {}
        for side, measured in runs.items():
            r = {k: statistics.median(m[k] for m in measured) for k in ("wall_s", "cpu_s")}
            r["peak_mib"] = peak_in_own_process(case, side, path, args.family) if args.memory else float("nan")
            r.update(wall_per_10k=r["wall_s"] * scale, cpu_per_10k=r["cpu_s"] * scale, runs=measured)
            results[case][side] = r
            print(f"{case:16} {side:5} {r['wall_per_10k']:9.1f} {r['cpu_per_10k']:9.1f}"
                  + (f" {r['peak_mib']:9.1f}" if args.memory else ""))
        if len(runs) == 2:
            a, b = results[case]["ours"], results[case]["trl"]
            # A peak below 1 MiB is within the RSS counters' rounding: no ratio of it.
            ratio = {k: a[k] / b[k] if b[k] >= (1 if k == "peak_mib" else 0.001) else None
                     for k in ("wall_s", "cpu_s", "peak_mib")[: 3 if args.memory else 2]}
            results[case]["ratio"] = ratio
            print(f"{case:16} ours/TRL: " + ", ".join(f"{k.split('_')[0]} " + ("n/a" if v is None else f"{v:.2f}")
                                                     for k, v in ratio.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
