"""GSM8K loading, prompt construction and the step -> prompts schedule."""

import json

import pytest

from rlfuse.engine.data import Example, gold_answer, load_gsm8k, read_jsonl, shared_gsm8k_path
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
