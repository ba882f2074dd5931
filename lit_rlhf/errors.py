"""The errors lit_rlhf raises for an argument value it refuses (standard library only, so every layer,
the pure losses included, can raise them)."""

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


class SourceNotFound(FileNotFoundError):
    """A data source (file, directory or hub dataset) an argument names that cannot be found.

    Args:
        argument: the argument that named it (``train``, ``val``); the command line reports its config key.
        message: the source and what is missing.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument
