"""The derivation check that the training reward can require: grounded, correct arithmetic steps."""

import random

import pytest

from rlfuse.engine.derivation import derivation_shown, evaluate_terms, steps
from rlfuse.engine.rewards import gsm8k_rewards

QUESTION = "There were 23 marbles. 15 were lost. The rest are shared by 4 boys. How many does each boy get?"
WORK = "There are 23 - 15 = 8 marbles left.\n8 / 4 = 2 marbles each.\n"


@pytest.mark.parametrize(
    "text, question, answer, shown",
    [
        (WORK + "#### 2", QUESTION, "2", True),  # two steps, the second on the first's result
        ("#### 2", QUESTION, "2", False),  # a bare answer line
        ("1 + 1 = 2\n#### 2", QUESTION, "2", False),  # right arithmetic, operands not in the question
        ("23 - 15 = 2\n#### 2", QUESTION, "2", False),  # grounded operands, wrong arithmetic
        ("8 / 4 = 2\n#### 2", QUESTION, "2", False),  # 8 is neither in the question nor derived
        ("The total is 10 inches + 20 inches = 30 inches.", "Cut 20 inches; 10 inches are left.", "30", True),
        ("Each box: $ 1,200 / 4 = $300", "He had $ 1,200 and 4 boxes.", "300", True),
        ("3 x 4 = 12 and 3 × 4 = 12", "3 rows of 4", "12", True),
        ("2 + 3 * 4 = 14", "2, 3 and 4", "14", True),  # * before +
        ("2 + 3 * 4 = 20", "2, 3 and 4", "20", False),
        ("5 / 0 = 0", "5 and 0", "0", False),
        (WORK, QUESTION, "two", False),
    ],
)
def test_derivation_table(text, question, answer, shown):
    assert derivation_shown(text, question, answer) is shown


def test_evaluate_terms_matches_python_arithmetic():
    rng = random.Random()
    for _ in range(200):
        values = [float(rng.randint(1, 50)) for _ in range(rng.randint(1, 5))]
        operators = [rng.choice("+-*/") for _ in values[1:]]
        expression = "".join(f"{v}{op}" for v, op in zip(values, operators)) + str(values[-1])
        assert evaluate_terms(values, operators) == pytest.approx(eval(expression))  # noqa: S307 - numbers only


def test_steps_reads_operands_operators_and_result():
    assert steps(WORK) == [([23.0, 15.0], ["-"], 8.0), ([8.0, 4.0], ["/"], 2.0)]


def test_required_derivation_in_the_reward_table():
    texts = [WORK + "#### 2", "#### 2", "23 - 15 = 2\n#### 2", WORK.replace("= 2", "= 3") + "#### 3"]
    golds = ["2"] * 4
    scored = gsm8k_rewards(texts, golds, 0.1, truncated=[False] * 4, questions=[QUESTION] * 4)
    assert scored.rewards == pytest.approx([1.1, 0.0, 0.0, 0.0])
    assert scored.correct == [True, True, True, False] and scored.derived == [True, False, False, False]
    topr = gsm8k_rewards(texts, golds, 0.1, incorrect_reward=-1.0, questions=[QUESTION] * 4)
    assert topr.rewards == pytest.approx([1.1, -1.0, -1.0, -1.0])
    cut = gsm8k_rewards(texts[:1], golds[:1], 0.1, truncated=[True], questions=[QUESTION])
    assert cut.rewards == [0.0]  # truncated: not paid, derived or not
    assert gsm8k_rewards(texts, golds, 0.1).rewards == pytest.approx([1.1, 1.1, 1.1, 0.0])  # without questions
    with pytest.raises(ValueError, match="questions"):
        gsm8k_rewards(texts, golds, questions=[QUESTION])
