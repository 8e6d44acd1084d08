"""Reward functions with TRL's conventions: built-ins by name, user functions by path, a weighted sum.

A reward function is called once per step on the whole batch, as TRL's ``GRPOTrainer`` calls its
``reward_funcs``::

    f(prompts, completions, completion_ids, **kwargs) -> list[float | None]

``prompts`` and ``completions`` are strings for plain prompts, and for conversational prompts lists of
``{"role", "content"}`` messages (the completion as one assistant message); ``completion_ids`` are lists of
token ids. ``kwargs`` hold the dataset's other columns (one list per column, one entry per sample), plus
``trainer_state`` (``global_step``, ``max_steps``), ``log_metric(name, value)`` and rlfuse's
``completion_truncated`` (per sample, True when cut at the length limit). ``None`` means the function does
not apply to that sample. The reward is ``sum_i w_i · r_i`` over the functions that apply (TRL's ``nansum``);
a sample to which no function applies, a non-number, NaN or inf, a list of the wrong length, or a function
that raises stops the step with :class:`RewardFunctionError`, naming the function and the sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence

from rlfuse.engine.data import gold_answer
from rlfuse.engine.equation import equation_of
from rlfuse.engine.rewards import gsm8k_rewards, is_formatted

RewardFunc = Callable[..., Sequence[Optional[float]]]
PROMPT_PREVIEW = 60  # characters of a prompt quoted in an error


class RewardFunctionError(ValueError):
    """A reward function that raised, or returned something other than one finite number or None per sample."""


def completion_text(completion) -> str:
    """The text of a completion as reward functions receive it: a string, or a list of messages (their contents
    joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def _gold(answer: str) -> str:
    return gold_answer(answer) if "####" in answer else answer.strip().replace(",", "")


class MathReward:
    """The built-in ``math`` reward (:func:`rlfuse.engine.rewards.gsm8k_rewards`): correctness of the final
    answer against the ``answer`` column (a GSM8K solution ending in ``#### N``, or the bare answer), a
    ``format_reward`` bonus on a correct answer with one ``#### N`` line, ``incorrect_reward`` otherwise; with
    ``require_derivation``, a correct answer is paid only when derived from the ``question`` column's numbers:
    by the gold equation when the ``answer`` holds one before its ``#### N`` line (SVAMP), else by grounded
    arithmetic steps (:func:`rlfuse.engine.rewards.score`'s rule).

    After a call, ``last`` holds the :class:`rlfuse.engine.rewards.RewardResult` (its correct/formatted/derived
    flags feed the trainer's ``accuracy``, ``format_rate`` and ``derived_rate``).
    """

    __name__ = "math"

    def __init__(self, format_reward: float = 0.1, incorrect_reward: float = 0.0, require_derivation: bool = True):
        self.format_reward, self.incorrect_reward = format_reward, incorrect_reward
        self.require_derivation = require_derivation
        self.last = None

    def __call__(self, prompts, completions, completion_ids, answer=None, question=None, completion_truncated=None,
                 **kwargs) -> List[float]:
        if answer is None:
            raise ValueError("the math reward needs an 'answer' column (a solution ending in '#### N', or the "
                             "final answer); the dataset has none")
        if self.require_derivation and question is None:
            raise ValueError("the math reward with --require-derivation needs a 'question' column; pass "
                             "--no-require-derivation for a dataset without one")
        derive = self.require_derivation
        self.last = gsm8k_rewards([completion_text(c) for c in completions], [_gold(str(a)) for a in answer],
                                  self.format_reward, incorrect_reward=self.incorrect_reward,
                                  truncated=completion_truncated, questions=list(question) if derive else None,
                                  equations=[equation_of(str(a)) for a in answer] if derive else None)
        return self.last.rewards


def format_reward(prompts, completions, completion_ids, **kwargs) -> List[float]:
    """The built-in ``format`` reward: 1.0 when the completion ends with exactly one ``#### <number>`` line
    (:func:`rlfuse.engine.rewards.is_formatted`), else 0.0."""
    return [1.0 if is_formatted(completion_text(c)) else 0.0 for c in completions]


BUILTINS = ("math", "format")  # names --reward accepts besides a path


def _load_file(path: Path) -> Any:
    module_name = f"rlfuse_user_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--reward: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_reward_function(spec: str, math_options: Optional[Dict[str, Any]] = None) -> RewardFunc:
    """The function ``--reward spec`` names: ``math`` or ``format`` (built-ins; ``math_options`` go to
    :class:`MathReward`), ``path/to/file.py:function`` or ``package.module:function``.

    Loading a user file or module runs its code, as ``import`` does: it is the user's own code.

    Raises:
        ValueError: an unknown name, a spec without ``:function``, a module that fails to import (its error
            included), a missing function, or an attribute that is not callable.
        FileNotFoundError: a ``.py`` path that does not exist.
    """
    if spec == "math":
        return MathReward(**(math_options or {}))
    if spec == "format":
        return format_reward
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise ValueError(f"--reward {spec!r}: expected one of {BUILTINS}, path/to/file.py:function or "
                         "package.module:function")
    try:
        if location.endswith(".py"):
            path = Path(location).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--reward {spec}: no such file {path}")
            module = _load_file(path)
        else:
            module = importlib.import_module(location)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:  # the user's module failed to import: say which and why
        raise ValueError(f"--reward {spec}: importing {location} failed: {type(error).__name__}: {error}") from None
    function = getattr(module, name, None)
    if function is None:
        raise ValueError(f"--reward {spec}: {location} has no attribute {name!r}")
    if not callable(function):
        raise ValueError(f"--reward {spec}: {name} in {location} is not callable")
    return function


def reward_name(function: RewardFunc) -> str:
    """The name a function is logged under (``reward/<name>``): its ``__name__``, else its class's name."""
    return getattr(function, "__name__", None) or type(function).__name__


@dataclass
class RewardScores:
    """One batch's rewards: ``total`` (B floats, the weighted sum), ``per_function`` (name -> B floats or None),
    ``means`` (name -> mean over the samples it applies to, or None) and ``logged`` (what ``log_metric`` got)."""

    total: List[float]
    per_function: Dict[str, List[Optional[float]]]
    means: Dict[str, Optional[float]]
    logged: Dict[str, float] = field(default_factory=dict)


def _preview(prompt) -> str:
    text = prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", "")) for m in prompt)
    text = " ".join(text.split())
    return text[:PROMPT_PREVIEW] + ("..." if len(text) > PROMPT_PREVIEW else "")


def _sample(prompts, index: int) -> str:
    return f"sample {index} (prompt: {_preview(prompts[index])!r})"


def _value(name: str, value, prompts, index: int) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # a 0-d tensor or numpy scalar holds one number
            value = value.item() if hasattr(value, "item") else value
        except (TypeError, ValueError):
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFunctionError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for "
                                  f"{_sample(prompts, index)}; expected a float or None")
    if not math.isfinite(float(value)):
        raise RewardFunctionError(f"reward function {name!r} returned {value} for {_sample(prompts, index)}; "
                                  "rewards must be finite (None marks a sample the function does not apply to)")
    return float(value)


