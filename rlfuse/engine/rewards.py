"""Math word-problem rewards (GSM8K, SVAMP): answer correctness checked with math-verify, and a format bonus
paid only on top of a correct answer.

Correctness plus format rewards are the recipe of "DeepSeek-R1: Incentivizing Reasoning Capability in LLMs
via Reinforcement Learning". Here the format part is gated on correctness, so no part of the reward can be
earned by a completion that does no work (a bare ``#### 5`` guess earns nothing unless 5 is the answer), and a
completion cut at the length limit earns the incorrect reward: it never gave its final answer. Given the
questions, a correct answer is paid only when the completion derives it, since a guessed frequent answer is
also "correct" often enough to be learned: by the problem's gold equation where the data gives one (SVAMP,
"Are NLP Models really able to Solve Simple Math Word Problems?"; :mod:`rlfuse.engine.equation`: right steps
that compose to the gold equation up to commutativity and associativity, and a final ``#### N`` line that gives
the answer), else by grounded arithmetic steps
(:mod:`rlfuse.engine.derivation`, GSM8K, whose worked solutions have no single equation). :func:`score` is the
one entry point that training (the ``math`` reward), ``rlfuse eval`` and the tests share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from math_verify import ExprExtractionConfig, parse, verify

from rlfuse.engine.derivation import derivation_shown
from rlfuse.engine.equation import derived_by_equation

FINAL_LINE = re.compile(r"^####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")
HASH_ANSWER = re.compile(r"####\s*([^\n]*)")
NUMBER_ONLY = [ExprExtractionConfig()]
# The end of a final answer line (a line start, `#### <number>`, the newline): where a completion can stop
# (the sampler's `stop_pattern`); what follows it would be neither read nor rewarded.
ANSWER_LINE_STOP = r"(?:^|\n)[ \t]*####[ \t]*-?\$?\d[\d,]*(?:\.\d+)?[ \t]*\n"


@dataclass(frozen=True)
class RewardResult:
    """Per-sample rewards and the flags behind them (lists of one entry per completion).

    ``correct`` and ``formatted`` describe the text alone; :func:`gsm8k_rewards` gives how ``rewards``
    follow from them and from truncation.
    """

    rewards: List[float]
    correct: List[bool]
    formatted: List[bool]
    derived: Optional[List[bool]] = None  # with questions: the answer derived from them (rlfuse.engine.derivation)


def extract_answer(completion: str):
    """The completion's final answer parsed by math-verify: the last ``#### N`` if any, else math-verify's own
    extraction from the whole text (LaTeX, ``\\boxed{}``, last expression). Returns math-verify's list."""
    hashes = HASH_ANSWER.findall(completion)
    if hashes:
        return parse(hashes[-1].replace(",", "").replace("$", "").strip(), extraction_config=NUMBER_ONLY)
    return parse(completion)


