"""The errors a user can cause, and how their messages quote what was given.

Every room raises these two, so they live below all of them: `InputError` for a request the
model cannot make, `WeightsError` for weights on disk that are missing, incomplete or another
model's. Messages name the input or file, what was given (`shown`) and what is allowed.
"""

from typing import Any


class InputError(ValueError):
    """A request the model cannot make; the message names each bad input, its value and the rule."""


class WeightsError(RuntimeError):
    """Weights on disk are missing, incomplete or not this model's; the message says the fix."""


class EvaluationError(Exception):
    """A folder, picture or model the evaluation cannot use, told to the user in one message."""


def shown(value: Any, limit: int = 200) -> str:
    """`value` as a refusal quotes it: its repr, cut short if long (a message, not an echo)."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        return "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def one_line(exc: BaseException) -> str:
    """An exception's type and message on one line, for messages that quote it."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
