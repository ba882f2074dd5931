"""``lit-rlhf evaluate``: a trained policy against its reference on held-out prompts.

For every prompt, ``samples`` responses are drawn from the policy (the adapter) and from the
reference, through the rollout engine the online methods use. The reference is the starting
policy the training run used: the adapter the policy was trained from when the export records one
(``lit_rlhf.json``; e.g. the SFT adapter DPO went on from), else the base with the adapter off;
``--reference DIR`` or ``--reference base`` chooses another. Reported, for both:

- ``reward``: mean score of a reward source (a function ``module:function``, a transformers
  reward model, or a saved lit_rlhf reward adapter; the ``lit_rlhf.rollout.rewards`` sources),
  and ``win_rate``: how often the policy's i-th response outscores the reference's i-th response
  to the same prompt (ties count one half);
- ``kl``: KL(policy || reference) per response, estimated on the policy's own samples as the sum
  over response tokens of ``log pi(y_t) - log pi_ref(y_t)`` (TRL's ``objective/kl``). With
  ``--do_sample false`` the replies are greedy, not samples, so that sum estimates no KL: it is
  reported as ``log_ratio_greedy`` instead (at temperature 1, which greedy decoding ignores), with a warning;
- ``response_length``: mean tokens per response, stop token included;
- ``toy_score`` / ``toy_score_greedy``: the toy task's ground truth, when the base speaks the toy language.

Held-out prompts: ``--prompts FILE``; else the toy's held-out prompts (never trained on) when the
base is the toy; else the ``val`` data of the run's ``config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from lit_rlhf import toy
from lit_rlhf.data import Where, load_rows
from lit_rlhf.inference import POLICY, Policy, add_policy_arguments, add_sampling_arguments, load_policy, \
    prompt_batches, sample, sampling_from
from lit_rlhf.losses import token_logps
from lit_rlhf.rollout import RewardRequest, Rewards, RewardSpec, SamplingConfig

log = logging.getLogger("lit_rlhf.evaluate")


def speaks_toy(tokenizer) -> bool:
    """Whether the tokenizer's vocabulary is the toy language's (so ``toy.score`` means something)."""
    vocab = tokenizer.get_vocab()
    return len(vocab) < 200 and set(toy.vocabulary()) <= set(vocab)


def run_dir_of(model_dir: Path) -> Path | None:
    """The run (log) directory an export lives in: ``<log_dir>/export/<adapter|merged>``."""
    return model_dir.parent.parent if model_dir.parent.name == "export" else None


def held_out_prompts(policy: Policy, prompts_file: str | None) -> tuple[list, list[Where], str]:
    """The prompts to evaluate on, their provenance, and a description of where they came from."""
    if prompts_file:
        rows = load_rows(prompts_file)
        return [r.get("prompt") for _, r in rows], [w for w, _ in rows], prompts_file
    if speaks_toy(policy.tokenizer):
        _, held_out = toy.split_prompts()
        return held_out, [Where("toy held-out prompts", i + 1, unit="row") for i in range(len(held_out))], \
            "the toy task's held-out prompts"
    run = run_dir_of(policy.path)
    config = run / "config.yaml" if run else None
    if config and config.exists():
        val = (yaml.safe_load(config.read_text()).get("data") or {}).get("init_args", {}).get("val")
        if val:
            rows = [(w, r) for w, r in load_rows(val) if r.get("prompt") is not None]
            if rows:
                return [r["prompt"] for _, r in rows], [w for w, _ in rows], f"the run's val data ({val})"
    raise ValueError(f"no held-out prompts for {policy.path}: pass --prompts FILE (rows with a `prompt` field)")


def reward_specs(args: argparse.Namespace, toy_base: bool) -> list[RewardSpec]:
    specs = [RewardSpec(kind="function", function=f) for f in args.reward_function or []]
    specs += [RewardSpec(kind="model", path=p) for p in args.reward_model or []]
    if not specs and toy_base:
        specs = [RewardSpec(kind="function", function="lit_rlhf.toy:reward")]
    return specs


@torch.no_grad()
def sequence_kl(policy: Policy, rollout, temperature: float) -> torch.Tensor:
    """``(batch,)`` sum over response tokens of ``log pi - log pi_ref`` on the policy's samples."""
    bank, start = policy.bank, rollout.prompt_ids.shape[1] - 1
    width = rollout.response_ids.shape[1]

    def logps(context) -> torch.Tensor:
        with context:
            logits = bank(rollout.input_ids, rollout.attention_mask, rollout.position_ids).logits
        return token_logps(logits[:, start : start + width] / temperature, rollout.response_ids) * rollout.response_mask

    reference = bank.role(policy.reference) if policy.reference else bank.reference()
    return (logps(bank.role(POLICY)) - logps(reference)).sum(dim=1)


