"""Does a completion derive its answer by the gold equation? An exact check for data with gold equations (SVAMP).

SVAMP ("Are NLP Models really able to Solve Simple Math Word Problems?") gives each problem's equation over the
question's numbers, e.g. ``( ( 14.0 - 2.0 ) - 10.0 )``. A completion's arithmetic steps (as
:func:`rlfuse.engine.derivation.steps` reads them: ``a op b [op c ...] = r``, words around the numbers) derive
the answer by that equation when:

- every step's arithmetic is right;
- every operand is a number of the question, or the result of an earlier step (reused by value, standing for
  that step's expression);
- the expression of a step whose result is the answer equals the gold equation up to commutativity and
  associativity: the same question numbers, each used as often as in the gold, under the same operations
  (``14 - 10 = 4``, ``4 - 2 = 2`` matches ``(14 - 2) - 10``; sums and differences are compared as signed
  multisets of terms, products and quotients as multisets of factors with exponents ±1).

What the heuristic of :mod:`rlfuse.engine.derivation` pays and this refuses: a template that ignores the
question (``a / a = 1``, ``1 + 1 = 2``), identity steps (``3 + 2 - 2 = 3``), and the wrong operation on the
question's numbers that happens to hit the gold value (``9 / 3 = 3`` for ``9 - 3 * 2``).
"""

from __future__ import annotations

import itertools
import re
from typing import List, Optional, Sequence, Tuple

from rlfuse.engine.derivation import QUESTION_NUMBER, _close, _value, evaluate_terms, steps

Node = tuple  # ("n", value) or (op, left, right) with op in "+-*/"
TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|[-+*/()])")
MAX_READINGS = 64  # expressions kept per step when a value could stand for several earlier steps


def parse_equation(text: str) -> Node:
    """The expression tree of an equation such as SVAMP's ``( ( 14.0 - 2.0 ) - 10.0 )``: numbers, ``+ - * /``,
    parentheses, the usual precedence, left to right.

    Raises:
        ValueError: a character or token sequence that is not such an expression.
    """
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"equation {text!r}: cannot read {text[position:]!r}")
        tokens.append(match.group(1))
        position = match.end()
    node, rest = _sum(tokens)
    if rest:
        raise ValueError(f"equation {text!r}: unexpected {' '.join(rest)!r}")
    return node


def _sum(tokens):
    return _chain(tokens, ("+", "-"), _product)


def _product(tokens):
    return _chain(tokens, ("*", "/"), _atom)


def _chain(tokens, operators, operand):
    """Left-associative ``operand (op operand)*`` over ``operators``; returns (tree, the tokens left)."""
    node, tokens = operand(tokens)
    while tokens and isinstance(tokens[0], str) and tokens[0] in operators:
        right, rest = operand(tokens[1:])
        node, tokens = (tokens[0], node, right), rest
    return node, tokens


def _atom(tokens):
    if not tokens:
        raise ValueError("the equation ends early")
    if isinstance(tokens[0], tuple):  # an expression tree already (a step's operand standing for an earlier step)
        return tokens[0], tokens[1:]
    if tokens[0] == "(":
        node, rest = _sum(tokens[1:])
        if not rest or rest[0] != ")":
            raise ValueError("an unclosed parenthesis")
        return node, rest[1:]
    try:
        return ("n", float(tokens[0])), tokens[1:]
    except ValueError:
        raise ValueError(f"expected a number, got {tokens[0]!r}") from None


def canonical(node: Node) -> tuple:
    """A form equal for two expressions exactly when they are equal up to commutativity and associativity:
    a sum as the sorted signed multiset of its terms, a product as the sorted multiset of its factors with
    exponents, numbers rounded to 6 decimals."""
    if node[0] == "n":
        return ("n", round(node[1], 6) + 0.0)
    if node[0] in "+-":
        terms: List[tuple] = []
        _collect(node, 1, terms, "+", "-")
        return ("+", tuple(sorted(terms, key=repr)))
    factors: List[tuple] = []
    _collect(node, 1, factors, "*", "/")
    return ("*", tuple(sorted(factors, key=repr)))


def _collect(node: Node, sign: int, out: list, same: str, inverse: str) -> None:
    if node[0] == same:
        _collect(node[1], sign, out, same, inverse)
        _collect(node[2], sign, out, same, inverse)
    elif node[0] == inverse:
        _collect(node[1], sign, out, same, inverse)
        _collect(node[2], -sign, out, same, inverse)
    else:
        out.append((sign, canonical(node)))


def _step_tree(operands: Sequence[Node], operators: Sequence[str]) -> Node:
    """The tree of ``operands[0] operators[0] operands[1] ...`` (operands are trees), with the usual precedence."""
    tokens: list = [operands[0]]
    for op, operand in zip(operators, operands[1:]):
        tokens += ["*" if op in "*×x" else "/" if op in "/÷" else op, operand]
    return _sum(tokens)[0]


def derived_by_equation(completion: str, question: str, equation: str, answer: str) -> bool:
    """True when ``completion`` derives ``answer`` by ``equation`` (see the module docstring).

    Args:
        completion: the decoded completion.
        question: the problem's text: the numbers a step may use.
        equation: the gold equation over the question's numbers (SVAMP's, e.g. ``( 7.0 - 2.0 )``).
        answer: the gold final answer as text (``"5"``).

    Raises:
        ValueError: ``equation`` is not an expression (:func:`parse_equation`).
    """
    gold = canonical(parse_equation(equation))
    try:
        target = _value(answer.replace("$", "").strip())
    except ValueError:
        return False
    in_question = [_value(number) for number in QUESTION_NUMBER.findall(question)]
    earlier: List[Tuple[float, List[Node]]] = []
    for operands, operators, result in steps(completion):
        if len(operators) != len(operands) - 1:
            return False
        value = evaluate_terms(operands, operators)
        if value is None or not _close(value, result):
            return False  # a wrong step: the arithmetic shown must be right
        readings = []
        for operand in operands:
            options = [("n", q) for q in in_question if _close(q, operand)][:1]
            options += [tree for v, trees in earlier if _close(v, operand) for tree in trees]
            if not options:
                return False  # a number neither in the question nor derived before
            readings.append(options)
        trees = [_step_tree(combo, operators) for combo in itertools.islice(itertools.product(*readings),
                                                                              MAX_READINGS)]
        earlier.append((result, trees))
    return any(canonical(tree) == gold for value, trees in earlier if _close(value, target) for tree in trees)


def equation_of(answer: str) -> Optional[str]:
    """The gold equation of a SVAMP-layout ``answer`` (``"( 7.0 - 2.0 )\\n#### 5"``): the text before its
    ``####`` line when that text is an expression, else None (GSM8K's worked solutions)."""
    if "####" not in answer:
        return None
    head = answer.rsplit("####", 1)[0].strip()
    if not head:
        return None
    try:
        parse_equation(head)
    except ValueError:
        return None
    return head
