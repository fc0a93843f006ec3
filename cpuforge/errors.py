"""The one error of bad input: its message is one sentence naming the file or key and the problem."""

from __future__ import annotations


class InputError(Exception):
    """Bad input. The message is one sentence naming the file or key and the problem."""


class GateError(Exception):
    """No file meets the quality gate. The message is one sentence naming the best file found and the figure
    it missed."""
