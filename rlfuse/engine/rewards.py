"""GSM8K rewards: answer correctness checked with math-verify, plus a small format reward.

Correctness plus format rewards are the standard recipe of "DeepSeek-R1: Incentivizing Reasoning
Capability in LLMs via Reinforcement Learning" and its open reproductions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence

from math_verify import ExprExtractionConfig, parse, verify

FINAL_LINE = re.compile(r"^####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")
HASH_ANSWER = re.compile(r"####\s*([^\n]*)")
NUMBER_ONLY = [ExprExtractionConfig()]


@dataclass(frozen=True)
class RewardResult:
    """Per-sample rewards: ``rewards`` = correctness part + format part, and the two flags behind them."""

    rewards: List[float]
    correct: List[bool]
    formatted: List[bool]


def extract_answer(completion: str):
    """The completion's final answer parsed by math-verify: the last ``#### N`` if any, else math-verify's own
    extraction from the whole text (LaTeX, ``\\boxed{}``, last expression). Returns math-verify's list."""
    hashes = HASH_ANSWER.findall(completion)
    if hashes:
        return parse(hashes[-1].replace(",", "").replace("$", "").strip(), extraction_config=NUMBER_ONLY)
    return parse(completion)


def is_correct(completion: str, gold: str) -> bool:
    """True when the completion's final answer equals ``gold`` (a GSM8K ``#### N`` value) under math-verify."""
    predicted = extract_answer(completion)
    return bool(predicted) and verify(parse(gold, extraction_config=NUMBER_ONLY), predicted)


def is_formatted(completion: str) -> bool:
    """True when the completion ends with exactly one ``#### <number>`` line and has no other ``####`` line."""
    lines = [line.strip() for line in completion.strip().splitlines()]
    if not lines or not FINAL_LINE.match(lines[-1]):
        return False
    return sum(line.startswith("####") for line in lines) == 1


def gsm8k_rewards(
    completions: Sequence[str],
    golds: Sequence[str],
    format_reward: float = 0.1,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
) -> RewardResult:
    """Score completions against their gold answers.

    reward = (``correct_reward`` if correct else ``incorrect_reward``) + (``format_reward`` if formatted).
    TOPR passes ``incorrect_reward=-1`` to score correctness as ±1.

    Raises:
        ValueError: ``completions`` and ``golds`` differ in length.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers; they must pair up")
    correct = [is_correct(text, gold) for text, gold in zip(completions, golds)]
    formatted = [is_formatted(text) for text in completions]
    rewards = [
        (correct_reward if c else incorrect_reward) + (format_reward if f else 0.0) for c, f in zip(correct, formatted)
    ]
    return RewardResult(rewards, correct, formatted)
