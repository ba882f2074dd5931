"""The static-cache engine (hf_static): the tokens of ``hf`` when greedy, the distribution of
transformers' warpers when sampling, early stop, bucketing, the fallback to ``hf``."""

import logging

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lit_rlhf.models import AdapterBank, AdapterSpec, BankSpec
from lit_rlhf.rollout import SamplingConfig, build_engine
from lit_rlhf.rollout.engine import AutoEngine, HFStaticCacheEngine, choose_tokens, warp_logits
from lit_rlhf.toy.families import FAMILIES, build_tiny

# Different lengths: the batch is left-padded, and bucketing pads it further.
PROMPTS = ["the book was", "i think the park is really", "my review of the coffee : it was", "honestly"]


def encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def greedy(tokenizer, max_new_tokens=12, **kw):
    return SamplingConfig(do_sample=False, max_new_tokens=max_new_tokens, **kw).resolved(tokenizer)


class NoFallback:
    """Stands in for the hf fallback where the fast path must run."""

    def generate(self, *args):
        raise AssertionError("hf_static fell back to hf")


def fast_engine(**kw) -> HFStaticCacheEngine:
    engine = HFStaticCacheEngine(**kw)
    engine.fallback = NoFallback()
    return engine


@pytest.fixture(scope="module")
def family_banks(tmp_path_factory, tokenizer):
    """A tiny random model of each family with a LoRA policy whose weights are not zero (so it
    differs from the base)."""
    root = tmp_path_factory.mktemp("families")
    banks = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        bank = AdapterBank(BankSpec(model=str(build_tiny(family, root / family)), adapters=[AdapterSpec("policy")])).eval()
        with torch.no_grad():
            for name, p in bank.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        banks[family] = bank
    return banks


@pytest.mark.parametrize("copies", [1, 2], ids=["distinct", "shared"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_are_those_of_hf_on_every_family(family, copies, family_banks, tokenizer):
    bank = family_banks[family]
    # copies=2: each prompt on two rows, as num_samples_per_prompt lays them out (prefilled once, shared).
    ids, mask = encode(tokenizer, [p for p in PROMPTS for _ in range(copies)])
    # Past gemma2's and mistral's 16-token sliding window, with a prompt bucket wider than the window.
    sampling = greedy(tokenizer, max_new_tokens=20, stop_token_ids=[tokenizer.eos_token_id])
    policy, reference = (build_engine("hf").generate(bank, adapter, ids, mask, sampling) for adapter in ("policy", None))
    assert not torch.equal(policy.response_ids, reference.response_ids), "the adapter must change the responses"
    engine = fast_engine()
    assert torch.equal(engine.generate(bank, "policy", ids, mask, sampling).response_ids, policy.response_ids)
    assert torch.equal(engine.generate(bank, None, ids, mask, sampling).response_ids, reference.response_ids)
    assert bank.active == "policy"


@pytest.mark.parametrize("bucket", [1, 7])
def test_bucketing_and_a_reused_cache_do_not_change_greedy_output(bucket, bank, tokenizer):
    engine = fast_engine(bucket=bucket, keep_cache=True)  # as a compiled step pads and keeps its cache
    ids, mask = encode(tokenizer, PROMPTS)
    expected = build_engine("hf").generate(bank, "policy", ids, mask, greedy(tokenizer))
    for prompts in (PROMPTS, PROMPTS[:1] * 4, PROMPTS):  # the cache is reused, shorter then longer
        ids, mask = encode(tokenizer, prompts)
        got = engine.generate(bank, "policy", ids, mask, greedy(tokenizer))
        want = build_engine("hf").generate(bank, "policy", ids, mask, greedy(tokenizer))
        assert torch.equal(got.response_ids, want.response_ids)
        assert torch.equal(got.response_mask, want.response_mask) and torch.equal(got.ended, want.ended)
    assert torch.equal(got.response_ids, expected.response_ids)


def test_an_eager_decode_pads_no_prompt_and_attends_over_no_spare_cache(bank, tokenizer):
    # Padding serves a compiled step's shapes only; eagerly, every padded slot costs prefill and attention.
    ids, mask = encode(tokenizer, PROMPTS)
    seen = []
    hook = bank.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], kwargs["cache"].get_max_length())),
        with_kwargs=True)
    try:
        fast_engine().generate(bank, "policy", ids, mask, greedy(tokenizer, max_new_tokens=5))
    finally:
        hook.remove()
    prompt_len = ids.shape[1]
    assert seen[0] == (prompt_len, prompt_len + 5)  # the prefill: the batch's own width, a cache of exactly its need
    assert all(width == 1 and capacity == prompt_len + 5 for width, capacity in seen[1:])


