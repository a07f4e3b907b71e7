"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input: the message names the problem and the fix."""


class MissingDependencyError(UserError):
    """An optional toolchain (a target's extra) is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"{package} is not installed; install the '{extra}' extra: pip install 'mnv4-deploy[{extra}]'"
        )


class VerificationError(Exception):
    """An artifact was produced but does not meet what was asked (e.g. float ops in a full-integer model)."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' suffix with the nearest valid choices, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def one_line(text: str) -> str:
    """`text` as one printable line: newlines, line separators and control characters (from a user's file
    names or keys that a message quotes) are shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
