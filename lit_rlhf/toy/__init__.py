"""The embedded toy task: a small sentiment language with a ground-truth scorer.

Every text is a prompt naming a subject ("the movie was") and a completion of a few
words. Words are positive, negative or neutral; the ground-truth score of a completion
is ``(#positive - #negative) / #words`` in [-1, 1]. A preferred completion is one with a
higher score, so any method that learns the preference moves the score measurably.

The language is tokenised one word per token (see ``lit_rlhf.toy.build``), which makes a
model of ~100k parameters fluent in it after a few seconds of CPU pre-training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

POSITIVE = ("good", "great", "happy", "love", "excellent", "wonderful", "fun", "nice", "amazing", "best")
NEGATIVE = ("bad", "awful", "sad", "hate", "terrible", "boring", "poor", "worst", "ugly", "angry")
NEUTRAL = ("it", "was", "is", "and", "very", "quite", "really", "so", "but", "also", "just", "a", "bit", "felt")
SUBJECTS = (
    "movie", "food", "hotel", "book", "game", "song", "trip", "class",
    "park", "show", "team", "phone", "car", "city", "coffee",
)
PREFIXES = ("the {} was", "i think the {} is", "my review of the {} :", "honestly the {} felt")
PUNCTUATION = (".", ":")

_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)


def vocabulary() -> list[str]:
    """Every word the toy language uses, in a fixed order."""
    words: list[str] = []
    for group in (POSITIVE, NEGATIVE, NEUTRAL, SUBJECTS, PUNCTUATION):
        words.extend(w for w in group if w not in words)
    for prefix in PREFIXES:
        words.extend(w for w in prefix.replace("{}", "").split() if w not in words)
    return words


def all_prompts() -> list[str]:
    return [prefix.format(subject) for subject in SUBJECTS for prefix in PREFIXES]


def split_prompts(seed: int = 0, held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """A fixed train / held-out split of the prompts (held-out prompts never reach training)."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * held_out))
    return prompts[n_val:], prompts[:n_val]


def score(completion: str) -> float:
    """Ground-truth sentiment of a completion: (#positive - #negative) / #words, in [-1, 1]."""
    words = [w for w in completion.split() if w not in PUNCTUATION]
    if not words:
        return 0.0
    return (sum(w in _POS for w in words) - sum(w in _NEG for w in words)) / len(words)


def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Reward function in the ``module:function`` form the online methods accept."""
    del prompts
    return [score(c) for c in completions]


def sample_completion(rng: random.Random, sentiment: float, min_words: int = 3, max_words: int = 7) -> str:
    """A completion whose words lean positive (sentiment > 0) or negative (< 0).

    Each word is sentiment-bearing with probability 0.6; its polarity is positive with
    probability ``(1 + sentiment) / 2``.
    """
    words = []
    for _ in range(rng.randint(min_words, max_words)):
        if rng.random() < 0.6:
            pool = POSITIVE if rng.random() < (1 + sentiment) / 2 else NEGATIVE
        else:
            pool = NEUTRAL
        words.append(rng.choice(pool))
    return " ".join(words) + " ."
