"""Ending completions after the final answer line: the pattern, and the sampler on the real SmolLM2 model."""

import re
from pathlib import Path

import pytest
import torch

from rlfuse.engine.args import TrainArgs
from rlfuse.engine.data import build_prompt, load_examples
from rlfuse.engine.evaluate import make_rollout
from rlfuse.engine.model import load_model_and_tokenizer
from rlfuse.engine.rewards import ANSWER_LINE_STOP, is_formatted
from rlfuse.engine.rollout import batch_truncated, truncated_rows
from rlfuse.engine.sampler import SharedPrefixSampler

DATA = Path(__file__).parent / "data"
ENDS_WITH_ANSWER_LINE = re.compile(f"(?:{ANSWER_LINE_STOP})$")


@pytest.mark.parametrize("text, stops", [
    ("#### 5\n", True), ("Work: 2 + 3 = 5.\n#### 5\n", True), ("2 + 3\n  ####  -1,234.5 \n", True),
    ("#### $12\n", True), ("#### 5", False), ("#### 33 * 10 = 330\n", False), ("So #### 5\n", False),
    ("#### five\n", False), ("####\n", False), ("#### 5\nmore\n", False),
])
def test_answer_line_pattern(text, stops):
    assert bool(ENDS_WITH_ANSWER_LINE.search(text)) == stops
    if stops:  # what the pattern stops at, the reward reads as a formatted final line
        assert is_formatted(text)


def expected_stop(tokenizer, ids, stop_ids):
    """Length of a completion cut by the answer-line rule, found by decoding every prefix (slow, simple)."""
    for end in range(1, len(ids) + 1):
        if ids[end - 1] in stop_ids:
            return end, False
        text = tokenizer.decode(ids[:end])
        if "\n" in tokenizer.decode(ids[end - 1: end]) and ENDS_WITH_ANSWER_LINE.search(text[: text.rfind("\n") + 1]):
            return end, False
    return len(ids), True


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model_and_tokenizer(smollm2_dir, torch.float32, "cpu")


def test_sampler_stops_after_the_answer_line_and_keeps_the_prefix(smollm2):
    model, tokenizer = smollm2
    examples = load_examples(str(DATA / "svamp_test_sample.jsonl"), "test")[:8]
    prompts = [build_prompt(tokenizer, ex.question) for ex in examples]
    plain = SharedPrefixSampler(model, tokenizer)
    stopping = SharedPrefixSampler(model, tokenizer, stop_pattern=ANSWER_LINE_STOP)
    full = plain.generate(prompts, 1, 96, 1.0, greedy=True)
    cut = stopping.generate(prompts, 1, 96, 1.0, greedy=True)
    stop_ids = set(plain.stop_ids.tolist())
    pattern_stops = 0
    for row in range(len(prompts)):
        ids = full.completion_ids[row, : int(full.completion_mask[row].sum())].tolist()
        length, truncated = expected_stop(tokenizer, ids, stop_ids)
        got = int(cut.completion_mask[row].sum())
        assert got == length, row
        assert cut.completion_ids[row, :got].tolist() == ids[:length]
        torch.testing.assert_close(cut.logps[row, :got], full.logps[row, :length])
        assert bool(cut.truncated[row]) == truncated
        pattern_stops += length < len(ids) and ids[length - 1] not in stop_ids
    assert pattern_stops >= 1  # the rule acted on this sample, so the test can tell it from no rule
    # Without the rule, the sampler's own flags agree with the last-token test.
    assert torch.equal(full.truncated, truncated_rows(full.completion_ids, full.completion_mask, plain.stop_ids))
    assert torch.equal(batch_truncated(cut, []), cut.truncated)


def test_hf_rollout_refuses_the_rule():
    with pytest.raises(ValueError, match="--no-stop-after-answer"):
        TrainArgs(rollout="hf").validate()
    TrainArgs(rollout="hf", stop_after_answer=False).validate()


def test_make_rollout_without_the_engine_needs_the_rule_off(monkeypatch):
    from rlfuse.engine import sampler as sampler_mod

    def refuse(*args, **kwargs):
        raise ValueError("unsupported architecture")

    monkeypatch.setattr(sampler_mod.SharedPrefixSampler, "__init__", refuse)
    with pytest.raises(ValueError, match="--no-stop-after-answer"):
        make_rollout(None, None, stop_after_answer=True)
