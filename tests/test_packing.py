"""The shared-prefix packed training forward equals the naive per-sample padded forward: values and gradients,
on the ``device`` fixture's device."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from rlfuse.algos import DAPOConfig, FusedLinearPolicyLoss, GRPOConfig, ROVERConfig
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.packing import pack_groups, shared_prefix_completion_hidden_states, shared_prefix_mask
from rlfuse.engine.rollout import RolloutBatch, left_pad
from rlfuse.engine.trainer import completion_hidden_states

COMMON = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=6),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
}


def tiny_model(name, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="sdpa").double().to(device)


def random_batch(prompt_lengths, G, T, seed, vocab=101, device="cpu"):
    """Groups of G rows sharing a left-padded prompt; completions of random lengths 0..T, right-padded; drawn on
    the CPU, returned on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in prompt_lengths]
    ids, mask = left_pad(prompts, 0)
    rows = len(prompts) * G
    completion = torch.randint(1, vocab, (rows, T), generator=gen)
    lengths = torch.randint(0, T + 1, (rows,), generator=gen)
    lengths[0], lengths[-1] = T, 1  # a full completion and a single-token one
    completion_mask = torch.arange(T)[None] < lengths[:, None]
    completion = torch.where(completion_mask, completion, 0)
    tensors = (ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), completion, completion_mask)
    return RolloutBatch(*(t.to(device) for t in tensors))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("G", [1, 3])
def test_packed_hidden_states_equal_the_padded_forward(name, G, device):
    model = tiny_model(name, device=device)
    batch = random_batch([5, 9, 2], G, 7, seed=G, device=device)
    want = completion_hidden_states(model, batch)[0]
    got = shared_prefix_completion_hidden_states(DecoderLM(model), batch, G)
    m = batch.completion_mask
    assert got.shape == want.shape
    torch.testing.assert_close(got[m], want[m], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", [GRPOConfig(beta=0.05), DAPOConfig(), ROVERConfig()], ids=["grpo-kl", "dapo", "rover"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_forward(config, checkpoint, device, monkeypatch):
    # The float64 loss path on every device: on a GPU the default would be the float32 Triton kernel, tested
    # against its own reference elsewhere; here only the packing is under test.
    monkeypatch.setenv("RLFUSE_BACKEND", "torch")
    G = 4
    batch = random_batch([6, 3], G, 9, seed=7, device=device)
    rows, T = batch.completion_ids.shape
    gen = torch.Generator().manual_seed(8)
    old_logps = (-torch.rand(rows, T, generator=gen, dtype=torch.float64) * 3).to(device)
    ref_logps = (-torch.rand(rows, T, generator=gen, dtype=torch.float64) * 3).to(device)
    old_vocab_mean = (-torch.rand(rows, T, generator=gen, dtype=torch.float64) * 6 - 4).to(device)
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64).to(device)
    loss_fn = FusedLinearPolicyLoss(config, temperature=0.7)
    results = []
    for packed in (False, True):
        model = tiny_model("qwen2", seed=1, device=device)
        if packed:
            hidden = shared_prefix_completion_hidden_states(DecoderLM(model), batch, G, checkpoint=checkpoint)
            head = model.get_output_embeddings()
            weight, bias = head.weight, head.bias
        else:
            hidden, weight, bias = completion_hidden_states(model, batch)
        loss, _ = loss_fn(hidden, weight, batch.completion_ids, old_logps, advantages, batch.completion_mask,
                          ref_logps if config.beta else None, old_vocab_mean if config.loss_type == "rover" else None, bias)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want_grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        # transformers' RMSNorm casts to float32, so gradients summed in another order differ at ~1e-7
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_each_prompt_is_packed_once_without_padding(device):
    G = 3
    batch = random_batch([4, 7], G, 5, seed=3, device=device)
    packed = pack_groups(batch, G)
    lengths = batch.completion_mask.sum(1).clamp(min=1) - 1
    assert packed.input_ids.shape[1] == 4 + 7 + int(lengths.sum())
    assert packed.group_length == max(4 + int(lengths[:3].sum()), 7 + int(lengths[3:].sum()))


def test_mask_rule(device):
    # one group: prompt of 2 tokens, completion 0 with 2 tokens, completion 1 with 1 token, one padding slot
    seq = torch.tensor([[-1, -1, 0, 0, 1, -2]], device=device)
    allowed = shared_prefix_mask(seq, torch.tensor([[0, 1, 2, 3, 2, 0]], device=device))[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool, device=device)
    assert torch.equal(allowed, want)


def test_rows_of_a_group_must_share_the_prompt(device):
    batch = random_batch([4, 6], 2, 3, seed=0, device=device)
    with pytest.raises(ValueError, match="share one prompt"):
        pack_groups(batch, 4)  # a "group" of 4 spans two different prompts
    with pytest.raises(ValueError, match="num_generations must divide"):
        pack_groups(batch, 3)
