"""The data layer on tokenizers with real families' conventions (tests/data/real_tokenizers.py):
BOS counts, where the prompt ends and what the completion holds, EOS on plain text, pad == eos."""

from __future__ import annotations

import copy

import pytest

from lit_rlhf.data import PackingCollator, SFTCollator, Where, pad_token_id_of
from lit_rlhf.data.formats import DataError
from lit_rlhf.data.tokenize import build_examples
from tests.data.real_tokenizers import CHAT_FAMILIES, FAMILIES, build_family

USER = [{"role": "user", "content": "what is the capital of france ?"}]
PARIS = [{"role": "assistant", "content": "paris ."}]
SEA = [{"role": "assistant", "content": "the sea ."}]

#: What each template renders to open the assistant's turn (the generation prompt) ...
GENERATION_PROMPT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2.5": "<|im_start|>assistant\n",
                     "qwen2.5_base": "<|im_start|>assistant\n",
                     "gemma2": "<start_of_turn>model\n", "mistral": " [/INST]", "llama2": " [/INST]"}
#: ... and after the assistant's content, up to the end-of-turn token a rollout stops at ...
TURN_END = {"llama3": ["<|eot_id|>"], "qwen2.5": ["<|im_end|>"], "qwen2.5_base": ["<|im_end|>"],
            "gemma2": ["<end_of_turn>"], "mistral": ["</s>"], "llama2": ["▁", "</s>"]}
#: ... and what the template writes after that token, left out of the completion.
AFTER_TURN = {"qwen2.5": "\n", "qwen2.5_base": "\n", "gemma2": "\n"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_tokenizers")
    return {name: build_family(name, root) for name in FAMILIES}


def one(fmt: str, row: dict, tokenizer) -> dict:
    examples, errors = build_examples(fmt, [(Where("data.jsonl", 1, "line"), row)], tokenizer)
    assert not errors, errors
    return examples[0]


def chat_ids(tokenizer, messages: list[dict], generation: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation,
                                              return_dict=False))


CHAT_ROWS = {
    "sft": ({"messages": USER + PARIS}, ["completion_ids"]),
    "preference": ({"prompt": USER, "chosen": PARIS, "rejected": SEA}, ["chosen_ids", "rejected_ids"]),
    "preference_implicit": ({"chosen": USER + PARIS, "rejected": USER + SEA}, ["chosen_ids", "rejected_ids"]),
    "unpaired": ({"prompt": USER, "completion": PARIS, "label": True}, ["completion_ids"]),
    "prompt": ({"prompt": USER}, []),
}


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_rows_are_the_templates_own_tokens(tokenizers, family):
    """Every conversational format: prompt ids are the template's generation-prompt rendering (same BOS
    count as ``apply_chat_template(tokenize=True)``: one for Llama-3, Gemma, Mistral, Llama-2 whose
    templates write it, although their tokenizers add one too; none for Qwen2.5), ending with the
    generation prompt; prompt + completion is the template's whole conversation but for the
    whitespace Qwen's and Gemma's templates write after the turn end; the completion is the
    assistant's content and its end-of-turn token."""
    tok = tokenizers[family]
    bos_count = 0 if family.startswith("qwen") else 1
    prompt_ref = chat_ids(tok, USER, generation=True)
    generation = tok(GENERATION_PROMPT[family], add_special_tokens=False)["input_ids"]
    assert prompt_ref.count(tok.bos_token_id) == bos_count if tok.bos_token_id is not None else bos_count == 0
    for fmt, (row, keys) in CHAT_ROWS.items():
        example = one(fmt.removesuffix("_implicit"), row, tok)
        assert example["prompt_ids"] == prompt_ref, fmt
        assert example["prompt_ids"][-len(generation):] == generation, fmt
        for key, reply in zip(keys, (PARIS, SEA)):
            full = example["prompt_ids"] + example[key]
            after = tok(AFTER_TURN.get(family, ""), add_special_tokens=False)["input_ids"]
            assert full + after == chat_ids(tok, USER + reply), (fmt, key)
            assert tok.convert_ids_to_tokens(example[key][-len(TURN_END[family]):]) == TURN_END[family], (fmt, key)
            assert example[key].count(tok.convert_tokens_to_ids(TURN_END[family][-1])) == 1, (fmt, key)
            content = tok.decode(example[key], skip_special_tokens=True).strip()
            assert content == reply[0]["content"], (fmt, key)