def count_forwards(bank):
    calls = []
    hook = bank.model.get_base_model().register_forward_hook(lambda *args: calls.append(1))
    return calls, hook


def test_an_eager_cpu_decode_step_attends_through_eager_attention_and_gives_sdpa_back(bank, tokenizer):
    # One query token: transformers' eager attention, faster on CPU than sdpa's flash kernel; the prefill keeps sdpa.
    net = bank.model.get_base_model()
    assert net.config._attn_implementation == "sdpa"
    attention = next(m for m in net.modules() if type(m).__name__.endswith("Attention"))
    seen = []
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], module.config._attn_implementation)),
        with_kwargs=True)
    try:
        fast_engine().generate(bank, "policy", *encode(tokenizer, PROMPTS), greedy(tokenizer, max_new_tokens=6))
    finally:
        handle.remove()
    decode = [implementation for width, implementation in seen if width == 1]
    assert [implementation for width, implementation in seen if width > 1] == ["sdpa"]
    assert decode and set(decode) == {"eager"}
    assert net.config._attn_implementation == "sdpa"


def test_generation_stops_when_every_row_has_stopped(bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    sampling = greedy(tokenizer, max_new_tokens=40)
    expected = build_engine("hf").generate(bank, "policy", ids, mask, sampling)
    longest = int(expected.response_lengths.max())
    assert expected.ended.all() and longest < 40, "the toy model ends these prompts early"
    for every in (1, 4):
        calls, hook = count_forwards(bank)
        try:
            got = fast_engine(stop_check_every=every).generate(bank, "policy", ids, mask, sampling)
        finally:
            hook.remove()
        # A prefill and one forward per further token, up to the next stop check.
        assert longest <= len(calls) <= longest + every - 1 < 40
        assert torch.equal(got.response_ids, expected.response_ids)


def test_a_row_cut_at_max_new_tokens_is_not_ended(bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    sampling = greedy(tokenizer, max_new_tokens=2)
    got = fast_engine(stop_check_every=2).generate(bank, "policy", ids, mask, sampling)
    want = build_engine("hf").generate(bank, "policy", ids, mask, sampling)
    assert got.response_ids.shape[1] == 2 and not got.ended.any()
    assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_k=10_000), dict(top_p=0.8),
                                dict(top_p=0.0001), dict(temperature=1.3, top_k=20, top_p=0.9)])
def test_warped_logits_are_transformers_warpers(kw):
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    logits[:, 10:14] = logits[:, :1]  # ties, at the top-k and top-p boundaries too
    logits[1] = 0.0  # a flat row
    sampling = SamplingConfig(**kw)
    warpers = []  # in generate's order (GenerationMixin._get_logits_processor)
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    expected = logits
    for warper in warpers:
        expected = warper(None, expected)
    assert torch.equal(warp_logits(logits, sampling), expected)


def test_sampled_first_tokens_follow_the_warped_softmax(bank, tokenizer):
    """Frequencies of 50 000 draws of the toy model's first token against the probabilities from
    transformers' warpers: every token within 5 standard errors. The unwarped softmax lies outside
    them (the check has the power to tell the two apart)."""
    n = 50_000
    ids, mask = encode(tokenizer, ["the book was"])
    with bank.role("policy"), torch.no_grad():
        logits = bank(ids, mask).logits[0, -1].float()
    sampling = SamplingConfig(temperature=0.7, top_p=0.8)
    expected = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, logits[None]))[0].double().softmax(-1)
    torch.manual_seed(0)
    freq = torch.bincount(choose_tokens(logits.expand(n, -1), sampling), minlength=logits.shape[0]).double() / n

    def within_5_standard_errors(p):
        return bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all())

    assert within_5_standard_errors(expected)
    assert not within_5_standard_errors(logits.double().softmax(-1))


def test_seeded_sampling_is_reproducible_and_the_seed_matters(bank, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS * 3)
    for kw in (dict(), dict(temperature=0.8, top_k=8, top_p=0.9)):
        sampling = SamplingConfig(max_new_tokens=12, **kw).resolved(tokenizer)
        out = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            out.append(fast_engine().generate(bank, "policy", ids, mask, sampling).response_ids)
        assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_the_inverse_cdf_draw_matches_hand_computed_frequencies():
    """Probabilities (0.5, 0.3, 0, 0.2, 0): 200 000 draws land within 5 standard errors of each, never on a
    removed token, whatever its place (first, middle, last)."""
    n = 200_000
    probs = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64)
    logits = probs.log().float().expand(n, -1)
    torch.manual_seed(0)
    freq = torch.bincount(choose_tokens(logits, SamplingConfig()), minlength=6).double() / n
    assert freq[[0, 3, 5]].sum() == 0
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all(), freq


