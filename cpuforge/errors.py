"""The one error of bad input: its message is one sentence naming the file or key and the problem."""

from __future__ import annotations


class InputError(Exception):
    """Bad input. The message is one sentence naming the file or key and the problem."""
