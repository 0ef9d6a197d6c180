"""Reward functions checked by name: an exception, a wrong length or a value that is not a number says which function,
which training step and which completion, instead of surfacing as a tensor-conversion error deep inside TRL."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

# The largest float32 (torch.finfo(torch.float32).max): TRL converts rewards to float32.
FLOAT32_MAX = 3.4028234663852886e38


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one number (or None) per completion."""


def _where(name: str, step: int, count: int) -> str:
    return f"reward function {name!r} (training step {step}, batch of {count} completions)"


def check_rewards(name: str, step: int, completions: Sequence[Any], rewards: Any) -> list[float | None]:
    """``rewards`` as a list of floats/None, or RewardFunctionError naming the function, the step and the row."""
    where = _where(name, step, len(completions))
    if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
        raise RewardFunctionError(f"{where} returned {type(rewards).__name__}; it must return a list with one "
                                  "float (or None) per completion")
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    if len(values) != len(completions):
        raise RewardFunctionError(f"{where} returned {len(values)} rewards; expected {len(completions)}, one per "
                                  "completion (a reward per prompt is not enough: GRPO samples several completions "
                                  "per prompt)")
    out: list[float | None] = []
    for row, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, numbers.Real):  # bools are Reals: True/False count as 1/0
            raise RewardFunctionError(f"{where} returned {value!r} ({type(value).__name__}) for completion {row} "
                                      f"({str(completions[row])[:60]!r}); rewards must be numbers or None")
        if math.isnan(float(value)) or math.isinf(float(value)):
            raise RewardFunctionError(f"{where} returned {value} for completion {row} "
                                      f"({str(completions[row])[:60]!r}); return None to skip a completion")
        if abs(float(value)) > FLOAT32_MAX:  # TRL holds rewards in float32: this would become inf there
            raise RewardFunctionError(f"{where} returned {value} for completion {row} "
                                      f"({str(completions[row])[:60]!r}); rewards must lie within +-{FLOAT32_MAX:.4g} "
                                      "(they are float32 in the trainer)")
        out.append(float(value))
    return out


def checked_reward_func(func: Callable[..., Any], name: str, step: Callable[[], int]) -> Callable[..., Any]:
    """``func`` wrapped so that its failures and bad outputs name it (``step()`` gives the training step)."""

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> list[float | None]:
        completions = kwargs.get("completions", args[1] if len(args) > 1 else ())
        try:
            rewards = func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(f"{_where(name, step(), len(completions))} raised "
                                      f"{type(error).__name__}: {error}") from error
        return check_rewards(name, step(), completions, rewards)

    return checked


def checked_reward_funcs(funcs: Sequence[Any], names: Sequence[str], step: Callable[[], int]) -> list[Any]:
    """Plain (synchronous) reward callables wrapped by :func:`checked_reward_func`; reward models and async
    functions are left as TRL runs them."""
    return [func if isinstance(func, nn.Module) or inspect.iscoroutinefunction(func)
            else checked_reward_func(func, name, step) for func, name in zip(funcs, names, strict=True)]
