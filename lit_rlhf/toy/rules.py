"""Rule-based (verifiable) rewards on the toy task, in the ``module:function`` form the online
methods accept: a checker returns 1.0 when the completion passes, else 0.0, as the accuracy and
format rewards of DeepSeekMath / R1-style GRPO do.

    rewards:
      - kind: function
        function: lit_rlhf.toy.rules:positive_check
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_rlhf.toy import NEGATIVE, POSITIVE

_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)


def passes(completion: str, *, min_positive: int = 2) -> bool:
    """At least ``min_positive`` positive words and no negative word."""
    words = completion.split()
    return sum(w in _POS for w in words) >= min_positive and not any(w in _NEG for w in words)


def positive_check(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 for a completion with at least two positive words and no negative word, else 0.0."""
    del prompts
    return [1.0 if passes(c) else 0.0 for c in completions]
