"""--mixed-precision: bf16 matmuls under autocast, with float32 weights, optimizer state and loss logits; and the
chunked log-prob path, which forms logits only for positions that count."""

import pytest
import torch

from rlfuse.algos import GRPOConfig
from rlfuse.algos.fused_linear import FusedLinearPolicyLoss
from rlfuse.engine import precision
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.precision import autocast, resolve_autocast_dtype
from rlfuse.engine.sampler import SharedPrefixSampler
from rlfuse.kernels import linear_logprobs
from rlfuse.kernels.linear_logprobs import linear_token_logprobs
from rlfuse.kernels.logprobs import IGNORE_INDEX
from test_sampler import StubTokenizer, tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("mode, device, native, weights, want", [
    ("auto", CPU, True, torch.float32, torch.bfloat16),
    ("auto", CPU, False, torch.float32, None),
    ("auto", CUDA, True, torch.float32, None),  # a GPU runs bf16 weights under --dtype auto instead
    ("auto", CPU, True, torch.bfloat16, None),  # autocast only ever casts float32
    ("bf16", CPU, False, torch.float32, torch.bfloat16),
    ("bf16", CUDA, False, torch.float32, torch.bfloat16),
    ("bf16", CPU, True, torch.float64, None),
    ("no", CPU, True, torch.float32, None),
])
def test_resolve_autocast_dtype(mode, device, native, weights, want, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_autocast_dtype(mode, device, weights) == want


def test_unknown_mode_names_the_option():
    with pytest.raises(ValueError, match="--mixed-precision"):
        resolve_autocast_dtype("fp16", CPU, torch.float32)


def _chunked(hidden, weight, targets, bias, backward_under_autocast):
    hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with autocast(CPU, torch.bfloat16 if backward_under_autocast is not None else None):
        out = linear_token_logprobs(hidden, weight, targets, bias, 0.7, True, True, chunk_size=5)
        loss = (out.logps * 1.3 + out.entropy * 0.4 - out.vocab_mean).sum()
        if backward_under_autocast:
            loss.backward()
    if not backward_under_autocast:
        loss.backward()
    return [out.logps, out.entropy, out.vocab_mean, hidden.grad, weight.grad, bias.grad]


@pytest.mark.parametrize("backward_under_autocast", [True, False])
def test_chunked_logprobs_are_fp32_under_autocast(backward_under_autocast):
    """The loss head's logits stay fp32 inside autocast: outputs and gradients equal those without it, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(17, 24, generator=gen), torch.randn(53, 24, generator=gen)
    bias = torch.randn(53, generator=gen)
    targets = torch.randint(0, 53, (17,), generator=gen)
    want = _chunked(hidden, weight, targets, bias, None)
    got = _chunked(hidden, weight, targets, bias, backward_under_autocast)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)


def test_chunked_path_forms_logits_only_for_kept_rows(monkeypatch):
    """Ignored positions (padding) cost no matmul; the others equal the path run on them alone."""
    formed = []
    real = linear_logprobs._chunk_logits
    monkeypatch.setattr(linear_logprobs, "_chunk_logits", lambda h, *a: formed.append(h.shape[0]) or real(h, *a))
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 9, 16, dtype=torch.float64, generator=gen)[:, ::2]  # non-contiguous (4, 5, 16)
    weight = torch.randn(37, 16, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 37, (4, 5), generator=gen)
    targets[0, 3:] = IGNORE_INDEX
    targets[2] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_token_logprobs(h, w, targets, None, 1.0, True, True, chunk_size=4)
    (out.logps.sum() + out.entropy.sum()).backward()
    assert sum(formed) == 2 * int(kept.sum())  # the forward, and the backward's recomputation
    for value in (out.logps, out.entropy, out.vocab_mean):
        assert (value[~kept] == 0).all()
    assert (h.grad[~kept] == 0).all()
    h2, w2 = hidden[kept].clone().requires_grad_(), weight.clone().requires_grad_()
    alone = linear_token_logprobs(h2, w2, targets[kept], None, 1.0, True, True, chunk_size=4)
    (alone.logps.sum() + alone.entropy.sum()).backward()
    torch.testing.assert_close(out.logps[kept], alone.logps)
    torch.testing.assert_close(h.grad[kept], h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_fused_policy_loss_ignores_what_padding_holds(monkeypatch):
    """Padding positions get no logits, so the ids they hold change neither the loss nor its gradient."""
    formed = []
    real = linear_logprobs._chunk_logits
    monkeypatch.setattr(linear_logprobs, "_chunk_logits", lambda h, *a: formed.append(h.shape[0]) or real(h, *a))
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 6, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(29, 8, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 29, (4, 6), generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = mask[3, 4:] = False
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75], dtype=torch.float64)
    results = []
    for pad_id in (0, 17):
        h = hidden.clone().requires_grad_()
        loss, _ = FusedLinearPolicyLoss(GRPOConfig())(h, weight, targets.masked_fill(~mask, pad_id), None,
                                                      advantages, mask)
        loss.backward()
        results.append((loss.detach(), h.grad))
    assert formed == [int(mask.sum())] * 4  # two forwards and two backward recomputations, one chunk each
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _record_linear_dtypes(model):
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    return seen


def test_sampler_under_bf16_autocast_records_the_logprobs_of_its_tokens():
    """Under autocast the decode step's matmuls run in bf16 (the KV cache takes their output), and what the
    sampler records matches a full-sequence forward under the same autocast, within bf16 rounding."""
    hf = tiny_model("llama", seed=3)
    hf.generation_config.eos_token_id = 5
    seen = _record_linear_dtypes(hf)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(6, 97, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    torch.manual_seed(5)
    with autocast(CPU, torch.bfloat16):
        batch = SharedPrefixSampler(hf, StubTokenizer()).generate(prompts, num_generations=3, max_new_tokens=10,
                                                                   temperature=1.1)
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        mask = torch.cat([batch.prompt_mask, batch.completion_mask.long()], 1)
        with torch.no_grad():
            logits = DecoderLM(hf)(ids, mask)[:, batch.prompt_ids.shape[1] - 1: -1] / 1.1
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    want = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    m = batch.completion_mask
    assert m.sum() > 9
    torch.testing.assert_close(batch.logps[m], want[m], rtol=0, atol=0.05)


@pytest.mark.parametrize("mode, want", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_trainer_step_under_mixed_precision(mode, want, smollm2_dir, tmp_path, monkeypatch):
    """Sampling, the training forward and the backward run their matmuls in ``want``; the weights and AdamW's
    state stay float32, and the update moves them."""
    from pathlib import Path

    from rlfuse.engine import reward_funcs as reward_funcs_mod
    from rlfuse.engine import trainer as trainer_mod
    from rlfuse.engine.args import TrainArgs
    from rlfuse.engine.rewards import RewardResult

    real = reward_funcs_mod.gsm8k_rewards

    def alternating(texts, golds, *args, **kwargs):  # rewards with spread, so that the update runs
        scored = real(texts, golds, *args, **kwargs)
        return RewardResult([float(i % 2) for i in range(len(texts))], scored.correct, scored.formatted)

    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", alternating)
    data = Path(__file__).parent / "data" / "gsm8k_train_sample.jsonl"
    args = TrainArgs(model=str(smollm2_dir), data=str(data), prompts_per_step=2, num_generations=2, max_new_tokens=6,
                     steps=1, device="cpu", mixed_precision=mode, output_dir=str(tmp_path / mode))
    trainer = trainer_mod.Trainer(args)
    assert trainer.autocast_dtype == (torch.bfloat16 if mode == "bf16" else None)
    before = trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    seen = _record_linear_dtypes(trainer.model)
    record = trainer.step(1)
    assert record["trained_groups_frac"] == 1.0 and record["grad_norm"] > 0
    assert set(seen) == {want}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    state = trainer.optimizer.state[trainer.trainable[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].abs().sum() > 0
    assert not torch.equal(before, trainer.model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("mode, want", [("bf16", torch.bfloat16), ("no", None)])
def test_evaluation_runs_under_mixed_precision(mode, want, smollm2_dir, monkeypatch):
    """``rlfuse eval`` and compare's base evaluation (both through ``load_and_evaluate``) sample under the
    chosen autocast, with the float32 weights ``--dtype auto`` gives on the CPU."""
    from rlfuse.engine import evaluate

    seen = {}

    def spy(rollout, tokenizer, examples, **kwargs):
        seen.update(autocast=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                    weights={p.dtype for p in rollout.model.parameters()}, kwargs=kwargs)
        return {"examples": len(examples)}

    monkeypatch.setattr(evaluate, "evaluate_examples", spy)
    result = evaluate.load_and_evaluate(smollm2_dir, None, "auto", mode, CPU, ["q1", "q2"], True, num_samples=3)
    assert result == {"examples": 2}
    assert seen == {"autocast": want, "weights": {torch.float32}, "kwargs": {"num_samples": 3}}
    assert not torch.is_autocast_enabled("cpu")  # left as it was found
