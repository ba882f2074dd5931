"""A trained policy outside training: load it, sample from it, talk to it.

``load_policy`` takes an adapter directory (PEFT format), a run directory (its newest
``export/adapter``, or ``export/merged`` for a full fine-tune) or a merged transformers model.
Prompts go through the same path as training data (``build_examples`` of the ``prompt``
format: chat template for message lists, the tokenizer's BOS for text) and responses through
the same rollout engine as the online methods (``lit_rlhf.rollout``), so what ``generate``
prints is what PPO would have sampled.

    lit-rlhf generate runs/dpo --prompt "the movie was" --out completions.jsonl
    lit-rlhf generate runs/dpo --prompts assets/toy/data/prompt_val.jsonl --out completions.jsonl --n 4
    lit-rlhf chat runs/sft
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lit_rlhf.data import PromptCollator, Where, build_examples, load_rows, pad_token_id_of, report_invalid
from lit_rlhf.errors import InvalidArgument
from lit_rlhf.models.positions import position_limit
from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec, load_tokenizer, read_adapter_meta
from lit_rlhf.rollout import SamplingConfig, build_engine

POLICY = "policy"
#: The adapter the policy started from, when it did not start as the base (see ``load_policy``).
START = "start"

log = logging.getLogger("lit_rlhf.inference")


@dataclass
class Policy:
    """A loaded policy.

    Attributes:
        bank: one base; the policy is adapter ``adapter`` on it, or the base itself when ``adapter`` is ``None``.
        tokenizer: the base's tokenizer.
        adapter: ``"policy"`` for an adapter, ``None`` for a merged model.
        path: the directory the policy was loaded from.
        reference: the adapter that is the policy's reference (``"start"``: the adapter it was trained
            from), or ``None``: the base with adapters off.
    """

    bank: AdapterBank
    tokenizer: object
    adapter: str | None
    path: Path
    reference: str | None = None


def find_export(path: str | Path) -> Path:
    """The model directory ``path`` names: itself if it holds an adapter or a model, else the newest
    ``export/adapter`` (or ``export/merged``) below it, as written by ``ExportOnFitEnd``."""
    path = Path(path)
    if (path / "adapter_config.json").exists() or (path / "config.json").exists():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter, model or run directory")
    found = [p.parent for p in path.glob("**/export/*/adapter_config.json")]
    found += [p.parent for p in path.glob("**/export/merged/config.json")]
    if not found:
        raise FileNotFoundError(f"{path}: holds no adapter_config.json or config.json, and no export/adapter or "
                                "export/merged below it; export a checkpoint with `lit-rlhf export` first")
    # The newest run; within it the adapter (its reference is the base) before the merged copy.
    return max(found, key=lambda p: (p.stat().st_mtime, p.name == "adapter"))


def load_policy(path: str | Path, *, base: str | None = None, dtype: str = "float32",
                reference: str | None = None) -> Policy:
    """Load the policy at ``path`` (see :func:`find_export`) in eval mode.

    Args:
        path: an adapter directory, a merged model directory, or a run directory.
        base: for an adapter, the base model; the adapter's ``base_model_name_or_path`` when ``None``.
        dtype: weights dtype of the base (quantized as the adapter's ``lit_rlhf.json`` records, for QLoRA).
        reference: an adapter's reference policy: an adapter directory, or ``"base"`` (adapters off).
            ``None``: the starting policy the export records (``lit_rlhf.json``: the SFT adapter a
            DPO run went on from), else the base.
    """
    found = find_export(path)
    if not (found / "adapter_config.json").exists():
        spec = BankSpec(model=str(found), dtype=dtype)
        return Policy(AdapterBank(spec).eval(), load_tokenizer(spec), None, found)
    base = base or json.loads((found / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{found}/adapter_config.json does not name its base model: pass --base")
    meta = read_adapter_meta(found)
    start = meta.get("reference") if reference is None else reference
    adapters = [AdapterSpec(POLICY, path=str(found), trainable=False)]
    if start not in (None, "base"):
        if not (Path(start) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{start}: the reference adapter of {found} is not there (moved or deleted?): "
                                    "pass --reference DIR, or --reference base to compare with the bare base")
        adapters.append(AdapterSpec(START, path=str(start), trainable=False))
    # A QLoRA adapter corrects the quantized weights it was trained against: load the base quantized as they were.
    quantized = meta.get("quantization") or {}
    quantization = {"quantization": quantized["mode"], **{k: v for k, v in quantized.items() if k != "mode"}} \
        if quantized else {}
    spec = BankSpec(model=base, dtype=dtype, adapters=adapters, **quantization)
    bank = AdapterBank(spec).eval()
    return Policy(bank, load_tokenizer(spec), POLICY, found, START if len(adapters) > 1 else None)


def prompt_batches(policy: Policy, prompts: list, *, where: list[Where] | None = None, batch_size: int = 16,
                   max_prompt_length: int | None = None) -> Iterator[dict]:
    """``PromptCollator`` batches of ``prompts`` (strings, or message lists rendered with the chat
    template), validated and tokenised exactly like a ``prompt`` dataset."""
    where = where or [Where("<prompts>", i + 1, unit="row") for i in range(len(prompts))]
    rows = [(w, {"prompt": p}) for w, p in zip(where, prompts)]
    examples, errors = build_examples("prompt", rows, policy.tokenizer, max_length=max_prompt_length,
                                      truncation="truncate")
    report_invalid(errors, "error", "the prompts")
    collate = PromptCollator(pad_token_id_of(policy.tokenizer))
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size])


def fit_positions(config, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts cut to their last tokens where, with ``max_new_tokens`` after them, they would run
    past the model's positions (a chat's history grows without bound): GPT-2 failed there with an IndexError,
    a rotary model read positions it was never trained at. Logged when it cuts."""
    found = position_limit(config)
    if found is None:
        return ids, mask
    key, limit = found
    room = limit - max_new_tokens
    if room < 1:
        raise InvalidArgument("max_new_tokens", f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                                                f"model's {limit} positions ({key}={limit})")
    if ids.shape[1] > room:
        log.warning("prompts of up to %d tokens keep their last %d: with max_new_tokens=%d they fit the model's %d "
                    "positions (%s)", ids.shape[1], room, max_new_tokens, limit, key)
        ids, mask = ids[:, -room:], mask[:, -room:]
    return ids, mask


@torch.no_grad()
def sample(policy: Policy, batch: dict, sampling: SamplingConfig, *, adapter: str | None = POLICY,
           engine: str = "hf") -> tuple[list[str], torch.Tensor, object]:
    """Responses of ``adapter`` (``None``: the base, i.e. the reference of an adapter) to a prompt batch.

    Returns:
        ``(texts, response_lengths, rollout)``; texts are decoded without the stop token and
        special tokens, lengths count tokens including the stop token.
    """
    device = next(policy.bank.parameters()).device
    ids, mask = fit_positions(policy.bank.model.config, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                              sampling.max_new_tokens)
    rollout = build_engine(engine).generate(policy.bank, adapter, ids.to(device), mask.to(device),
                                            sampling.resolved(policy.tokenizer, policy.bank.model))
    # The same decoding as the online methods (OnlineMethod.decode_responses): cut before the stop token.
    lengths = (rollout.response_lengths - rollout.ended.long()).tolist()
    rows = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), lengths)]
    return policy.tokenizer.batch_decode(rows, skip_special_tokens=True), rollout.response_lengths, rollout


