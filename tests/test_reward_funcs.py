"""Reward functions with TRL's conventions: loading by name and path, the weighted sum, None, and every fault
named with its function and sample."""

import math
import sys
import textwrap

import pytest
import torch

from rlfuse.engine.reward_funcs import (MathReward, RewardFunctionError, RewardSet, format_reward,
                                        load_reward_function)

LONG = "Say hi to the reader politely, then tell them about the weather today."
PROMPTS = ["What is 2 + 3?", [{"role": "user", "content": LONG}], "q3"]
COMPLETIONS = ["2 + 3 = 5\n#### 5", [{"role": "assistant", "content": "hi"}], "#### 7"]
IDS = [[1, 2, 3], [4], [5, 6]]


def call(rewards, **columns):
    return rewards(PROMPTS, COMPLETIONS, IDS, columns)


def test_weighted_sum_skips_none_and_logs_each_mean():
    def first(prompts, completions, completion_ids, **kwargs):
        return [1.0, None, 3.0]

    def second(prompts, completions, completion_ids, **kwargs):
        return [10.0, 20.0, None]

    scores = call(RewardSet([first, second], [2.0, 0.5]))
    assert scores.total == [2.0 + 5.0, 10.0, 6.0]
    assert scores.per_function == {"first": [1.0, None, 3.0], "second": [10.0, 20.0, None]}
    assert scores.means == {"first": 2.0, "second": 15.0}


def test_columns_and_extras_reach_the_function_per_sample():
    seen = {}

    def spy(prompts, completions, completion_ids, label, trainer_state=None, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, label=label, state=trainer_state)
        kwargs["log_metric"]("spy/seen", len(label))
        return [float(len(x)) for x in label]

    scores = RewardSet([spy])(PROMPTS, COMPLETIONS, IDS, {"label": ["a", "bb", "ccc"]}, trainer_state="S")
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "ids": IDS, "label": ["a", "bb", "ccc"],
                    "state": "S"}
    assert scores.total == [1.0, 2.0, 3.0] and scores.logged == {"spy/seen": 3.0}


def test_tensor_and_numpy_outputs_are_numbers():
    import numpy as np

    scores = call(RewardSet([lambda prompts, completions, completion_ids, **k: torch.tensor([1.0, 2.0, 3.0]),
                             lambda prompts, completions, completion_ids, **k: np.array([0.5, 0.5, 0.5])]))
    assert scores.total == [1.5, 2.5, 3.5]


def test_duplicate_names_are_told_apart():
    assert RewardSet([format_reward, format_reward]).names == ["format_reward_0", "format_reward_1"]


def raising(prompts, completions, completion_ids, **kwargs):
    return [1.0 / (len(p) - 2) for p in prompts]  # the third prompt, "q3", has length 2


@pytest.mark.parametrize("function, message", [
    (raising, "reward function 'raising' raised ZeroDivisionError: float division by zero on sample 2 "
              "(prompt: 'q3')"),
    (lambda prompts, completions, completion_ids, **k: [1.0, 2.0], "returned 2 rewards for 3 samples"),
    (lambda prompts, completions, completion_ids, **k: [None, None, None], "no reward function applies to sample 0"),
    (lambda prompts, completions, completion_ids, **k: [1.0, math.nan, 0.0], "returned nan for sample 1"),
    (lambda prompts, completions, completion_ids, **k: [1.0, 0.0, math.inf], "returned inf for sample 2"),
    (lambda prompts, completions, completion_ids, **k: [1.0, "1", 0.0], "returned '1' (str) for sample 1"),
    (lambda prompts, completions, completion_ids, **k: 1.0, "returned float; expected a list of 3"),
])
def test_faults_name_the_function_and_the_sample(function, message):
    with pytest.raises(RewardFunctionError) as error:
        call(RewardSet([function]))
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)  # the CLI turns it into exit code 2


def test_long_prompts_are_quoted_short():
    # a conversational prompt is quoted by its messages' contents, cut to 60 characters
    with pytest.raises(RewardFunctionError, match=r"sample 1 \(prompt: 'Say hi to the reader politely, then tell them "
                                                  r"about the weat\.\.\.'\)"):
        call(RewardSet([lambda prompts, completions, completion_ids, **k: [1.0, None, 2.0],
                        lambda prompts, completions, completion_ids, **k: [1.0, None, 2.0]]))


def test_weights_must_pair_up():
    with pytest.raises(ValueError, match="--reward-weights has 1 values for 2 reward functions"):
        RewardSet([format_reward, format_reward], [1.0])
    with pytest.raises(ValueError, match="finite"):
        RewardSet([format_reward], [math.nan])


def test_builtins_by_name():
    math_reward = load_reward_function("math", {"format_reward": 0.1, "require_derivation": False})
    assert isinstance(math_reward, MathReward)
    answers = ["... #### 5", "x", "7"]  # a GSM8K solution, and bare final answers
    scores = call(RewardSet([math_reward, load_reward_function("format")]), answer=answers)
    assert scores.per_function["math"] == pytest.approx([1.1, 0.0, 1.1])  # "#### 7" against the bare "7"
    assert scores.per_function["format_reward"] == [1.0, 0.0, 1.0]
    assert math_reward.last.correct == [True, False, True]


def test_math_without_an_answer_column_says_so():
    with pytest.raises(RewardFunctionError, match="needs an 'answer' column"):
        call(RewardSet([MathReward()]))


def test_user_function_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        def length(prompts, completions, completion_ids, **kwargs):
            return [float(len(ids)) for ids in completion_ids]
    """)
    (tmp_path / "my_reward.py").write_text(source)
    from_file = load_reward_function(f"{tmp_path / 'my_reward.py'}:length")
    assert call(RewardSet([from_file])).total == [3.0, 1.0, 2.0]
    (tmp_path / "pkg_rewards").mkdir()
    (tmp_path / "pkg_rewards" / "__init__.py").write_text("")
    (tmp_path / "pkg_rewards" / "scores.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_reward_function("pkg_rewards.scores:length")
    assert call(RewardSet([from_module])).total == [3.0, 1.0, 2.0]
    sys.modules.pop("pkg_rewards.scores", None)
    sys.modules.pop("pkg_rewards", None)


@pytest.mark.parametrize("spec, error, message", [
    ("nosuch", ValueError, "expected one of ('math', 'format')"),
    ("/no/such/file.py:f", FileNotFoundError, "no such file"),
    ("json:no_such_function", ValueError, "json has no attribute 'no_such_function'"),
    ("json:__doc__", ValueError, "__doc__ in json is not callable"),
    ("no_such_package_xyz.mod:f", ValueError, "importing no_such_package_xyz.mod failed: ModuleNotFoundError"),
])
def test_bad_specs_fail_clearly(spec, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_reward_function(spec)


def test_a_file_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed: RuntimeError: boom"):
        load_reward_function(f"{tmp_path / 'broken.py'}:f")
