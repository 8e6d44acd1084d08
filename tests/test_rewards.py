"""Math rewards: math-verify correctness on the '#### N' form, the format bonus gated on correctness, truncation."""

import pytest

from rlfuse.engine.rewards import answer_key, extract_answer, gsm8k_rewards, is_correct, is_formatted, solved


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


WORK = "There are 23 - 15 = 8 marbles left.\n8 / 4 = 2 marbles each.\n"


@pytest.mark.parametrize(
    "text, truncated, grpo, topr",
    [
        (WORK + "#### 2", False, 1.1, 1.1),  # correct and formatted
        (WORK + "So each boy gets 2.", False, 1.0, 1.0),  # correct without the final line
        ("#### 5", False, 0.0, -1.0),  # a bare final line, wrong: its format earns nothing
        (WORK.replace("= 2", "= 3") + "#### 3", False, 0.0, -1.0),  # a final line after work, wrong
        (WORK + "#### 2", True, 0.0, -1.0),  # cut at the length limit: no answer was given
        (WORK, True, 0.0, -1.0),  # truncated mid-work
    ],
)
def test_reward_table(text, truncated, grpo, topr):
    scored = gsm8k_rewards([text], ["2"], format_reward=0.1, truncated=[truncated])
    assert scored.rewards == pytest.approx([grpo])
    assert gsm8k_rewards([text], ["2"], 0.1, incorrect_reward=-1.0, truncated=[truncated]).rewards == pytest.approx([topr])


def test_no_work_earns_nothing_for_any_format_weight():
    for weight in (0.0, 0.1, 0.5):
        scored = gsm8k_rewards(["#### 5", "#### 7\n", "5"], ["2", "2", "2"], format_reward=weight)
        assert scored.rewards == [0.0, 0.0, 0.0]
        assert scored.formatted == [True, True, False]  # the flags still describe the text


def test_bare_correct_line_is_paid_like_correct_work():
    assert gsm8k_rewards(["#### 2"], ["2"], format_reward=0.1).rewards == pytest.approx([1.1])


def test_instruction_does_not_ask_for_brevity():
    from rlfuse.engine.data import INSTRUCTION

    assert "brief" not in INSTRUCTION.lower() and "short" not in INSTRUCTION.lower()
    assert "step by step" in INSTRUCTION and "####" in INSTRUCTION


def test_rewards_length_mismatch():
    with pytest.raises(ValueError, match="gold"):
        gsm8k_rewards(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="truncated"):
        gsm8k_rewards(["a", "b"], ["1", "2"], truncated=[True])



def test_solved_is_correct_and_not_truncated_and_matches_the_reward():
    texts = ["3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7", "#### 8", "#### 8"]
    truncated = [False, True, False, True]
    scored = gsm8k_rewards(texts, ["7"] * 4, truncated=truncated)
    assert scored.correct == [True, True, False, False]
    assert solved(scored.correct, truncated) == [True, False, False, False]
    assert [r > 0 for r in scored.rewards] == solved(scored.correct, truncated)
    with pytest.raises(ValueError, match="truncated flags"):
        solved([True, False], [False])

@pytest.mark.parametrize(
    "texts, same",
    [
        (["#### 72", "so 72.0", "#### 72.000", "x = 72"], True),
        (["#### 72", "#### 73"], False),
        (["#### 1,000", "#### 1000"], True),
        (["#### 0.5", "the answer is 1/2"], True),
    ],
)
def test_answer_key_groups_equal_values(texts, same):
    keys = {answer_key(t) for t in texts}
    assert (len(keys) == 1) is same and None not in keys


def test_answer_key_of_no_answer_is_none():
    assert answer_key("no number at all") is None


def test_extract_answer_prefers_last_hash_line():
    assert extract_answer("12 then 13\n#### 14")[0] == 14
