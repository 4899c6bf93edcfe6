"""Calling reward functions and checking what they return.

A reward is a finite real number (``float``, ``int``, ``bool``, numpy scalars). A reward
function may be async or a plain function (its result is awaited only when it is awaitable; a
plain one runs on the event loop, so keep it quick). ``EnvironmentFailure`` passes through: the
reward cannot be computed and the episode is invalid. Anything else it raises, and any result
that is not a finite real number, is a ``RewardError`` naming the function and the env.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from tool_use.errors import EnvironmentFailure, RewardError
from tool_use.types import Message

EXPECTED = (
    "expected a finite real number (a float; raise EnvironmentFailure when the reward cannot "
    "be computed, which makes the episode invalid)"
)


def describe(value: Any) -> str:
    """A short description of a value that broke a contract: ``None``, ``a str ('x')``, ..."""
    if value is None:
        return "None"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return repr(float(value))  # nan, inf, also numpy's
        except OverflowError:
            return "a number beyond a float's range"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a str ({shown!r})"
    return f"a {type(value).__name__}"


def callable_name(fn: Any) -> str:
    """``fn``'s qualified name (or its type's name for callable objects)."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def as_reward(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number, else None."""
    if not isinstance(value, numbers.Real):
        return None
    try:
        reward = float(value)
    except (OverflowError, ValueError):  # an int beyond float's range
        return None
    return reward if math.isfinite(reward) else None


def check_reward(value: Any, source: str) -> float:
    """``value`` as a float, or a ``RewardError`` saying that ``source`` returned it."""
    reward = as_reward(value)
    if reward is None:
        raise RewardError(f"{source} returned {describe(value)}; {EXPECTED}")
    return reward


async def call_reward_fn(
    reward_fn: Callable[[Sequence[Message]], Any], messages: Sequence[Message], *, env: str
) -> float:
    """``reward_fn(messages)``, awaited when it is awaitable, checked by ``check_reward``.
    ``env`` names the env whose reward it is (for the error message)."""
    source = f"{env} reward_fn {callable_name(reward_fn)}"
    try:
        value = reward_fn(messages)
        if inspect.isawaitable(value):
            value = await value
    except EnvironmentFailure:
        raise
    except Exception as error:
        raise RewardError(f"{source} raised {type(error).__name__}: {error}; {EXPECTED}") from error
    return check_reward(value, source)