def answer_key(completion: str) -> Optional[str]:
    """A canonical string of the completion's final answer, for counting distinct answers; None if it has none.

    Numbers are compared as values rounded to 6 decimals (``72``, ``72.0`` and ``#### 72.000`` give one key);
    other answers by math-verify's string form.
    """
    predicted = extract_answer(completion)
    if not predicted:
        return None
    value = predicted[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(value)
    return format(round(number, 6), ".6g") if abs(number) < 1e15 else repr(number)


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


def solved(correct: Sequence[bool], truncated: Sequence[bool]) -> List[bool]:
    """Per completion, whether it counts as solved: its text is correct (``correct``, from :func:`is_correct`)
    and it was not cut at the length limit (``truncated``), since a cut completion never gave its final answer.
    The one rule behind the reward of :func:`gsm8k_rewards`, the training ``accuracy`` and ``rlfuse eval``.

    Raises:
        ValueError: ``correct`` and ``truncated`` differ in length.
    """
    if len(correct) != len(truncated):
        raise ValueError(f"{len(correct)} correctness flags but {len(truncated)} truncated flags; they must pair up")
    return [bool(c) and not bool(t) for c, t in zip(correct, truncated)]


def gsm8k_rewards(
    completions: Sequence[str],
    golds: Sequence[str],
    format_reward: float = 0.1,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
    truncated: Optional[Sequence[bool]] = None,
    questions: Optional[Sequence[str]] = None,
    equations: Optional[Sequence[Optional[str]]] = None,
) -> RewardResult:
    """Score completions against their gold answers.

    ======================================  ==========================================
    completion                              reward
    ======================================  ==========================================
    correct, ends with one ``#### N`` line  ``correct_reward + format_reward``
    correct, no final line                  ``correct_reward``
    wrong (a bare final line or after work) ``incorrect_reward``
    cut at the length limit (``truncated``)  ``incorrect_reward``, whatever its text
    ======================================  ==========================================

    TOPR passes ``incorrect_reward=-1`` to score correctness as ±1. With ``questions``, "correct" above also
    needs the answer derived from the question by a grounded arithmetic step
    (:func:`rlfuse.engine.derivation.derivation_shown`): a correct answer line without one earns
    ``incorrect_reward``, so guessing a frequent answer (on SVAMP, ``2`` is right for 9% of the test problems)
    is not paid. With ``equations`` too, a completion whose problem has a gold equation (not None) must derive
    the answer by it instead (:func:`rlfuse.engine.equation.derived_by_equation`): a template that ignores the
    question, identity steps and a wrong operation that hits the gold value are not paid; and it must end with
    its ``#### N`` line ("correct, no final line" earns ``incorrect_reward`` there).

    Args:
        completions: the decoded completions.
        golds: their gold final answers (the text after ``####``).
        truncated: per completion, True when it was cut at ``--max-new-tokens`` without a stop token.
        questions: per completion, the problem's text; None pays a correct answer without a derivation.
        equations: per completion, the problem's gold equation or None (used only with ``questions``).

    Raises:
        ValueError: ``completions``, ``golds``, ``truncated``, ``questions`` and ``equations`` differ in length.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers; they must pair up")
    truncated = [False] * len(completions) if truncated is None else [bool(t) for t in truncated]
    if len(truncated) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(truncated)} truncated flags; they must pair up")
    correct = [is_correct(text, gold) for text, gold in zip(completions, golds)]
    formatted = [is_formatted(text) for text in completions]
    paid = solved(correct, truncated)
    derived = None
    if questions is not None:
        if len(questions) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(questions)} questions; they must pair up")
        equations = [None] * len(completions) if equations is None else list(equations)
        if len(equations) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(equations)} equations; they must pair up")
        # Where a gold equation exists the final `#### N` line is part of the rule: the answer is the one it gives.
        derived = [ok and ((f and derived_by_equation(text, question, equation, gold)) if equation
                           else derivation_shown(text, question, gold))
                   for ok, f, text, question, gold, equation in zip(correct, formatted, completions, questions, golds,
                                                                   equations)]
        paid = [p and d for p, d in zip(paid, derived)]
    rewards = [(correct_reward + (format_reward if f else 0.0)) if p else incorrect_reward
               for p, f in zip(paid, formatted)]
    return RewardResult(rewards, correct, formatted, derived)


def score(completions: Sequence[str], examples: Sequence, truncated: Optional[Sequence[bool]] = None,
          format_reward: float = 0.1, correct_reward: float = 1.0, incorrect_reward: float = 0.0) -> RewardResult:
    """Score completions of ``examples`` (:class:`rlfuse.engine.data.Example`: question, gold answer and, for
    SVAMP, gold equation; one per completion) under the paid rule: :func:`gsm8k_rewards` with every
    problem's question and equation, so a correct answer is paid only when derived (by the gold equation where
    there is one). ``result.correct`` is the answer-only rule, ``result.derived`` the paid one.

    Raises:
        ValueError: the lengths differ.
    """
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples; they must pair up")
    return gsm8k_rewards(completions, [ex.gold for ex in examples], format_reward, correct_reward, incorrect_reward,
                         truncated=truncated, questions=[ex.question for ex in examples],
                         equations=[ex.equation for ex in examples])
