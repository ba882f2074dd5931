"""The online loop on tiny models of real families, speaking their tokenizers and chat templates
(tests/data/real_tokenizers.py): the log-probs a rollout was sampled with are the ones the loop
recomputes for it, token by token, whatever the family does on the way (sliding-window layers longer
rollouts outrun, soft-capped logits, tied heads, a LoRA on the tied LM head and input embedding); and on
a hand-made Llama-3 rollout (pad == EOS, turns closed by <|eot_id|>, a reply cut at max_new_tokens) PPO's
rewards, values, returns and advantages, Online DPO's and best-of-n's losses, each from the rows run alone;
in bfloat16, the forwards whose log-probs are compared (behaviour and update, policy and reference) run
alike, so the first ratio is 1 and a fresh policy's KL 0 exactly; and on-policy GKD's rows and loss."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lit_rlhf.rollout.engine as engine_module
from lit_rlhf.data import PromptDataModule
from lit_rlhf.methods import GRPO, PPO, BestOfN, OnlineDPO
from lit_rlhf.methods.online import ScoredRollout
from lit_rlhf.models import BankSpec, LoraSpec, eval_mode
from lit_rlhf.rollout import RewardSpec, SamplingConfig, truncate_at_stop
from lit_rlhf.toy.families import FAMILIES as ARCHITECTURES
from tests.data.real_tokenizers import build_family
from tests.methods.online_helpers import first_batch, lora_off_zero, perturbed
from tests.methods.tiny_families import build_families

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 24  # past the tiny Gemma 2 / Mistral sliding window (16) with every prompt
REWARD = [RewardSpec("function", function="lit_rlhf.toy:reward")]
QUESTIONS = ["what is the capital of france ?", "hello there , how are you today ? please write a short poem .", "hi"]


def tiny_model(architecture: str, family: str, root) -> str:
    """A random tiny ``architecture`` model over tokenizer ``family``'s vocabulary, saved with it."""
    tok = build_family(family, root / "tokenizers")
    config = AutoConfig.for_model(architecture, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **ARCHITECTURES[architecture])
    torch.manual_seed(0)
    out = root / f"{architecture}-{family}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def chat_prompts(path, family: str) -> str:
    """Conversational prompts of three lengths, one with a system turn where the template takes one."""
    rows = []
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        if i == 1 and family not in ("gemma2", "mistral"):  # their templates refuse a system turn
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant ."})
        rows.append({"prompt": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sampled_logits(monkeypatch) -> list[torch.Tensor]:
    """The ``(batch, vocab)`` logits each decode step of the ``hf_static`` engine sampled from, in order."""
    steps = []
    choose = engine_module.choose_tokens

    def recording(logits, sampling):
        steps.append(logits.clone())
        return choose(logits, sampling)

    monkeypatch.setattr(engine_module, "choose_tokens", recording)
    return steps


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
@pytest.mark.parametrize(("architecture", "family", "targets"), [
    ("gemma2", "gemma2", "all-linear"),      # sliding window, soft-capped logits, no system turn
    ("mistral", "mistral", "all-linear"),    # sliding window, pad == EOS
    ("llama", "llama3", "all-linear"),       # EOS <|end_of_text|> == pad, turns end with <|eot_id|>
    # A LoRA on Qwen2's tied LM head and its input embedding: peft wraps the embedding (no
    # num_embeddings), which the forward probes read, and merging either for generation would move both.
    ("qwen2", "qwen2.5", ["q_proj", "v_proj", "lm_head", "embed_tokens"]),
])
def test_behaviour_log_probs_are_the_sampling_distributions(tmp_path, sampled_logits, architecture, family, targets):
    pl.seed_everything(0)
    method = GRPO(bank=BankSpec(model=tiny_model(architecture, family, tmp_path),
                                lora=LoraSpec(r=4, alpha=8, target_modules=targets)),
                  rewards=REWARD, engine="hf_static", beta=0.1, num_samples_per_prompt=2, update_epochs=2,
                  sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE))
    method.configure_model()
    lora_off_zero(method.bank, 0.3)
    data = PromptDataModule(train=chat_prompts(tmp_path / "prompts.jsonl", family), batch_size=3, max_length=128)
    batch = next(iter(data.prepare(method.tokenizer).train_dataloader()))

    scored = method.rollout_and_score(batch)

    rollout = scored.rollout
    assert rollout.prompt_mask.sum(1).min() + MAX_NEW_TOKENS > ARCHITECTURES["mistral"]["sliding_window"]
    logits = torch.stack(sampled_logits[: rollout.response_ids.shape[1]], dim=1)
    sampled = (logits / TEMPERATURE).log_softmax(-1).gather(-1, rollout.response_ids[..., None])[..., 0]
    torch.testing.assert_close(scored.old_logprobs, sampled * rollout.response_mask, atol=1e-5, rtol=0)
    assert (scored.old_logprobs - scored.ref_logprobs).abs().max() > 0.1  # the policy is off its reference


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
def test_the_forward_probes_run_with_a_lora_on_the_input_embedding(tmp_path):
    """Head selection, the fused head and padding-free packing are probed on a tiny batch of vocabulary
    ids (DPO's forwards); peft's LoRA embedding has no ``num_embeddings`` to size it with."""
    from lit_rlhf.methods import DPO
    from lit_rlhf.models.packing import packing_unsupported

    method = DPO(bank=BankSpec(model=tiny_model("qwen2", "qwen2.5", tmp_path),
                               lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"])))
    method.configure_model()
    assert method.uses_head_selection() and method.uses_fused_head()
    with method.bank.role("policy"):
        assert packing_unsupported(method.bank) is None


# -- a hand-made rollout on Llama-3's conventions: pad == EOS, turns end with <|eot_id|> -----------------


def llama3_rollout(tok):
    """Four rows, two prompts (a chat one and a plain one, left-padded to one width), two samples each:
    a reply closed by ``<|eot_id|>`` with other tokens after it (cut), one closed by a real EOS (the pad id)
    and followed by padding, one cut at max_new_tokens (no stop), one closed by ``<|eot_id|>``."""
    sampling = SamplingConfig(max_new_tokens=7).resolved(tok)
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    assert sampling.pad_token_id == eos and sampling.stop_token_ids == [eos, eot]

    def words(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    chat = words(tok.apply_chat_template([{"role": "user", "content": "what is the capital of france ?"}],
                                         add_generation_prompt=True, tokenize=False))
    plain = tok("hello there")["input_ids"]
    width = max(len(chat), len(plain))
    prompts = [chat, chat, plain, plain]
    prompt_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    replies = [words(" paris .")[:3] + [eot], words(" the capital")[:4] + [eos], words(" how are you today ?")[:7],
               words(" hi .")[:2] + [eot]]
    after = words(" the dog slept in the sun .")
    raw = torch.tensor([(r + after)[:7] for r in replies[:1]] + [r + [eos] * (7 - len(r)) for r in replies[1:]])
    rollout = truncate_at_stop(prompt_ids, prompt_mask, raw, sampling.stop_token_ids, sampling.pad_token_id)
    lengths = [len(r) for r in replies]
    assert rollout.response_lengths.tolist() == lengths and lengths[2] == 7
    assert rollout.ended.tolist() == [True, True, False, True]
    return rollout


def alone(method, rollout, i: int, role: str | None, temperature: float, values: str | None = None):
    """Row ``i`` run alone, without padding: ``(n,)`` log-probs of its ``n`` response tokens at ``temperature``
    under ``role`` (``None``: the reference), and the critic's values at the positions before each of them."""
    prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
    n = int(rollout.response_lengths[i])
    response = rollout.response_ids[i, :n]
    ids = torch.cat([prompt, response])[None]
    ones = torch.ones_like(ids)
    here = slice(len(prompt) - 1, len(prompt) + n - 1)  # the positions predicting the response tokens
    with torch.no_grad(), eval_mode(method.bank), (method.bank.role(role) if role else method.bank.reference()):
        logits = method.bank(ids, ones).logits[0, here].float()
        value = None
        if values == "shared":
            value = method.bank.logits_and_values(ids, ones, adapter=role)[1][0, here]
        elif values == "adapter":
            value = method.bank.values(ids, ones, adapter="value")[0, here]
    logprobs = (logits / temperature).log_softmax(-1).gather(-1, response[:, None])[:, 0]
    return logprobs, value


def online_method(cls, tmp_path, architecture="llama", **kwargs):
    method = cls(bank=BankSpec(model=tiny_model(architecture, "llama3", tmp_path), lora=LoraSpec(r=4, alpha=8)),
                 rewards=REWARD, engine="hf", sampling=SamplingConfig(max_new_tokens=7, temperature=TEMPERATURE),
                 **kwargs)
    method.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in method.bank.named_parameters():
            if "lora_B" in name or "heads." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return method


SCORES = torch.tensor([1.0, -0.5, 0.3, 0.3])


# GPT-2's absolute positions: a left-padded row read at other positions than alone would show.
@pytest.mark.parametrize(("architecture", "critic"), [("llama", "adapter"), ("gpt2", "shared")])
def test_ppo_targets_by_hand_on_a_pad_is_eos_rollout(tmp_path, architecture, critic):
    """Rewards, values, GAE returns and whitened advantages of each row over exactly its response tokens
    (the stop token once, whichever it is; all 7 of the cut row), from the row run alone: the KL penalty on
    every token, the score on the last one, the critic read before each token, V = 0 after the last."""
    beta, gamma, lam = 0.2, 0.9, 0.8
    method = online_method(PPO, tmp_path, architecture, critic=critic, kl_coef=beta, gamma=gamma, lam=lam)
    tok = method.tokenizer
    rollout = llama3_rollout(tok)
    with torch.no_grad(), eval_mode(method.bank):
        behaviour = method.policy_forward(rollout)
        values = behaviour.values if critic == "shared" else method.critic_values(rollout)
        scored = ScoredRollout(rollout, ["p"] * 4, ["c"] * 4, SCORES, {}, behaviour.logprobs,
                               method.reference_logprobs(rollout), values)
    targets = method.compute_advantages(scored)

    raw_advantages = []
    for i, n in enumerate(rollout.response_lengths.tolist()):
        logprobs, value = alone(method, rollout, i, "policy", TEMPERATURE, values=critic)
        reference, _ = alone(method, rollout, i, None, TEMPERATURE)
        rewards = -beta * (logprobs - reference)
        rewards[-1] += SCORES[i]
        advantages, next_value, next_advantage = torch.zeros(n), 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[t] + gamma * next_value - value[t]
            advantages[t] = next_advantage = delta + gamma * lam * next_advantage
            next_value = value[t]
        raw_advantages.append(advantages)
        for name, expected in (("kl", logprobs - reference), ("values", value), ("returns", advantages + value)):
            got = getattr(targets, name)[i]
            torch.testing.assert_close(got[:n], expected, atol=1e-5, rtol=1e-5, msg=f"{name} of row {i}")
            assert not got[n:].any(), f"{name} of row {i} past its response"
    flat = torch.cat(raw_advantages)
    whitened = (flat - flat.mean()) / (flat.var() + 1e-8).sqrt()
    torch.testing.assert_close(targets.advantages[rollout.response_mask.bool()], whitened, atol=1e-4, rtol=1e-4)


def test_online_dpo_and_best_of_n_losses_by_hand_on_a_pad_is_eos_rollout(tmp_path):
    """Online DPO's pairs (rows 0/1: the EOS-closed reply loses; rows 2/3 tie, weight 0) and best-of-n's SFT
    tokens (rows 0 and 2, the best of each prompt, at temperature 1) summed over exactly the response tokens."""
    beta = 0.1
    dpo = online_method(OnlineDPO, tmp_path, beta=beta)
    rollout = llama3_rollout(dpo.tokenizer)

    def loss_of(method, logprobs=None):
        with torch.no_grad(), eval_mode(method.bank):
            reference = method.reference_logprobs(rollout) if method.uses_reference() else None
            scored = ScoredRollout(rollout, ["p"] * 4, ["c"] * 4, SCORES, {}, logprobs, reference)
            targets = method.compute_advantages(scored)
            rows = torch.arange(4)
            batch = method.select(scored, targets, rows, step_rows=4,
                                  step_tokens=method.step_weights(scored, targets).sum())
            return method.policy_loss(batch)[0]

    sums = {role: [alone(dpo, rollout, i, role, TEMPERATURE)[0].sum() for i in range(2)] for role in ("policy", None)}
    margin = (sums["policy"][0] - sums[None][0]) - (sums["policy"][1] - sums[None][1])
    torch.testing.assert_close(loss_of(dpo), -torch.nn.functional.logsigmoid(beta * margin), atol=1e-5, rtol=1e-5)

    best_of_n = online_method(BestOfN, tmp_path / "bon", num_samples_per_prompt=2)
    kept = [alone(best_of_n, rollout, i, "policy", 1.0)[0] for i in (0, 2)]
    expected = -torch.cat(kept).sum() / sum(len(k) for k in kept)
    torch.testing.assert_close(loss_of(best_of_n), expected, atol=1e-5, rtol=1e-5)


# -- bfloat16 with gradient checkpointing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_families(tmp_path_factory) -> dict[str, str]:
    return build_families(tmp_path_factory.mktemp("families"), ["qwen2", "gpt2"])


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_first_ratio_is_one_in_bfloat16_under_gradient_checkpointing(toy_families, family):
    """The update's forward (with gradient) cannot share prompts under gradient checkpointing, so the
    behaviour forward (without) must not either: in bfloat16 the two ways of running the rows round
    differently (the first log-ratio was off by up to 2.4e-3 here, noise the clipping then saw)."""
    pl.seed_everything(0)
    method = GRPO(bank=BankSpec(model=toy_families[family], lora=LoraSpec(r=4, alpha=8), dtype="bfloat16",
                                gradient_checkpointing=True),
                  rewards=REWARD, engine="hf", beta=0.1, num_samples_per_prompt=4, update_epochs=2,
                  sampling=SamplingConfig(max_new_tokens=16, temperature=TEMPERATURE))
    perturbed(method)
    assert not method.fuses_behaviour_pass() and method.shares_prompts()
    scored = method.rollout_and_score(first_batch(method))
    method.bank.train()
    update = method.policy_forward(scored.rollout)  # what the first micro-batch's loss reads
    assert update.logprobs.requires_grad
    assert torch.equal(update.logprobs.detach(), scored.old_logprobs)


@pytest.mark.parametrize(("cls", "options"), [(PPO, dict(critic="shared")), (GRPO, dict(beta=0.1, entropy_coef=0.01))])
def test_reference_log_probs_are_the_policys_while_it_is_the_reference_in_bfloat16(toy_families, cls, options):
    """A fresh LoRA policy is its reference: the KL penalty starts at exactly 0 also where the policy's forward
    keeps its logits (PPO's shared critic, GRPO's entropy bonus) and the model would allow the reference a
    fused LM head, whose float32 products round otherwise than bfloat16 logits (3.9e-3 per token before)."""
    pl.seed_everything(0)
    method = cls(bank=BankSpec(model=toy_families["qwen2"], lora=LoraSpec(r=4, alpha=8), dtype="bfloat16"),
                 rewards=REWARD, engine="hf", num_samples_per_prompt=2, update_epochs=2,
                 sampling=SamplingConfig(max_new_tokens=16, temperature=TEMPERATURE), **options)
    method.configure_model()
    assert method.uses_fused_head() and not method.fuses_policy_head()
    scored = method.rollout_and_score(first_batch(method))
    assert torch.equal(scored.old_logprobs, scored.ref_logprobs)


# -- GKD on-policy --------------------------------------------------------------------------------------


def test_gkd_on_policy_rows_are_the_templates_prompt_and_the_reply_for_both_models(tmp_path):
    """On-policy GKD on Llama-3 chat rows (pad == EOS) with a separate teacher of the family: student and teacher
    read the template's generation prompt (one BOS) and the student's reply, and the divergence is summed over
    exactly the reply's tokens, as for each row run alone."""
    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.losses import generalized_jsd_loss
    from lit_rlhf.methods import GKD
    from lit_rlhf.models import TeacherSpec

    student = tiny_model("llama", "llama3", tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    teacher.save_pretrained(tmp_path / "teacher")
    tok = build_family("llama3", tmp_path)
    tok.save_pretrained(tmp_path / "teacher")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "paris ."}]}
            for q in QUESTIONS]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pl.seed_everything(0)
    bank = BankSpec(model=student, lora=LoraSpec(r=4, alpha=8), teacher=TeacherSpec(str(tmp_path / "teacher")))
    method = GKD(bank=bank,
                 lmbda=1.0, beta=0.3, temperature=0.9, engine="hf_static",
                 # The EOS (the pad), the turn end and a third of the vocabulary stop: replies end before padding.
                 sampling=SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, stop_token_ids=[
                     tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"), *range(100, 400, 3)]))
    method.configure_model()
    batch = next(iter(SFTDataModule(train=str(tmp_path / "sft.jsonl"), batch_size=3, max_length=128)
                      .prepare(tok).train_dataloader()))

    sequences, source = method.training_sequences(batch)
    student_logits, teacher_logits, mask = method.aligned_logits(sequences)
    loss = generalized_jsd_loss(student_logits, teacher_logits, mask, beta=0.3, temperature=0.9, reduction="sum")

    assert source == "student"
    lengths = sequences.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max()  # padding after a reply that ended
    prompts = {tuple(tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)["input_ids"])
               for q in QUESTIONS}
    expected, seen = 0.0, set()
    for i in range(len(QUESTIONS)):  # the batch is shuffled
        ids = sequences.input_ids[i][sequences.attention_mask[i].bool()]
        reply = sequences.completion_mask[i][sequences.attention_mask[i].bool()].bool()
        seen.add(tuple(ids[~reply].tolist()))
        assert reply.sum() == sequences.completion_mask[i].sum() > 0 and reply[-int(reply.sum()):].all()
        with torch.no_grad():
            with method.bank.role("policy"):
                alone_student = method.bank(ids[None], torch.ones_like(ids)[None]).logits
            with method.bank.teacher():
                alone_teacher = method.bank(ids[None], torch.ones_like(ids)[None]).logits
        expected += generalized_jsd_loss(alone_student[:, :-1], alone_teacher[:, :-1], reply[None, 1:].long(),
                                         beta=0.3, temperature=0.9, reduction="sum")
    assert seen == prompts and mask.sum() == sequences.completion_mask.sum()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
