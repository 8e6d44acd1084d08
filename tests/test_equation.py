"""The equation check: derivations are paid only by the gold equation, up to commutativity and associativity;
every exploit of the heuristic derivation check earns nothing."""

import json
from pathlib import Path

import pytest

from rlfuse.engine.derivation import derivation_shown
from rlfuse.engine.equation import canonical, derived_by_equation, equation_of, parse_equation

ARCADE = ("At the arcade Dave had won 14 tickets and lost 2 tickets. If he used 10 to buy some toys. "
          "How many tickets did Dave have left?")
ARCADE_EQUATION = "( ( 14.0 - 2.0 ) - 10.0 )"  # gold answer 2
BOXES = "Tom has 9 marbles. He gives 3 marbles to each of his 2 friends. How many marbles does he have left?"
BOXES_EQUATION = "( 9.0 - ( 3.0 * 2.0 ) )"  # gold answer 3
SVAMP_SAMPLE = Path(__file__).parent / "data" / "svamp_test_sample.jsonl"


def paid(completion, question=ARCADE, equation=ARCADE_EQUATION, answer="2"):
    return derived_by_equation(completion, question, equation, answer)


@pytest.mark.parametrize("text, expected", [
    ("( ( 14.0 - 2.0 ) - 10.0 )", ("-", ("-", ("n", 14.0), ("n", 2.0)), ("n", 10.0))),
    ("3 + 4 * 2", ("+", ("n", 3.0), ("*", ("n", 4.0), ("n", 2.0)))),
    ("( 8.0 / 2.0 )", ("/", ("n", 8.0), ("n", 2.0))),
])
def test_parse_equation(text, expected):
    assert parse_equation(text) == expected


@pytest.mark.parametrize("text", ["( 3 + ", "3 + x", "3 4", ")"])
def test_parse_equation_refuses_non_expressions(text):
    with pytest.raises(ValueError):
        parse_equation(text)


def test_canonical_is_commutative_and_associative_and_nothing_more():
    same = ["(14 - 2) - 10", "(14 - 10) - 2", "14 - (2 + 10)", "14 - 10 - 2"]
    assert len({canonical(parse_equation(text)) for text in same}) == 1
    different = ["(14 - 2) - 10", "14 - 12", "(14 + 2) - 10", "(14 - 2) / 10", "14 - 2 - 10 + 2 - 2"]
    assert len({canonical(parse_equation(text)) for text in different}) == len(different)
    assert canonical(parse_equation("7")) == canonical(parse_equation("7.0"))


# Each exploit earns nothing (the heuristic check, for contrast, pays the first three).

@pytest.mark.parametrize("question, equation, answer, number", [
    (ARCADE, ARCADE_EQUATION, "2", 14),
    (BOXES, "( 9.0 - ( 3.0 + 4.0 ) )", "2", 9),
    ("A pie has 6 slices and 2 are eaten. How many are left?", "( 6.0 - 4.0 )", "2", 6),
])
def test_the_template_that_ignores_the_question_earns_nothing(question, equation, answer, number):
    template = f"{number} / {number} = 1\n1 + 1 = 2\n#### 2"
    assert derivation_shown(template, question, answer)  # what the heuristic pays
    assert not derived_by_equation(template, question, equation, answer)


def test_identity_steps_earn_nothing():
    question, equation = "Sam had 5 apples and ate 2. Then he bought 3 more and ate 3. How many?", "( 5.0 - 2.0 )"
    completion = "3 + 2 - 2 = 3\n#### 3"
    assert derivation_shown(completion, question, "3")
    assert not derived_by_equation(completion, question, equation, "3")


def test_a_wrong_operation_that_hits_the_gold_value_earns_nothing():
    completion = "He has 9 / 3 = 3 marbles left.\n#### 3"
    assert derivation_shown(completion, BOXES, "3")
    assert not derived_by_equation(completion, BOXES, BOXES_EQUATION, "3")


def test_a_number_not_in_the_question_earns_nothing():
    assert not paid("14 - 2 = 12\n12 - 10 = 2\n2 * 1 = 2\n#### 2")
    assert not paid("20 - 18 = 2\n#### 2")


def test_a_bare_line_earns_nothing():
    assert not paid("#### 2")


def test_a_copied_number_earns_nothing():
    # the gold answer 2 is also a number of the question: copying it is no derivation
    assert not paid("Dave lost 2 tickets.\n#### 2")


def test_a_correct_answer_with_no_derivation_earns_nothing():
    assert not paid("Dave had some tickets and used them, so the answer is 2.\n#### 2")


def test_a_wrong_step_anywhere_earns_nothing():
    assert not paid("14 - 2 = 12\n12 - 10 = 2\n3 + 3 = 7\n#### 2")


