"""GSM8K rewards: math-verify correctness on the '#### N' form and the format reward."""

import pytest

from rlfuse.engine.rewards import extract_answer, gsm8k_rewards, is_correct, is_formatted


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72", True),
        ("#### 1,000", "1000", True),
        ("#### $18", "18", True),
        ("#### 72.0", "72", True),
        ("#### 71", "72", False),
        ("#### 72\n#### 5", "72", False),  # the last #### line is the answer
        ("The answer is \\boxed{-3}.", "-3", True),  # math-verify's own extraction without ####
        ("no number at all", "3", False),
    ],
)
def test_is_correct(text, gold, expected):
    assert is_correct(text, gold) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("48/2 = 24\n#### 72", True),
        ("#### 72  \n", True),
        ("#### -3.5", True),
        ("#### 72\n#### 72", False),  # repeated final lines
        ("#### 72\nDone.", False),  # not the last line
        ("The answer is 72", False),
        ("#### seventy-two", False),
        ("", False),
    ],
)
def test_is_formatted(text, expected):
    assert is_formatted(text) is expected


def test_rewards_combine_parts_and_topr_scores_plus_minus_one():
    texts = ["work\n#### 72", "#### 5", "72 is it", "#### 72\n#### 72"]
    golds = ["72", "72", "72", "72"]
    grpo = gsm8k_rewards(texts, golds, format_reward=0.1)
    assert grpo.correct == [True, False, True, True]
    assert grpo.formatted == [True, True, False, False]
    assert grpo.rewards == pytest.approx([1.1, 0.1, 1.0, 1.0])
    topr = gsm8k_rewards(texts, golds, format_reward=0.1, incorrect_reward=-1.0)
    assert topr.rewards == pytest.approx([1.1, -0.9, 1.0, 1.0])


def test_rewards_length_mismatch():
    with pytest.raises(ValueError, match="gold"):
        gsm8k_rewards(["a", "b"], ["1"])


def test_extract_answer_prefers_last_hash_line():
    assert extract_answer("12 then 13\n#### 14")[0] == 14