# -- the command line ------------------------------------------------------------------------------


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an adapter directory, a merged model directory, or a run directory "
                        "(its newest export/adapter is used)")
    parser.add_argument("--base", default=None,
                        help="the adapter's base model (default: read from adapter_config.json)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)


def add_sampling_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--<field>`` per ``SamplingConfig`` field (stop/pad ids come from the tokenizer)."""
    group = parser.add_argument_group("sampling (as SamplingConfig in the configs)")
    for field in fields(SamplingConfig):
        if field.name in ("stop_token_ids", "pad_token_id"):
            continue
        default = defaults.get(field.name, field.default)
        kind = {"do_sample": parse_bool}.get(field.name, type(field.default))
        group.add_argument(f"--{field.name}", type=kind, default=default, help=f"default {default}")


def sampling_from(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(**{f.name: getattr(args, f.name) for f in fields(SamplingConfig) if hasattr(args, f.name)})


def parse_bool(text: str) -> bool:
    """An argparse ``type`` for true/false flags: anything else is an error, not ``False``."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def read_prompts(args: argparse.Namespace) -> tuple[list, list[Where]]:
    """Prompts from ``--prompt`` (repeatable) or ``--prompts FILE`` (any data file with a ``prompt`` field)."""
    if args.prompts:
        rows = load_rows(args.prompts)
        return [row.get("prompt") if isinstance(row, dict) else row for _, row in rows], [w for w, _ in rows]
    return list(args.prompt), [Where("--prompt", i + 1, unit="row") for i in range(len(args.prompt))]


def generate_main(argv: list[str]) -> None:
    """Completions of prompts (from --prompts FILE or --prompt TEXT) as JSONL: one row per prompt."""
    from lit_rlhf.methods.best_of_n import write_jsonl_atomic

    parser = argparse.ArgumentParser(prog="lit-rlhf generate", description=generate_main.__doc__)
    add_policy_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="a data file (.jsonl/.json/.parquet/.csv) whose rows have a `prompt` field")
    source.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    parser.add_argument("--out", default="-", help="the JSONL file to write ('-': standard output)")
    parser.add_argument("--n", type=int, default=1, help="completions per prompt (a list in `completions` when > 1)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--engine", default="hf", help="a registered rollout engine (hf, hf_static, hf_compiled, auto)")
    parser.add_argument("--chat", action="store_true",
                        help="send each text prompt as a user turn through the chat template, with its generation "
                        "prompt (as `chat` does and as conversational training rows were); without it a text "
                        "prompt is plain text, as a text `prompt` field of a dataset is")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    policy = load_policy(args.model, base=args.base, dtype=args.dtype)
    prompts, where = read_prompts(args)
    if args.chat:
        require_chat_template(policy)
    sampling = sampling_from(args)

    def rows() -> Iterator[dict]:
        sent = [[{"role": "user", "content": p}] if args.chat and isinstance(p, str) else p for p in prompts]
        repeated = [p for p in sent for _ in range(args.n)]
        batches = prompt_batches(policy, repeated, where=[w for w in where for _ in range(args.n)],
                                 batch_size=args.batch_size * args.n)
        texts = [t for batch in batches for t in sample(policy, batch, sampling, adapter=policy.adapter,
                                                        engine=args.engine)[0]]
        for i, prompt in enumerate(prompts):
            completions = texts[i * args.n : (i + 1) * args.n]
            yield {"prompt": prompt, "completion": completions[0]} if args.n == 1 else \
                {"prompt": prompt, "completions": completions}

    if args.out == "-":
        for row in rows():
            print(json.dumps(row, ensure_ascii=False))
        return
    count = write_jsonl_atomic(rows(), args.out)
    print(f"{count} rows -> {args.out}", file=sys.stderr)


def require_chat_template(policy: Policy) -> None:
    if getattr(policy.tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {policy.path} has no chat template: send plain text prompts "
                         "(`lit-rlhf generate` without --chat)")


def chat_main(argv: list[str], stdin=None, stdout=None) -> None:
    """Talk to a policy: each line you type is a user turn; the conversation so far is the prompt,
    rendered with the tokenizer's chat template. /reset clears the history, /exit (or end of input) quits."""
    parser = argparse.ArgumentParser(prog="lit-rlhf chat", description=chat_main.__doc__)
    add_policy_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message at the start of the conversation")
    add_sampling_arguments(parser, max_new_tokens=64)
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    torch.manual_seed(args.seed)
    policy = load_policy(args.model, base=args.base, dtype=args.dtype)
    require_chat_template(policy)
    sampling = sampling_from(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = stdin.isatty()
    turn = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            continue
        turn += 1
        history.append({"role": "user", "content": text})
        batch = next(prompt_batches(policy, [history], where=[Where("<chat>", turn, unit="row")]))
        reply = sample(policy, batch, sampling, adapter=policy.adapter)[0][0].strip()
        history.append({"role": "assistant", "content": reply})
        stdout.write(f"assistant> {reply}\n")
        stdout.flush()