def test_a_derivation_without_its_final_answer_line_earns_nothing_where_a_gold_equation_exists():
    """The rule pays a final `#### N` equal to the gold: a right derivation that never states it is not paid by
    the equation rule, while GSM8K-style data (no gold equation) still pays a correct answer without the line."""
    from rlfuse.engine.data import Example
    from rlfuse.engine.rewards import score

    work = "Dave had 14 - 2 = 12 tickets.\nAfter the toys he has 12 - 10 = 2 tickets."
    svamp = Example(ARCADE, "2", equation=ARCADE_EQUATION)
    result = score([work, work + "\n#### 2", work + "\n#### 2\nDone."], [svamp] * 3)
    assert result.correct == [True, True, True]
    assert result.derived == [False, True, False] and result.rewards == [0.0, 1.1, 0.0]
    gsm8k = Example(ARCADE, "2")
    assert score([work], [gsm8k]).rewards == [1.0]


# Genuine derivations are paid.

@pytest.mark.parametrize("completion", [
    "Dave had 14 - 2 = 12 tickets.\nAfter the toys he has 12 - 10 = 2 tickets.\n#### 2",  # the gold's order
    "14 - 10 = 4\n4 - 2 = 2\n#### 2",  # the other order of the two steps
    "He lost 2 and used 10, 2 + 10 = 12 tickets in all.\n14 - 12 = 2\n#### 2",  # re-associated
    "14 - 2 - 10 = 2\n#### 2",  # one step
    "14.0 tickets - 2 tickets = 12.0 tickets\n12 - 10.0 = 2\n#### 2",  # 7 or 7.0, units around the numbers
])
def test_genuine_derivations_are_paid(completion):
    assert paid(completion)


def test_commuted_operands_are_paid():
    question = "There are 5 red balls and 10 blue balls. How many balls are there?"
    assert derived_by_equation("10 + 5 = 15\n#### 15", question, "( 5.0 + 10.0 )", "15")
    assert derived_by_equation("2 * 3 = 6\n9 - 6 = 3\n#### 3", BOXES, BOXES_EQUATION, "3")


def test_equation_of_reads_svamp_answers_and_not_gsm8k_solutions():
    assert equation_of("( ( 14.0 - 2.0 ) - 10.0 )\n#### 2") == "( ( 14.0 - 2.0 ) - 10.0 )"
    assert equation_of("Natalia sold 48/2 = 24 clips in May.\n#### 72") is None
    assert equation_of("#### 5") is None


def test_every_svamp_sample_gold_equation_derives_its_answer():
    """A completion that writes the gold equation as one step is paid on every shipped SVAMP problem: the
    check never refuses the gold itself."""
    rows = [json.loads(line) for line in SVAMP_SAMPLE.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        equation = equation_of(row["answer"])
        gold = row["answer"].rsplit("####", 1)[1].strip()
        flat = equation.replace("(", "").replace(")", "")
        if any(op in flat for op in "*/") and any(op in flat for op in "+-"):
            continue  # a flat line would change the precedence; the multi-step tests cover these
        step = f"{' '.join(flat.split())} = {gold}\n#### {gold}"
        assert derived_by_equation(step, row["question"], equation, gold), (row["question"], step)


def test_score_pays_svamp_by_its_equation_and_gsm8k_by_grounded_steps():
    from rlfuse.engine.data import Example
    from rlfuse.engine.rewards import score

    svamp = Example(ARCADE, "2", ARCADE_EQUATION)
    gsm8k_like = Example(ARCADE, "2")  # no equation: the grounded-steps rule
    template = "14 / 14 = 1\n1 + 1 = 2\n#### 2"
    genuine = "14 - 10 = 4\n4 - 2 = 2\n#### 2"
    result = score([template, genuine, template, genuine], [svamp, svamp, gsm8k_like, gsm8k_like],
                   truncated=[False, False, False, True])
    assert result.correct == [True] * 4
    assert result.derived == [False, True, True, True]
    assert result.rewards == pytest.approx([0.0, 1.1, 1.1, 0.0])  # the last one was cut: never paid


def test_the_math_reward_checks_svamp_answers_by_their_equation():
    from rlfuse.engine.reward_funcs import MathReward

    reward = MathReward()
    template = "14 / 14 = 1\n1 + 1 = 2\n#### 2"
    paid = reward([ARCADE] * 2, [template, "14 - 2 = 12\n12 - 10 = 2\n#### 2"], [[1], [1]],
                  answer=[f"{ARCADE_EQUATION}\n#### 2"] * 2, question=[ARCADE] * 2)
    assert paid == pytest.approx([0.0, 1.1])
