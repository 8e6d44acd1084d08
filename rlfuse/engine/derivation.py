"""Does a completion derive its answer from the question? A check that a guessed answer line cannot pass.

An arithmetic step is ``a op b [op c ...] = r`` (operators ``+ - * / × x ÷``, numbers possibly with ``$``, a
thousands comma or one unit word after them, as in ``10 inches + 20 inches = 30 inches``). A step is
*grounded* when its arithmetic is right and each operand is a number of the question or the result of an
earlier grounded step. A completion shows a derivation of ``answer`` when one grounded step's result is
``answer``. ``#### 2`` alone, ``1 + 1 = 2`` for a question without a 1, and ``7 - 3 = 2`` fail.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

NUMBER = r"\$?\s*(\d[\d,]*(?:\.\d+)?)"
OPERATOR = r"([-+*/×÷]|x(?=\s))"
UNIT = r"(?:\s+[A-Za-z]+)?"
STEP = re.compile(rf"{NUMBER}{UNIT}\s*(?:{OPERATOR}\s*{NUMBER}{UNIT}\s*)+=\s*{NUMBER}")
TERM = re.compile(rf"{NUMBER}{UNIT}\s*(?:{OPERATOR}|=)")
QUESTION_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def evaluate_terms(values: Sequence[float], operators: Sequence[str]) -> Optional[float]:
    """``values[0] operators[0] values[1] ...`` with ``* /`` before ``+ -``; None on a division by zero."""
    terms, signs = [values[0]], []
    for op, value in zip(operators, values[1:]):
        if op in "*×x":
            terms[-1] *= value
        elif op in "/÷":
            if value == 0:
                return None
            terms[-1] /= value
        else:
            signs.append(op)
            terms.append(value)
    total = terms[0]
    for sign, term in zip(signs, terms[1:]):
        total = total + term if sign == "+" else total - term
    return total


def steps(completion: str) -> List[tuple]:
    """The arithmetic steps of ``completion`` in order: (operands, operators, stated result)."""
    found = []
    for match in STEP.finditer(completion):
        text = match.group(0)
        lhs = text[: text.rindex("=") + 1]
        parts = TERM.findall(lhs)
        operands = [_value(number) for number, _ in parts]
        operators = [op for _, op in parts[:-1]]
        found.append((operands, operators, _value(match.group(match.lastindex))))
    return found


def derivation_shown(completion: str, question: str, answer: str) -> bool:
    """True when a grounded arithmetic step of ``completion`` (see the module docstring) results in ``answer``.

    Args:
        completion: the decoded completion.
        question: the problem's text; its numbers are the operands a first step may use.
        answer: the value to be derived, a number as text (``"17"``, ``"2.5"``, ``"1,200"``); another text
            can never be derived and gives False.
    """
    try:
        target = _value(answer.replace("$", "").strip())
    except ValueError:
        return False
    known = [_value(number) for number in QUESTION_NUMBER.findall(question)]
    for operands, operators, result in steps(completion):
        if len(operators) != len(operands) - 1:
            continue
        grounded = all(any(_close(x, k) for k in known) for x in operands)
        value = evaluate_terms(operands, operators)
        if not grounded or value is None or not _close(value, result):
            continue
        if _close(result, target):
            return True
        known.append(result)
    return False
