"""The error lit_rlhf raises for an argument value it refuses (standard library only, so every layer,
the pure losses included, can raise it)."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """An argument with a value it cannot take, raised where the value is given (a constructor), not at
    the first step that uses it.

    Args:
        argument: the argument's name, as the signature spells it; the command line reports the config
            key that set it (``model.init_args.<argument>``).
        message: what is wrong and what would be accepted.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument
