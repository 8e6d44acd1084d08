"""GSM8K and SVAMP loading, prompt construction and the step -> prompts schedule."""

import json
from pathlib import Path

import pytest

from rlfuse.engine.data import (DATASETS, Example, gold_answer, learnable_subset, load_examples, load_gsm8k,
                                read_jsonl, shared_data_path, shared_gsm8k_path)
from rlfuse.engine.trainer import step_examples


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_parses_gold(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"question": " Q1 ", "answer": "a\n#### 1,234"}), "",
                                        json.dumps({"question": "Q2", "answer": "#### -5"})])
    assert read_jsonl(path) == [Example("Q1", "1234"), Example("Q2", "-5")]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "bad",
    ["{not json", json.dumps(["a list"]), json.dumps({"question": "Q"}), json.dumps({"question": "Q", "answer": "no hashes"})],
)
def test_malformed_line_gives_line_number(tmp_path, bad):
    path = write(tmp_path / "d.jsonl", [json.dumps({"question": "Q", "answer": "#### 1"}), bad])
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_gold_answer_requires_hashes():
    assert gold_answer("x\n#### 7") == "7"
    with pytest.raises(ValueError):
        gold_answer("7")


def test_shared_gsm8k_is_found_and_parsed():
    if shared_gsm8k_path("test") is None:
        pytest.skip("no shared GSM8K copy on this machine")
    examples = load_gsm8k("gsm8k", "test")
    assert len(examples) > 1000 and all(ex.gold for ex in examples)


def test_step_examples_deterministic_and_cover_epoch():
    examples = [Example(f"q{i}", str(i)) for i in range(10)]
    first = [step_examples(examples, s, 3, seed=1) for s in range(1, 5)]
    again = [step_examples(examples, s, 3, seed=1) for s in range(1, 5)]
    assert first == again
    seen = [ex.gold for batch in first for ex in batch][:10]
    assert sorted(seen, key=int) == [str(i) for i in range(10)]  # one epoch visits every example once
    assert step_examples(examples, 1, 3, seed=2) != first[0]


def test_build_prompt_uses_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    from rlfuse.engine.data import INSTRUCTION, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.decode(build_prompt(tokenizer, "What is 2+2?"))
    assert "What is 2+2?" in text and INSTRUCTION in text
    assert text.rstrip().endswith("assistant")  # the generation prompt opens the assistant turn


def test_one_shot_prompt_puts_a_worked_example_before_the_question(smollm2_dir):
    from transformers import AutoTokenizer

    from rlfuse.engine.data import INSTRUCTION, ONE_SHOT_ANSWER, ONE_SHOT_QUESTION, build_prompt, prompt_text

    question = "A shop sold 17 pens and 5 pencils. How many more pens than pencils?"
    text = prompt_text(question, "one_shot")
    assert text.index(ONE_SHOT_QUESTION) < text.index(ONE_SHOT_ANSWER) < text.index(question)
    assert text.endswith(f"Question: {question}\nAnswer:") and INSTRUCTION not in text
    assert prompt_text(question) == f"{question}\n{INSTRUCTION}"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    decoded = tokenizer.decode(build_prompt(tokenizer, question, "one_shot"))
    assert text in decoded and decoded.rstrip().endswith("assistant")
    assert build_prompt(tokenizer, question, "one_shot") != build_prompt(tokenizer, question)


def test_one_shot_example_earns_the_full_reward_and_stops():
    """The worked example shows the format the reward pays for: if it drifted, the prompt would teach a
    format that the reward or the stop rule does not accept."""
    import re

    from rlfuse.engine.data import ONE_SHOT_ANSWER
    from rlfuse.engine.rewards import ANSWER_LINE_STOP, gsm8k_rewards

    from rlfuse.engine.data import ONE_SHOT_QUESTION

    scored = gsm8k_rewards([ONE_SHOT_ANSWER], ["10"], questions=[ONE_SHOT_QUESTION])
    assert scored.correct == [True] and scored.formatted == [True] and scored.rewards == [1.1]
    assert scored.derived == [True]  # the example derives its answer as the default reward requires
    assert re.search(ANSWER_LINE_STOP, ONE_SHOT_ANSWER + "\n")


def test_unknown_prompt_style_is_refused():
    from rlfuse.engine.data import prompt_text

    with pytest.raises(ValueError, match="few_shot"):
        prompt_text("q", "few_shot")


DATA = Path(__file__).parent / "data"


def test_svamp_samples_load_with_integer_golds():
    train, test = read_jsonl(DATA / "svamp_train_sample.jsonl"), read_jsonl(DATA / "svamp_test_sample.jsonl")
    assert len(train) == 32 and len(test) == 8
    assert all(ex.gold.lstrip("-").isdigit() for ex in train + test)
    assert not {ex.question for ex in train} & {ex.question for ex in test}


def test_named_data_sets_read_the_shared_copy(tmp_path, monkeypatch):
    for name in DATASETS:
        (tmp_path / name).mkdir()
        write(tmp_path / name / "test.jsonl", [json.dumps({"question": f"{name}?", "answer": "#### 3"})])
    monkeypatch.setenv("RLFUSE_DATA_DIR", str(tmp_path))
    assert shared_data_path("svamp", "test") == tmp_path / "svamp" / "test.jsonl"
    assert load_examples("svamp", "test") == [Example("svamp?", "3")]
    assert load_gsm8k("gsm8k", "test") == [Example("gsm8k?", "3")]


def test_shared_svamp_is_found_and_split():
    if shared_data_path("svamp", "train") is None:
        pytest.skip("no shared SVAMP copy on this machine")
    train, test = load_examples("svamp", "train"), load_examples("svamp", "test")
    assert (len(train), len(test)) == (700, 300)
    assert train[:32] == read_jsonl(DATA / "svamp_train_sample.jsonl")  # the shipped sample is its head


def test_eval_data_defaults_to_the_named_data_set_and_a_file_needs_it():
    from rlfuse.engine.args import TrainArgs

    TrainArgs(data="svamp", eval_every=1).validate()
    with pytest.raises(ValueError, match="--eval-data"):
        TrainArgs(data=str(DATA / "svamp_train_sample.jsonl"), eval_every=1).validate()


def test_learnable_subset_keeps_problems_paid_sometimes():
    rows = [{"question": f"q{i}", "answer": f"x\n#### {i}", "id": f"p{i}"} for i in range(6)]

    def record(i, greedy, paid, correct=None):
        correct = paid if correct is None else correct
        return {"gold": str(i), "greedy_correct": greedy, "greedy_paid": greedy, "sampled_correct": correct,
                "sampled_paid": paid, "sampled_answers": [str(i)] * correct + ["-1"] * (4 - correct)}

    # p5: every sample has the right answer but none is paid (no derivation): learnable under the paid rule.
    problems = [record(0, False, 0), record(1, False, 1), record(2, True, 4), record(3, True, 0),
                record(4, False, 3), record(5, False, 0, correct=4)]
    assert [row["id"] for row in learnable_subset(rows, problems)] == ["p1", "p3", "p4"]
    problems[5]["greedy_paid"] = True
    assert [row["id"] for row in learnable_subset(rows, problems)] == ["p1", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="row 1: gold"):
        learnable_subset(rows, [problems[0], problems[2]] + problems[2:])
    with pytest.raises(ValueError, match="--num-samples"):
        learnable_subset(rows[:1], [{"gold": "0", "greedy_correct": False, "greedy_paid": False}])
    with pytest.raises(ValueError, match="predates the paid rule"):
        learnable_subset(rows[:1], [{"gold": "0", "greedy_correct": False, "sampled_correct": 1,
                                     "sampled_answers": ["0", "1", "2", "3"]}])
    with pytest.raises(ValueError, match="6 rows but 5"):
        learnable_subset(rows, problems[:5])
