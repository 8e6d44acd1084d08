"""The compact decoder and the shared-prefix sampler against transformers, on the ``device`` fixture's device
(CUDA graphs and flash-attn included under ``pytest --device cuda``)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from rlfuse.engine.data import build_prompt, read_jsonl
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.model import load_model_and_tokenizer
from rlfuse.engine.rollout import HFRollout
from rlfuse.engine.sampler import SharedPrefixSampler, inverse_cdf_sample, sample_tokens
from rlfuse.engine.trainer import completion_logprobs

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama3-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
}


def tiny_model(name, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval().to(device)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_matches_transformers(name, device):
    hf = tiny_model(name, device=device)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = DecoderLM(hf)(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real].float(), rtol=1e-5, atol=1e-5)


def test_decoder_shares_the_parameters(device):
    hf = tiny_model("llama", device=device)
    decoder = DecoderLM(hf)
    assert {p.data_ptr() for p in decoder.parameters()} <= {p.data_ptr() for p in hf.parameters()}


class StubTokenizer:
    pad_token_id = 0
    eos_token_id = 5


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_recorded_logprobs_equal_a_fresh_forward_with_early_stops(name, device):
    """Samples that stop early leave the batch by groups; what the sampler recorded must still be exact."""
    hf = tiny_model(name, seed=3, device=device)
    hf.generation_config.eos_token_id = 5
    sampler = SharedPrefixSampler(hf, StubTokenizer())
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(6, 97, (n,), generator=gen).tolist() for n in (3, 7, 5, 9, 4)]
    torch.manual_seed(5)
    hf.lm_head.weight.data[5] += 0.6  # make the stop token likely, so that groups finish at different steps
    batch = sampler.generate(prompts, num_generations=3, max_new_tokens=12, temperature=1.3)
    lengths = batch.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # early stops happened
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[2]) and not torch.equal(batch.prompt_ids[0], batch.prompt_ids[3])
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask.long()], 1)
    with torch.no_grad():
        logits = DecoderLM(hf)(ids, mask)[:, batch.prompt_ids.shape[1] - 1: -1] / 1.3
    log_probs = torch.log_softmax(logits, -1)
    want = log_probs.gather(-1, batch.completion_ids[..., None])[..., 0]
    m = batch.completion_mask
    torch.testing.assert_close(batch.logps[m], want[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.vocab_mean[m], log_probs.mean(-1)[m], rtol=1e-4, atol=1e-4)
    ends = batch.completion_ids[torch.arange(15, device=device), lengths - 1]
    assert ((ends == 5) | (lengths == 12)).all()  # each sample ends at its stop token or the length limit


def test_sample_tokens_filters(device):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)).to(device)
    assert torch.equal(sample_tokens(logits, 1.0, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, 0.7, top_p=1e-6), logits.argmax(-1))
    top5 = torch.topk(logits, 5).indices
    drawn = sample_tokens(logits, 2.0, top_k=5)
    assert (top5 == drawn[:, None]).any(-1).all()


def test_greedy_matches_transformers_generate_on_smollm2(smollm2_dir, device):
    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device=device)
    from pathlib import Path

    examples = read_jsonl(Path(__file__).parent / "data" / "gsm8k_test_sample.jsonl")[:3]
    prompts = [build_prompt(tokenizer, ex.question) for ex in examples]
    want = HFRollout(model, tokenizer).generate(prompts, 1, 20, 1.0, greedy=True)
    got = SharedPrefixSampler(model, tokenizer).generate(prompts, 1, 20, 1.0, greedy=True)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.completion_mask, want.completion_mask)
    torch.manual_seed(0)
    sampled = SharedPrefixSampler(model, tokenizer).generate(prompts[:2], 2, 10, 0.7)
    with torch.no_grad():
        fresh = completion_logprobs(model, sampled, 0.7, return_vocab_mean=True, loss_impl="logits")
    m = sampled.completion_mask
    torch.testing.assert_close(sampled.logps[m], fresh.logps[m], rtol=1e-4, atol=1e-4)


def test_static_shape_decode_step_equals_the_sliced_one(monkeypatch, device):
    """The masked full-cache read that CUDA graphs replay gives the tokens and log-probs of the eager read."""
    hf = tiny_model("qwen2", seed=2, device=device)
    hf.generation_config.eos_token_id = 5
    hf.lm_head.weight.data[5] += 0.5  # early stops, so compaction runs between steps
    prompts = [torch.randint(6, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 9, 6)]
    results = []
    for static in (False, True):
        sampler = SharedPrefixSampler(hf, StubTokenizer(), cuda_graphs=False)  # eager both times, on any device
        if static:
            def step_function(state, groups, device, sampler=sampler):
                return lambda new, step: sampler.decode_step(state, groups, new, torch.tensor([step], device=device))
            monkeypatch.setattr(sampler, "_step_function", step_function)
        torch.manual_seed(11)
        results.append(sampler.generate(prompts, 4, 14, 1.1))
    sliced, static = results
    assert torch.equal(sliced.completion_ids, static.completion_ids)
    assert sliced.completion_mask.sum(1).min() < 14  # some samples stopped early
    torch.testing.assert_close(static.logps, sliced.logps, rtol=1e-5, atol=1e-5)


def test_finished_samples_leave_the_decode_batch(monkeypatch, device):
    hf = tiny_model("llama", seed=3, device=device)
    hf.generation_config.eos_token_id = 5
    hf.lm_head.weight.data[5] += 0.8
    sampler = SharedPrefixSampler(hf, StubTokenizer(), cuda_graphs=False)  # one decode_step call per step
    sizes = []
    decode_step = sampler.decode_step
    monkeypatch.setattr(sampler, "decode_step", lambda state, *a, **k: sizes.append(state.rows.numel()) or decode_step(state, *a, **k))
    torch.manual_seed(1)
    batch = sampler.generate([[7, 8, 9], [10, 11, 12, 13]], 8, 16, 1.0)
    lengths = batch.completion_mask.sum(1)
    assert sizes[0] == 16 and min(sizes) < 16  # the batch shrank as samples stopped
    for step, size in enumerate(sizes):  # ... but never below the samples still running at that step
        assert size >= int((lengths > step + 1).sum())


@pytest.mark.filterwarnings("error:CUDA graph capture")  # a failed capture falls back to eager: fail instead
def test_cuda_graph_decode_matches_eager(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need pytest --device cuda")
    hf = tiny_model("qwen3", seed=4, device=device)
    hf.generation_config.eos_token_id = 5
    prompts = [[7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18]]
    eager = SharedPrefixSampler(hf, StubTokenizer(), cuda_graphs=False).generate(prompts, 4, 24, 1.0, greedy=True)
    graphed = SharedPrefixSampler(hf, StubTokenizer(), cuda_graphs=True).generate(prompts, 4, 24, 1.0, greedy=True)
    assert torch.equal(eager.completion_ids, graphed.completion_ids)
    torch.testing.assert_close(graphed.logps, eager.logps, rtol=1e-4, atol=1e-4)


def test_flash_attn_prefill_matches_sdpa(device):
    if device.type != "cuda":
        pytest.skip("flash-attn needs pytest --device cuda")
    pytest.importorskip("flash_attn")
    from rlfuse.engine.decoder import causal_attend, causal_padding_mask, sdpa

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(3, 4, 9, 16, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(3, 2, 9, 16, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[1, :4] = False
    got = causal_attend(mask)(0, q, k, v)
    want = sdpa(q, k, v, causal_padding_mask(mask))
    real = mask[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_non_positive_temperature_names_greedy(temperature, device):
    sampler = SharedPrefixSampler(tiny_model("llama", device=device), StubTokenizer())
    with pytest.raises(ValueError, match="greedy=True"):
        sampler.generate([[7, 8, 9]], num_generations=2, max_new_tokens=3, temperature=temperature)
    greedy = sampler.generate([[7, 8, 9]], num_generations=1, max_new_tokens=3, temperature=1.0, greedy=True)
    assert greedy.completion_ids.shape == (1, 3)


def test_inverse_cdf_sample_matches_the_distribution(device, monkeypatch):
    """Frequencies of many draws match the weights (a chi-square bound that a biased sampler fails), and a
    zero-weight index is never drawn, also when the uniform draw lands on the row's total."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    weights = torch.rand(7, generator=gen) ** 3 + 0.01
    weights[2] = 0.0
    weights[6] = 0.0  # the last index has no weight: an overflow must not land there
    rows = 40000
    drawn = inverse_cdf_sample(weights.expand(rows, -1).contiguous().to(device)).cpu()
    counts = torch.bincount(drawn, minlength=7).double()
    assert counts[2] == 0 and counts[6] == 0
    expected = weights.double() / weights.sum() * rows
    live = expected > 0
    chi2 = (((counts - expected) ** 2)[live] / expected[live]).sum()
    assert chi2 < 25.0, (counts, expected)  # 4 degrees of freedom: P(chi2 > 25) < 1e-4
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)  # a draw of exactly 0 skips leading zero weights
    assert inverse_cdf_sample(torch.tensor([[0.0, 0.5, 0.5]], device=device)).tolist() == [1]
    monkeypatch.setattr(torch, "rand_like", torch.ones_like)  # the rounding case: the draw equals the total
    assert inverse_cdf_sample(torch.tensor([[0.5, 0.5, 0.0]], device=device)).tolist() == [1]