def test_models_the_loop_cannot_drive_fall_back_to_hf_logged_once(bank, tokenizer, caplog, monkeypatch):
    net = bank.model.get_base_model()
    monkeypatch.setattr(net, "_can_compile_fullgraph", False)
    ids, mask = encode(tokenizer, PROMPTS)
    engine = HFStaticCacheEngine()
    calls = []
    plain = engine.fallback.generate
    engine.fallback.generate = lambda *args, **kwargs: calls.append(1) or plain(*args, **kwargs)
    with caplog.at_level(logging.INFO, logger="lit_rlhf.rollout"):
        for _ in range(2):
            got = engine.generate(bank, "policy", ids, mask, greedy(tokenizer))
    assert len(calls) == 2
    assert [r.getMessage() for r in caplog.records if "hf_static" in r.getMessage()] == [
        f"rollout engine hf_static: transformers does not run {type(net).__name__} with a static cache "
        "(_can_compile_fullgraph); generating with the hf engine"
    ]
    assert torch.equal(got.response_ids, build_engine("hf").generate(bank, "policy", ids, mask, greedy(tokenizer)).response_ids)


def test_auto_picks_hf_static_on_cuda_and_the_measured_engine_on_cpu(bank, tokenizer, monkeypatch):
    from lit_rlhf.rollout import engine as engine_module

    auto = build_engine("auto")
    assert isinstance(auto, AutoEngine)
    used = []
    for name, engine in auto.engines.items():
        monkeypatch.setattr(engine, "generate", lambda *args, name=name, **kwargs: used.append(name))
    ids, mask = encode(tokenizer, PROMPTS)
    auto.generate(bank, "policy", ids, mask, greedy(tokenizer))
    assert used == [engine_module.CPU_ENGINE]
    cuda_like = type("Ids", (), {"device": torch.device("cuda")})()  # only the device is read
    auto.generate(bank, "policy", cuda_like, mask, greedy(tokenizer))
    assert used[-1] == "hf_static"


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature > 0"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    SamplingConfig(temperature=0.0, do_sample=False)  # greedy ignores the warpers


def test_sharded_parameters_fall_back_to_hf_and_zero3_accepts_auto(bank, monkeypatch):
    from lit_rlhf.rollout.engine import static_decode_unsupported
    from lit_rlhf.strategies import check_scale_support

    net = bank.model.get_base_model()
    assert static_decode_unsupported(net) is None
    monkeypatch.setattr(next(net.parameters()), "ds_id", 0, raising=False)  # as DeepSpeed ZeRO-3 tags its partitions
    assert "sharded" in static_decode_unsupported(net)
    check_scale_support("PPO", kind="deepspeed", stage=3, generates=True, manual_optimization=True, train_mode="lora",
                        engine="auto", accelerator="cuda")


def test_hf_compiled_compiles_the_decode_step_on_cpu_where_hf_static_does_not(bank):
    # The choice alone (torch.compile is lazy: nothing compiles until the step runs).
    net, cpu = bank.model.get_base_model(), torch.device("cpu")
    eager, compiled = build_engine("hf_static"), build_engine("hf_compiled")
    assert isinstance(compiled, HFStaticCacheEngine)
    eager._step(net, cpu, sliding=False)
    compiled._step(net, cpu, sliding=False)
    assert net not in eager._steps and net in compiled._steps  # only compiled steps are kept
    compiled._steps.clear()
    assert compiled._step(net, cpu, sliding=True) is not None and net not in compiled._steps  # sliding: eager


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_tokens_of_the_eager_one(bank, tokenizer):
    """torch.compile of the decode step (what CUDA runs; on CPU the ``hf_compiled`` engine, with inductor):
    minutes to compile. Greedy: the tokens of hf too; seeded sampling: the draws of the eager loop."""
    ids, mask = encode(tokenizer, PROMPTS)
    engine = build_engine("hf_compiled")
    engine.fallback = NoFallback()
    for sampling, anchor in ((greedy(tokenizer), build_engine("hf")),
                             (SamplingConfig(max_new_tokens=12).resolved(tokenizer), fast_engine())):
        out = []
        for e in (anchor, engine):
            torch.manual_seed(5)
            out.append(e.generate(bank, "policy", ids, mask, sampling).response_ids)
        assert torch.equal(*out)
