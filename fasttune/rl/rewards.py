"""Reward functions checked by name: an exception, a wrong length or a value that is not a number says which function,
which training step and which completion, instead of surfacing as a tensor-conversion error deep inside TRL."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
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


# ---- built-in reward functions (the recipe's rl.rewards; TRL's signature: one float per completion) ---------------
BUILTIN_REWARDS: dict[str, str] = {
    "format": "1 when the completion matches rl.format_regex (re.fullmatch, DOTALL), else 0",
    "exact": "1 when the completion (stripped) equals the row's rl.answer_field, else 0",
    "numeric": "1 when the last number in the completion is within rl.numeric_tolerance of the row's "
               "rl.answer_field, else 0",
    "length": "1 - |characters - rl.target_length| / rl.target_length, floored at 0",
}
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or a list of messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _answers(kwargs: dict[str, Any], field: str, count: int, name: str) -> list[Any]:
    if field not in kwargs:
        raise RewardFunctionError(f"reward {name!r}: the dataset has no column {field!r} (rl.answer_field) with the "
                                  f"reference answers; columns passed: {sorted(kwargs)}")
    return list(kwargs[field])


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def builtin_reward(name: str, format_regex: str = r".*", answer_field: str = "answer", numeric_tolerance: float = 0.0,
                   target_length: int = 200) -> Callable[..., list[float]]:
    """The built-in reward ``name`` (a key of :data:`BUILTIN_REWARDS`) with its options, named ``<name>_reward``."""
    if name not in BUILTIN_REWARDS:
        raise ValueError(f"rl.rewards: {name!r} is not allowed; allowed: {', '.join(BUILTIN_REWARDS)}")
    pattern = re.compile(format_regex, re.DOTALL)

    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        if name == "format":
            return [1.0 if pattern.fullmatch(t.strip()) else 0.0 for t in texts]
        if name == "length":
            return [max(0.0, 1.0 - abs(len(t) - target_length) / target_length) for t in texts]
        answers = _answers(kwargs, answer_field, len(texts), name)
        if name == "exact":
            return [1.0 if t.strip() == str(a).strip() else 0.0 for t, a in zip(texts, answers)]
        out = []
        for text, answer in zip(texts, answers):
            got, want = last_number(text), last_number(str(answer))
            out.append(1.0 if got is not None and want is not None and abs(got - want) <= numeric_tolerance else 0.0)
        return out

    reward.__name__ = reward.__qualname__ = f"{name}_reward"
    return reward


def load_reward_file(path: str | Path, names: Sequence[str]) -> list[Callable[..., Any]]:
    """The functions ``names`` of the Python file ``path`` (executed here: only ever a file the user named)."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"rl.reward_file: {str(path)!r} is not allowed; allowed: an existing .py file")
    spec = importlib.util.spec_from_file_location(f"fasttune_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    funcs = []
    for name in names:
        func = getattr(module, name, None)
        if not callable(func):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(f"rl.reward_functions: {name!r} is not a function of {str(path)!r}; allowed: one of "
                             f"{found}")
        funcs.append(func)
    return funcs
