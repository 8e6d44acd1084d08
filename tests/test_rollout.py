"""Rollout: completion masks, and that the trainer's log-probs align with what the sampler computed."""

import torch

from rlfuse.engine.model import load_model_and_tokenizer
from rlfuse.engine.rollout import HFRollout, completion_mask_from_ids, left_pad
from rlfuse.engine.trainer import completion_logprobs


def test_completion_mask_stops_after_first_stop_token(device):
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 3, 3, 3]], device=device)
    mask = completion_mask_from_ids(ids, [2])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_training_logprobs_match_sampler_scores(smollm2_dir, device):
    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device=device)
    rollout = HFRollout(model, tokenizer)
    prompts = [tokenizer("What is 2+2?")["input_ids"], tokenizer("Name a prime number larger than ten, please.")["input_ids"]]
    torch.manual_seed(0)
    batch = rollout.generate(prompts, num_generations=2, max_new_tokens=6, temperature=0.7)
    assert batch.completion_ids.shape[0] == 4 and batch.prompt_ids.shape[0] == 4
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[1])  # contiguous groups of G
    with torch.no_grad():
        logps = completion_logprobs(model, batch, temperature=0.7).logps
        # Score each sequence alone, unpadded: the log-prob of token t given everything before it.
        for row in range(4):
            prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
            completion = batch.completion_ids[row][batch.completion_mask[row]]
            full = torch.cat([prompt, completion])[None]
            logits = model(full).logits[0, len(prompt) - 1: -1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, completion[:, None])[:, 0]
            torch.testing.assert_close(logps[row][: len(completion)], expected, rtol=1e-4, atol=1e-4)


def test_fused_linear_logprobs_equal_logits_path(smollm2_dir, device):
    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device=device)
    rollout = HFRollout(model, tokenizer)
    torch.manual_seed(1)
    batch = rollout.generate([tokenizer("Count to three:")["input_ids"], tokenizer("Hi")["input_ids"]],
                             num_generations=2, max_new_tokens=5, temperature=0.7)
    with torch.no_grad():
        via_logits = completion_logprobs(model, batch, 0.7, True, True, loss_impl="logits")
        fused = completion_logprobs(model, batch, 0.7, True, True, loss_impl="fused_linear")
    # The same tolerance on a GPU: the fused kernel multiplies float32 operands in IEEE precision there too.
    rtol, atol = 1e-4, 1e-4
    for a, b in zip(fused, via_logits):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