def evaluate(policy: Policy, prompts: list, where: list[Where], *, sampling: SamplingConfig, samples: int = 4,
             rewards: Rewards | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    """The measurements described in the module docstring, as a dict (see ``main`` for the JSON)."""
    if policy.adapter is None:
        raise ValueError(f"{policy.path} is a merged model: evaluate compares an adapter with its base (the "
                         "reference); give the adapter directory or the run directory")
    toy_base = speaks_toy(policy.tokenizer)
    if rewards is not None:
        rewards.setup(policy.bank, policy.tokenizer)
    # The log-ratio summed over a reply estimates KL(policy || reference) only on the policy's own samples.
    divergence = "kl" if sampling.do_sample else "log_ratio_greedy"
    if not sampling.do_sample:
        log.warning("evaluate: do_sample is false, so the replies are greedy: the policy's log-ratio to the reference "
                    "on them is no KL estimate, and is reported as `log_ratio_greedy` (temperature 1), not `kl`")
    repeated = [p for p in prompts for _ in range(samples)]
    repeated_where = [w for w in where for _ in range(samples)]
    results = {}
    kl = []
    for role, adapter in (("reference", policy.reference), ("policy", POLICY)):
        torch.manual_seed(seed)
        texts, lengths, scores = [], [], []
        for batch in prompt_batches(policy, repeated, where=repeated_where, batch_size=batch_size):
            completions, length, rollout = sample(policy, batch, sampling, adapter=adapter)
            texts += completions
            lengths += length.tolist()
            if rewards is not None:
                request = RewardRequest(list(batch["prompts"]), completions, rollout, batch.get("raw_prompts"))
                scores += rewards(request, update_stats=False).scores.tolist()
            if role == "policy":
                kl += sequence_kl(policy, rollout, sampling.temperature if sampling.do_sample else 1.0).tolist()
        metrics = {"response_length": sum(lengths) / len(lengths), "example": texts[0]}
        if rewards is not None:
            metrics["reward"] = sum(scores) / len(scores)
            metrics["_scores"] = scores
        if toy_base:
            metrics["toy_score"] = sum(toy.score(t) for t in texts) / len(texts)
            greedy = [t for batch in prompt_batches(policy, prompts, where=where, batch_size=batch_size)
                      for t in sample(policy, batch, sampling.greedy(), adapter=adapter)[0]]
            metrics["toy_score_greedy"] = sum(toy.score(t) for t in greedy) / len(greedy)
        results[role] = metrics
    reference = str(policy.bank.adapters[policy.reference].path) if policy.reference else "base"
    out = {"model": str(policy.path), "reference_model": reference, "prompts": len(prompts), "samples_per_prompt": samples,
           "sampling": asdict(sampling),
           divergence: sum(kl) / len(kl)}
    if rewards is not None:
        ours, theirs = results["policy"].pop("_scores"), results["reference"].pop("_scores")
        out["win_rate"] = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)
        out["reward_sources"] = [s.name for s in rewards.sources]
    out.update(results)
    return out


def table(result: dict) -> str:
    """The result as a small text table."""
    rows = [("reward (mean)", "reward", "+"), ("toy score, sampled", "toy_score", "+"),
            ("toy score, greedy", "toy_score_greedy", "+"), ("response length", "response_length", "")]
    lines = [f"{'':<22}{'reference':>12}{'policy':>12}"]
    for label, key, sign in rows:
        if key in result["policy"]:
            lines.append(f"{label:<22}{result['reference'][key]:>{sign}12.3f}{result['policy'][key]:>{sign}12.3f}")
    if "win_rate" in result:
        lines.append(f"{'win rate vs reference':<22}{'':>12}{result['win_rate']:>12.3f}")
    label, key = ("KL to reference", "kl") if "kl" in result else ("log-ratio, greedy", "log_ratio_greedy")
    lines.append(f"{label:<22}{'':>12}{result[key]:>12.3f}")
    lines.append(f"e.g. reference: {result['reference']['example']!r}   policy: {result['policy']['example']!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    """Compare a trained policy with its reference on held-out prompts; print a table, write JSON."""
    parser = argparse.ArgumentParser(prog="lit-rlhf evaluate", description=main.__doc__)
    add_policy_arguments(parser)
    parser.add_argument("--reference", default=None,
                        help="the reference: an adapter directory, or `base` (default: the adapter the policy was "
                        "trained from, as its export records, else the base)")
    parser.add_argument("--prompts", default=None, help="held-out prompts (rows with a `prompt` field); see above")
    parser.add_argument("--samples", type=int, default=4, help="sampled responses per prompt and role")
    parser.add_argument("--reward_function", action="append", help="a reward function module:function (repeatable)")
    parser.add_argument("--reward_model", action="append",
                        help="a transformers reward model or a saved lit_rlhf reward adapter directory (repeatable)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default=None, help="the JSON to write (default: evaluation.json in the run directory, "
                        "or in the current directory)")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)

    policy = load_policy(args.model, base=args.base, dtype=args.dtype, reference=args.reference)
    prompts, where, origin = held_out_prompts(policy, args.prompts)
    specs = reward_specs(args, speaks_toy(policy.tokenizer))
    result = evaluate(policy, prompts, where, sampling=sampling_from(args), samples=args.samples,
                      rewards=Rewards(specs) if specs else None, batch_size=args.batch_size, seed=args.seed)
    result["prompts_from"] = origin
    out = Path(args.out) if args.out else (run_dir_of(policy.path) or Path(".")) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{policy.path} vs reference {result['reference_model']}: {len(prompts)} prompts from {origin}, "
          f"{args.samples} samples each")
    print(table(result))
    print(f"-> {out}")
    return result