def test_qwen_default_system_prompt_is_in_the_prompt_once(tokenizers):
    """Qwen2.5's template injects its default system prompt when the row has none: in the prompt
    (so training sees what inference will render), once, and never in the completion."""
    tok = tokenizers["qwen2.5"]
    example = one("sft", {"messages": USER + PARIS}, tok)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    prompt = tok.decode(example["prompt_ids"])
    assert prompt.count("You are Qwen, created by Alibaba Cloud.") == 1
    assert prompt.startswith("<|im_start|>system\n")
    assert start not in example["completion_ids"]
    own = one("sft", {"messages": [{"role": "system", "content": "be kind ."}] + USER + PARIS}, tok)
    assert "You are Qwen" not in tok.decode(own["prompt_ids"])


PLAIN_ROWS = {
    "sft_text": ("sft", {"text": "the movie was great fun ."}, ["completion_ids"]),
    "sft": ("sft", {"prompt": "Question : what is two plus two ?", "completion": "Answer : four ."}, ["completion_ids"]),
    "preference": ("preference", {"prompt": "hello there", "chosen": "how are you ?", "rejected": "the sea ."},
                   ["chosen_ids", "rejected_ids"]),
    "preference_implicit": ("preference", {"chosen": "the cat sat .", "rejected": "the dog slept ."},
                            ["chosen_ids", "rejected_ids"]),
    "unpaired": ("unpaired", {"prompt": "hello there", "completion": "how are you ?", "label": False}, ["completion_ids"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_text_bos_once_and_eos_once(tokenizers, family):
    """Plain text: the tokenizer's own BOS rule (one BOS for Llama-3, Gemma, Mistral, Llama-2; none
    for GPT-2 and Qwen2.5), every completion ends with EOS exactly once (also when the text already
    ends with the EOS string), and nothing merges across the prompt/completion boundary."""
    tok = tokenizers[family]
    bos = 1 if FAMILIES[family]["adds_bos"] else 0
    eos = tok.eos_token_id
    for name, (fmt, row, keys) in PLAIN_ROWS.items():
        example = one(fmt, row, tok)
        for key in keys:
            full = example["prompt_ids"] + example[key]
            # GPT-2's bos is its eos: count BOS only where it is a token of its own.
            if tok.bos_token_id != eos:
                assert full.count(tok.bos_token_id) == bos, (name, key)
                assert full[:bos] == [tok.bos_token_id] * bos, (name, key)
            assert example[key][-1] == eos and full.count(eos) == 1, (name, key)
    closed = one("sft", {"prompt": "hello there", "completion": "how are you ?" + tok.eos_token}, tok)
    assert closed["completion_ids"].count(eos) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2.5_base", "mistral"])
def test_pad_equal_to_eos_keeps_the_final_eos_in_the_loss(tokenizers, family):
    """With no pad token of their own, these families pad with EOS (``load_tokenizer``'s rule):
    the closing EOS of every completion is still a loss target and padding is not."""
    tok = tokenizers[family]
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": "hello there", "completion": "how are you ?"}, {"prompt": "hello", "completion": "the sea ."}]
    examples = [one("sft", r, tok) for r in rows]
    batch = SFTCollator(pad_token_id_of(tok))(examples)
    for i, e in enumerate(examples):
        n_prompt, n = len(e["prompt_ids"]), len(e["prompt_ids"]) + len(e["completion_ids"])
        assert batch["input_ids"][i, n - 1] == tok.eos_token_id
        assert batch["completion_mask"][i].tolist() == [0] * n_prompt + [1] * (n - n_prompt) + [0] * (
            batch["input_ids"].shape[1] - n)
        assert batch["attention_mask"][i].sum() == n


@pytest.mark.parametrize(("family", "messages", "refusal"), [
    ("gemma2", [{"role": "system", "content": "be kind ."}] + USER + PARIS, "System role not supported"),
    ("mistral", [{"role": "system", "content": "be kind ."}] + USER + PARIS, "Conversation roles must alternate"),
])
def test_a_row_the_template_refuses_is_a_data_error_naming_the_line(tokenizers, family, messages, refusal):
    """Gemma's and Mistral's templates raise on a system message: that is a bad row, reported with its
    file and line among the other rows' problems, not a bare jinja error that stops at the first."""
    rows = [(Where("data.jsonl", 1, "line"), {"messages": USER + PARIS}),
            (Where("data.jsonl", 2, "line"), {"messages": messages})]
    examples, errors = build_examples("sft", rows, tokenizers[family])
    assert len(examples) == 1 and len(errors) == 1
    assert "data.jsonl:2" in str(errors[0]) and refusal in str(errors[0])


@pytest.mark.parametrize("family", ["gpt2", "llama3", "gemma2", "mistral"])
def test_a_prompt_ending_in_a_space_is_told_to_drop_it(tokenizers, family):
    """BPE tokenizers (byte-level and ``▁`` alike) merge a prompt's trailing space into the completion's
    first word, so the prompt's ids are not a prefix of the row's: the error says to remove the
    space (the pipeline joins with one), not to end the prompt with whitespace."""
    row = {"prompt": "Question : what is two plus two ? ", "completion": "four ."}
    _, errors = build_examples("sft", [(Where("data.jsonl", 3, "line"), row)], tokenizers[family])
    assert len(errors) == 1 and isinstance(errors[0], DataError)
    message = str(errors[0])
    assert "data.jsonl:3" in message and "ends with whitespace" in message
    assert "end the prompt with whitespace" not in message
    fixed, errors = build_examples("sft", [(Where("data.jsonl", 3, "line"), {**row, "prompt": row["prompt"].rstrip()})],
                                   tokenizers[family])
    assert not errors and tokenizers[family].decode(fixed[0]["completion_ids"], skip_special_tokens=True).strip() == "four ."


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_text_rendered_by_the_template_ahead_of_time_keeps_one_bos(tokenizers, family):
    """Plain-text rows that are a chat already rendered to a string (``apply_chat_template(...,
    tokenize=False)``, as many datasets ship them) start with the BOS the template wrote; the
    tokenizer's own BOS is not added in front of it: the ids are the template's, BOS once."""
    tok = tokenizers[family]
    rendered_prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    rendered = tok.apply_chat_template(USER + PARIS, tokenize=False)
    text = one("sft", {"text": rendered}, tok)
    assert text["completion_ids"][: len(chat_ids(tok, USER + PARIS))] == chat_ids(tok, USER + PARIS)
    prompt = one("prompt", {"prompt": rendered_prompt}, tok)
    assert prompt["prompt_ids"] == chat_ids(tok, USER, generation=True)
    if tok.bos_token_id is not None:
        assert text["completion_ids"].count(tok.bos_token_id) == prompt["prompt_ids"].count(tok.bos_token_id) == (
            0 if family.startswith("qwen") else 1)


@pytest.mark.parametrize("family", ["llama3", "gemma2", "mistral", "qwen2.5"])
def test_left_truncation_keeps_the_bos(tokenizers, family):
    """``truncation: truncate`` keeps the end of an over-long prompt: the BOS in front stays (these
    models are trained never to see a sequence without it); the rest of the budget is the prompt's end."""
    tok = tokenizers[family]
    row = {"prompt": USER, "completion": PARIS, "label": True}
    full = one("unpaired", row, tok)
    examples, errors = build_examples("unpaired", [(Where("data.jsonl", 1, "line"), row)], tok, max_prompt_length=8,
                                      max_length=10, truncation="truncate")
    assert not errors
    prompt = examples[0]["prompt_ids"]
    has_bos = family != "qwen2.5"
    assert len(prompt) == 8 and prompt.count(tok.bos_token_id) == int(has_bos)
    assert prompt == full["prompt_ids"][:1] * has_bos + full["prompt_ids"][-(8 - has_bos):]
    assert examples[0]["completion_ids"] == full["completion_ids"][:2]
    plain, errors = build_examples("sft", [(Where("data.jsonl", 2, "line"), {"prompt": "what is the capital of france ?",
                                                                             "completion": "paris ."})],
                                   tok, max_length=4, truncation="truncate")
    assert not errors and plain[0]["prompt_ids"].count(tok.bos_token_id) == int(has_bos)
    assert len(plain[0]["prompt_ids"]) == 3 and plain[0]["prompt_ids"][:has_bos] == [tok.bos_token_id] * has_bos


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_completion_ends_at_the_token_a_rollout_stops_at(tokenizers, family):
    """A chat completion ends with the token a rollout of the policy stops at: a reward adapter trained
    on these rows reads its score at the very token it is read at on rollouts (the last one), and SFT
    teaches nothing a rollout never generates (Qwen's and Gemma's ``\\n`` after the turn end)."""
    from lit_rlhf.rollout import SamplingConfig

    tok = tokenizers[family]
    stops = SamplingConfig().resolved(tok).stop_token_ids
    for fmt, (row, keys) in CHAT_ROWS.items():
        example = one(fmt.removesuffix("_implicit"), row, tok)
        for key in keys:
            assert example[key][-1] in stops, (fmt, key, tok.convert_ids_to_tokens(example[key]))


def test_a_template_whose_turns_end_in_plain_text_is_warned_about(tokenizers, caplog):
    """An Alpaca-style template ends an answer with nothing special: no row teaches the policy to stop
    and its rollouts would all run to max_new_tokens (the stop tokens are EOS alone)."""
    tok = tokenizers["gpt2"]
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
                         "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}### Response:\n{% endif %}")
    try:
        with caplog.at_level("WARNING", logger="lit_rlhf.data"):
            example = one("sft", {"messages": USER + PARIS}, tok)
    finally:
        tok.chat_template = None
    assert tok.eos_token_id not in example["completion_ids"]
    assert "never learns to stop" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lit_rlhf.data"):
        one("sft", {"messages": USER + PARIS}, tokenizers["qwen2.5"])
    assert "never learns to stop" not in caplog.text


SYSTEM = [{"role": "system", "content": "be kind ."}]
HELLO = [{"role": "user", "content": "hello there"}]
FINE = [{"role": "assistant", "content": "i am fine ."}]


def trl_split(tok, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """TRL 1.16's tokenize step for a conversational row (``tokenize_fn`` of its SFT, DPO and KTO trainers):
    the prompt with the generation prompt, the completion the rest of ``prompt + completion`` (here the
    prompt is always a prefix, so ``common_prefix_length`` is the prompt's length)."""
    prompt_ids, full = chat_ids(tok, prompt, generation=True), chat_ids(tok, prompt + completion)
    assert full[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full[len(prompt_ids):]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_multi_turn_rows_are_trls_tokens(tokenizers, family):
    """Multi-turn rows (a system turn where the template takes one; Gemma's and Mistral's refuse it), in every
    conversational format, against TRL's tokenize step: the same prompt ids, the same completion ids but
    for the whitespace Qwen's and Gemma's templates write after the turn end. An SFT ``messages`` row splits
    before its last message, an implicit prompt at the first message ``chosen`` and ``rejected`` differ in,
    and a completion of several messages is all completion."""
    tok = tokenizers[family]
    context = ([] if family in ("gemma2", "mistral") else SYSTEM) + HELLO + FINE + USER
    pair = {"chosen_ids": PARIS, "rejected_ids": SEA}
    rows = [  # (format, row, the prompt TRL gets, the completions it gets)
        ("sft", {"messages": context + PARIS}, context, {"completion_ids": PARIS}),
        ("sft", {"prompt": HELLO, "completion": FINE + USER + PARIS}, HELLO, {"completion_ids": FINE + USER + PARIS}),
        ("preference", {"prompt": context, "chosen": PARIS, "rejected": SEA}, context, pair),
        ("preference", {"chosen": context + PARIS, "rejected": context + SEA}, context, pair),
        ("unpaired", {"prompt": context, "completion": PARIS, "label": False}, context, {"completion_ids": PARIS}),
    ]
    after = tok(AFTER_TURN.get(family, ""), add_special_tokens=False)["input_ids"]
    for fmt, row, prompt, completions in rows:
        example = one(fmt, row, tok)
        for key, completion in completions.items():
            prompt_ids, completion_ids = trl_split(tok, prompt, completion)
            assert example["prompt_ids"] == prompt_ids, (fmt, key)
            assert example[key] + after == completion_ids, (fmt, key)


THREE_TURNS = HELLO + FINE + USER + PARIS + [{"role": "user", "content": "and the sea ?"}] + SEA


def loss_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of consecutive loss tokens."""
    spans, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            spans, run = spans + [run], []
    return spans + [run] * bool(run)


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "gemma2"])
def test_every_assistant_turn_of_a_messages_row_carries_loss(tokenizers, family):
    """With ``completion_only_loss`` (the default) a multi-turn ``messages`` row carries loss on each assistant
    turn, from after its generation prompt through its turn end, and on nothing else (system, user turns,
    headers, the whitespace after a turn end), as TRL's ``assistant_only_loss`` and torchtune; padded and
    packed batches agree; with it off, every token (TRL's ``completion_only_loss`` on such a row)."""
    tok = tokenizers[family]
    messages = ([] if family == "gemma2" else SYSTEM) + THREE_TURNS
    example = one("sft", {"messages": messages}, tok)
    pad_id = pad_token_id_of(tok)
    only, every = (SFTCollator(pad_id, flag)([example]) for flag in (True, False))
    ids, mask = only["input_ids"][0].tolist(), only["completion_mask"][0].tolist()
    turn_end = TURN_END[family][0]
    assert [tok.decode(span) for span in loss_spans(ids, mask)] == [
        m["content"] + turn_end for m in messages if m["role"] == "assistant"]
    assert every["completion_mask"][0].tolist() == [1] * len(ids)
    # Distillation's view: the earlier turns apart, the completion (the last turn) alone left.
    last = [m - e for m, e in zip(mask, only["earlier_turns_mask"][0].tolist())]
    assert [tok.decode(span) for span in loss_spans(ids, last)] == ["the sea ." + turn_end]

    single = one("sft", {"messages": USER + PARIS}, tok)
    padded = SFTCollator(pad_id)([example, single])
    packed = PackingCollator(pad_id)([example, single])
    for key in ("completion_mask", "earlier_turns_mask"):
        rows = [padded[key][i, : len(e["prompt_ids"]) + len(e["completion_ids"])].tolist()
                for i, e in enumerate([example, single])]
        if key == "completion_mask":  # each packed example's first token is never a target
            rows = [[0] + r[1:] for r in rows]
        assert packed[key][0].tolist() == rows[0] + rows[1], key


def test_truncation_cuts_the_turn_mask_with_the_prompt(tokenizers):
    """Left-truncation keeps the prompt's BOS and end; the earlier turns' mask is cut at the same positions,
    whether ``max_prompt_length`` or ``max_length`` cuts it, so it still marks the same tokens."""
    tok = tokenizers["llama3"]
    row = {"messages": SYSTEM + THREE_TURNS}
    full = one("sft", row, tok)
    pairs = list(zip(full["prompt_ids"], full["prompt_loss_mask"]))
    fine = loss_spans(full["prompt_ids"], full["prompt_loss_mask"])[0]
    limit = len(pairs) - full["prompt_loss_mask"].index(1) - 2 + 1  # the BOS, and the first turn but its 2 first tokens
    # max_length cuts the prompt only where it leaves the completion no room: one token is kept.
    for limits, kept in (({"max_prompt_length": limit}, None), ({"max_length": limit + 1}, 1)):
        examples, errors = build_examples("sft", [(Where("data.jsonl", 1, "line"), row)], tok, truncation="truncate",
                                          **limits)
        assert not errors
        cut = examples[0]
        assert len(cut["prompt_ids"]) == limit and cut["completion_ids"] == full["completion_ids"][:kept]
        assert list(zip(cut["prompt_ids"], cut["prompt_loss_mask"])) == pairs[:1] + pairs[-(limit - 1):], limits
        # What is left of the earlier turns is still exactly their tokens: the cut fell in the first turn.
        spans = loss_spans(cut["prompt_ids"], cut["prompt_loss_mask"])
        assert spans[0] == fine[2:] and tok.decode(spans[1]) == "paris .<|eot_id|>"


def test_a_template_that_rewrites_earlier_turns_trains_their_last_turn_with_one_warning(tokenizers, caplog):
    """A template that renders an earlier assistant turn differently from a conversation ending at it (here
    dropping an earlier turn's reasoning, as Qwen3's does) leaves that turn's tokens unknown: such rows train
    their last turn only, and one warning counts them; the rows it renders alike keep every turn."""
    tok = copy.deepcopy(tokenizers["llama3"])
    # Llama-3's template, but an assistant turn before the last keeps only what follows its reasoning.
    tok.chat_template = tok.chat_template.replace(
        "message['content'] | trim", "(message['content'].split('</think>')[-1] if message['role'] == 'assistant' "
        "and not loop.last else message['content']) | trim")
    thinking = [{"role": "assistant", "content": "<think> the sea </think> i am fine ."}]
    rows = [{"messages": HELLO + thinking + USER + PARIS}, {"messages": HELLO + FINE + USER + PARIS},
            {"messages": USER + thinking + HELLO + SEA}]
    with caplog.at_level("WARNING", logger="lit_rlhf.data"):
        examples, errors = build_examples("sft", [(Where("data.jsonl", i + 1, "line"), r) for i, r in enumerate(rows)],
                                          tok)
    assert not errors
    warned = [r for r in caplog.records if "differently" in r.getMessage()]
    assert len(warned) == 1 and "2 of 3" in warned[0].getMessage()
    assert ["prompt_loss_mask" in e for e in examples] == [False, True, False]
    batch = SFTCollator(pad_token_id_of(tok))(examples)
    decoded = [[tok.decode(s) for s in loss_spans(batch["input_ids"][i].tolist(), batch["completion_mask"][i].tolist())]
               for i in range(3)]
    assert decoded == [["paris .<|eot_id|>"], ["i am fine .<|eot_id|>", "paris .<|eot_id|>"], ["the sea .<|eot_id|>"]]


@pytest.mark.parametrize("family", ["llama3", "qwen2.5"])
def test_empty_chat_prompt_makes_the_row_all_completion(tokenizers, family):
    """An SFT row's prompt may be empty: a conversational ``prompt: []`` is the template's rendering of the
    completion alone, every token of it a completion token (transformers refuses to render no messages)."""
    tok = tokenizers[family]
    example = one("sft", {"prompt": [], "completion": HELLO + PARIS}, tok)
    after = tok(AFTER_TURN.get(family, ""), add_special_tokens=False)["input_ids"]
    assert example["prompt_ids"] == [] and example["completion_ids"] + after == chat_ids(tok, HELLO + PARIS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_rows_in_trls_convention_are_trls_tokens(tokenizers, family):
    """Plain text in TRL's convention (the completion starts with its space), against TRL 1.16's steps:
    EOS appended to the completion text, then ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)``;
    an implicit prompt (HH-RLHF's shape) is the text shared up to the space before the first difference."""
    tok = tokenizers[family]

    def trl_ids(prompt: str, completion: str) -> tuple[list[int], list[int]]:
        prompt_ids = tok(prompt)["input_ids"]
        full = tok(prompt + completion + tok.eos_token)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        return prompt_ids, full[len(prompt_ids):]

    hh = "\n\nHuman: hello there\n\nAssistant:"
    rows = [  # (format, row, the prompt TRL gets, the completions it gets)
        ("sft", {"prompt": "Question : two plus two ?", "completion": " Answer : four ."}, "Question : two plus two ?",
         {"completion_ids": " Answer : four ."}),
        ("preference", {"chosen": hh + " the cat sat .", "rejected": hh + " the dog slept ."}, hh + " the",
         {"chosen_ids": " cat sat .", "rejected_ids": " dog slept ."}),
        ("unpaired", {"prompt": "hello there ,", "completion": " how are you ?", "label": True}, "hello there ,",
         {"completion_ids": " how are you ?"}),
    ]
    for fmt, row, prompt, completions in rows:
        example = one(fmt, row, tok)
        for key, completion in completions.items():
            assert (example["prompt_ids"], example[key]) == trl_ids(prompt, completion), (fmt, key)
