"""The end-to-end benchmark (rlfuse's trainer against TRL's GRPOTrainer) stays runnable on the CPU; speed is
never asserted here, only that both trainers ran, generated tokens and were reported consistently."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import e2e
from rlfuse.engine.rollout import RolloutBatch

DATA = Path(__file__).parent / "data" / "gsm8k_train_sample.jsonl"


def test_e2e_benchmark_smoke(tmp_path, smollm2_dir):
    pytest.importorskip("trl")
    path = e2e.main(e2e.Args(model=smollm2_dir, prompts=1, num_generations=2, max_new_tokens=4, steps=1, warmup=0,
                             data=str(DATA), device="cpu", out_dir=str(tmp_path)))
    payload = json.loads(path.read_text())
    assert payload["smoke"] is False and payload["copy_bandwidth_gbs"] > 0  # the real model at real settings
    rows = {row["impl"]: row for row in payload["rows"]}
    assert set(rows) == {"rlfuse", "trl"}
    for row in rows.values():
        assert row["steps"] == 1 and row["prompts"] == 1 and row["num_generations"] == 2
        for key in ("step_s", "tokens_per_s", "time_rollout", "time_update", "time_generate"):
            assert row[key] > 0, (row["impl"], key)
        assert row["time_logprobs"] >= 0  # beta = 0 and one iteration: nothing to score before the update
        assert 2 <= row["completion_tokens"] <= 2 * 4  # each of the 2 samples makes 1 to 4 tokens
        assert row["time_rollout"] + row["time_logprobs"] + row["time_update"] == pytest.approx(row["step_s"])
    ours, theirs = rows["rlfuse"], rows["trl"]
    assert ours["speedup_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert ours["speedup_step_time"] == pytest.approx(theirs["step_s"] / ours["step_s"])
    assert ours["decode_bytes"] >= 0 and ours["decode_pct_copy_bw"] >= 0
    assert ours["decode_ms_per_step"] is None or ours["decode_ms_per_step"] > 0
    assert ours["trained_share"] == 1.0  # random rewards: no group is skipped, the update does its work
    assert payload["rewards"] == "random"
    assert "speedup_tokens_per_s" not in theirs


def test_random_rewards_are_shared_and_never_equal_within_a_group():
    first, again = e2e.random_rewards(3, 16, seed=0), e2e.random_rewards(3, 16, seed=0)
    assert first == again and len(set(first)) == 16 and all(0 <= r < 1 for r in first)
    assert e2e.random_rewards(4, 16, seed=0) != first
    trl = e2e.trl_random_reward(seed=0)
    assert [trl(["c"] * 16) for _ in range(3)][-1] == first  # TRL's third call is rlfuse's step 3


def test_decode_forwards_counts_positions_after_the_first():
    mask = torch.arange(4)[None, :] < torch.tensor([4, 1, 2, 2])[:, None]
    batch = RolloutBatch(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long),
                         torch.zeros(4, 4, dtype=torch.long), mask)
    assert e2e.decode_forwards(batch, num_generations=2) == 3


class TinyLM(torch.nn.Module):
    """Just what decode_bytes reads: a config and 2 x 10 float32 parameters (80 bytes)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(10))
        self.b = torch.nn.Parameter(torch.zeros(10))
        self.config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                      num_hidden_layers=3, head_dim=None)


def test_decode_bytes_counts_weights_and_kv_read_per_forward():
    # G = 2, two groups with completion lengths (3, 1) and (2, 2); prompts left-padded to 5 tokens.
    lengths = torch.tensor([3, 1, 2, 2])
    mask = torch.arange(3)[None, :] < lengths[:, None]
    batch = RolloutBatch(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long),
                         torch.zeros(4, 3, dtype=torch.long), mask)
    # Forward 0: both groups, 5 prompt + 2 x 1 own positions each; forward 1: group 0 only, 5 + 2 x 2.
    kv_per_position = 2 * 3 * 1 * 4 * 4  # K and V, layers, kv heads, head_dim, float32
    expected = 2 * 80 + kv_per_position * (2 * (5 + 2) + (5 + 4))
    assert e2e.decode_bytes(TinyLM(), batch, num_generations=2) == expected


def test_decode_bytes_of_one_token_rollout_is_zero():
    batch = RolloutBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                         torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool))
    assert e2e.decode_bytes(TinyLM(), batch, num_generations=2) == 0


def test_random_model_folder_loads_in_both_paths(tmp_path, monkeypatch):
    from rlfuse.engine.decoder import DecoderLM
    from rlfuse.engine.model import load_model_and_tokenizer

    monkeypatch.setitem(e2e.RANDOM_MODELS, "qwen-tiny-random", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setitem(e2e.QWEN25_COMMON, "vocab_size", 49152)
    folder = e2e.random_model_dir("qwen-tiny-random", tmp_path / "model", torch.device("cpu"), torch.float32)
    model, tokenizer = load_model_and_tokenizer(folder)
    assert model.config.model_type == "qwen2" and model.config.num_key_value_heads == 2
    assert model.config.tie_word_embeddings and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template
    DecoderLM(model)  # the shared-prefix sampler accepts it
    with pytest.raises(ValueError, match="unknown random model"):
        e2e.random_model_dir("qwen-huge", tmp_path / "other", torch.device("cpu"), torch.float32)


def test_trl_reward_pays_nothing_for_a_completion_cut_at_the_length_limit():
    reward = e2e.trl_reward(format_reward=0.1, incorrect_reward=0.0, stop_ids={2})
    texts = ["3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7", "#### 8"]
    got = reward(texts, ["7", "7", "7"], completion_ids=[[5, 6, 2], [5, 6, 7], [9, 2]])
    assert got == pytest.approx([1.1, 0.0, 0.0])  # correct and stopped; the same text cut; wrong
    # Without the token ids TRL gives every function, nothing counts as cut.
    assert reward(texts[:2], ["7", "7"]) == pytest.approx([1.1, 1.1])