class RewardSet:
    """Reward functions with weights: :meth:`__call__` scores a batch.

    Args:
        functions: callables with TRL's reward signature (see the module docstring).
        weights: one per function (default 1.0 each).

    Raises:
        ValueError: no functions, or a number of weights other than the number of functions, or a
            non-finite weight.
    """

    def __init__(self, functions: Sequence[RewardFunc], weights: Optional[Sequence[float]] = None):
        if not functions:
            raise ValueError("at least one reward function is needed")
        weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(functions):
            raise ValueError(f"--reward-weights has {len(weights)} values for {len(functions)} reward functions; "
                             "give one weight per --reward")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"--reward-weights must be finite, got {weights}")
        self.functions, self.weights = list(functions), weights
        names = [reward_name(f) for f in functions]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence[List[int]],
                 columns: Dict[str, Sequence], **extra) -> RewardScores:
        """Score B samples: ``columns`` are the dataset's other columns (B entries each), ``extra`` the other
        keyword arguments (``trainer_state``, ``completion_truncated``).

        Raises:
            RewardFunctionError: as the module docstring says; the message names the function and the sample.
        """
        count = len(prompts)
        logged: Dict[str, float] = {}
        kwargs = {**columns, **extra, "log_metric": lambda name, value: logged.__setitem__(name, float(value))}
        per_function = {}
        for name, function in zip(self.names, self.functions):
            values = self._call(name, function, prompts, completions, completion_ids, kwargs)
            if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
                raise RewardFunctionError(f"reward function {name!r} returned {type(values).__name__}; expected a "
                                          f"list of {count} floats or None, one per sample")
            values = list(values.tolist() if hasattr(values, "tolist") else values)
            if len(values) != count:
                raise RewardFunctionError(f"reward function {name!r} returned {len(values)} rewards for {count} "
                                          "samples; return exactly one (a float, or None) per completion")
            per_function[name] = [_value(name, v, prompts, i) for i, v in enumerate(values)]
        total = []
        for index in range(count):
            applied = [(w, per_function[n][index]) for n, w in zip(self.names, self.weights)
                       if per_function[n][index] is not None]
            if not applied:
                raise RewardFunctionError(f"no reward function applies to {_sample(prompts, index)}: "
                                          f"{', '.join(self.names)} all returned None")
            total.append(sum(w * r for w, r in applied))
        means = {}
        for name, values in per_function.items():
            applied = [v for v in values if v is not None]
            means[name] = sum(applied) / len(applied) if applied else None
        return RewardScores(total, per_function, means, logged)

    @staticmethod
    def _call(name, function, prompts, completions, completion_ids, kwargs):
        try:
            return function(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as error:
            culprit = _first_failing(function, prompts, completions, completion_ids, kwargs)
            where = _sample(prompts, culprit) if culprit is not None else f"a batch of {len(prompts)} samples"
            raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error} on "
                                      f"{where}") from error


def _first_failing(function, prompts, completions, completion_ids, kwargs) -> Optional[int]:
    """The index of the first sample on which ``function`` raises when called on that sample alone, or None."""
    for index in range(len(prompts)):
        one = {k: ([v[index]] if isinstance(v, (list, tuple)) and len(v) == len(prompts) else v)
               for k, v in kwargs.items()}
        try:
            function(prompts=[prompts[index]], completions=[completions[index]],
                     completion_ids=[completion_ids[index]], **one)
        except Exception:
            return index
    return None


def trainer_state(step: int, max_steps: int) -> SimpleNamespace:
    """What reward functions get as ``trainer_state``: ``global_step`` (the 1-based step being scored) and
    ``max_steps``, as on TRL's ``TrainerState``."""
    return SimpleNamespace(global_step=step, max_steps=max_steps)
