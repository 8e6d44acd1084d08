"""The Triton kernels against float64 references: on CPU tensors through Triton's interpreter, or compiled
on a GPU under ``pytest --device cuda``.

Covers token_logprobs (forward, backward for any mix of outputs, in-place backward), the fused
policy_loss_from_logits for every config, and the group_advantages kernel.
"""

import dataclasses

import pytest
import torch

from rlfuse.algos import ALGO_CONFIGS, group_advantages, policy_loss, policy_loss_from_logits
from rlfuse.kernels import token_logprobs

F64 = torch.float64
# Liger-Kernel's per-dtype tolerances for its loss kernels.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 5e-2), torch.float16: (1e-3, 1e-2)}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")


def oracle_logprobs(logits, targets, temperature):
    """float64: (logps, entropy, vocab mean) of the targets; -100 targets give 0."""
    z = logits.to(F64) / temperature
    log_probs = z - torch.logsumexp(z, dim=-1, keepdim=True)
    keep = targets != -100
    logps = log_probs.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)
    vocab_mean = log_probs.mean(-1)
    zero = z.new_zeros(())
    return tuple(torch.where(keep, x, zero) for x in (logps, entropy, vocab_mean))


def make_logits(shape, vocab, dtype, seed, scale=10.0, neg_inf=False, device="cpu"):
    """Random logits up to about ±30 with some -inf entries, as a float64 master copy on ``device`` and the
    CPU generator that drew them (later draws stay the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    master = (torch.randn(*shape, vocab, generator=gen, dtype=F64) * scale).clamp(-30, 30)
    if neg_inf:
        master.view(-1, vocab)[::2, 1::7] = float("-inf")
    master = master.to(dtype).to(F64)  # round once, so both sides see the same values
    return master.to(device), gen


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("vocab", [1, 7, 1007, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_forward_backward(vocab, dtype, temperature, device):
    master, gen = make_logits((3, 5), vocab, dtype, seed=vocab * 7 + int(temperature * 10), neg_inf=vocab > 7,
                              device=device)
    targets = torch.randint(0, vocab, (3, 5), generator=gen).to(device)
    if vocab > 7:
        targets = torch.where(targets % 7 == 1, targets - 1, targets)  # targets avoid the -inf columns
    targets[1, 2] = -100
    logits = master.to(dtype).requires_grad_(True)
    out = token_logprobs(logits, targets, temperature, return_entropy=True, return_vocab_mean=True)
    ref_leaf = master.clone().requires_grad_(True)
    ref = oracle_logprobs(ref_leaf, targets, temperature)
    for name, got, want in zip(("logps", "entropy", "vocab_mean"), out, ref):
        assert got.dtype == torch.float32, name
        finite = torch.isfinite(want)
        close(got[finite], want[finite], dtype)
        assert torch.equal(torch.isfinite(got), finite), name
    weights = [torch.randn(3, 5, generator=gen, dtype=F64).to(device) for _ in range(3)]
    used = [(o, w) for o, w, r in zip(out, weights, ref) if torch.isfinite(r).all()]  # vocab mean is -inf with -inf logits
    torch.autograd.backward([o for o, _ in used], [w.float() for _, w in used])
    ref_used = [(r, w) for r, w in zip(ref, weights) if torch.isfinite(r).all()]
    torch.autograd.backward([r for r, _ in ref_used], [w for _, w in ref_used])
    assert logits.grad.dtype == dtype
    close(logits.grad, ref_leaf.grad, dtype)
    assert torch.count_nonzero(logits.grad[1, 2]) == 0  # ignored target: no gradient


def test_token_logprobs_production_vocabularies(device):
    """Real vocabulary sizes (SmolLM2, Llama 3, Qwen2.5, Gemma 3): many tiles and a ragged last one."""
    for vocab in (49152, 128256, 151936, 262144):
        master, gen = make_logits((2,), vocab, torch.bfloat16, seed=vocab, device=device)
        targets = torch.randint(0, vocab, (2,), generator=gen).to(device)
        logits = master.to(torch.bfloat16).requires_grad_(True)
        out = token_logprobs(logits, targets, 1.0, return_entropy=True)
        ref_leaf = master.clone().requires_grad_(True)
        ref = oracle_logprobs(ref_leaf, targets, 1.0)
        close(out.logps, ref[0], torch.bfloat16)
        close(out.entropy, ref[1], torch.bfloat16)
        (out.logps.sum() + out.entropy.sum()).backward()
        (ref[0].sum() + ref[1].sum()).backward()
        close(logits.grad, ref_leaf.grad, torch.bfloat16)


@pytest.mark.parametrize("spread", [0.05, 3.0, 40.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_entropy_of_shifted_logits(spread, temperature, device):
    """Logits near 1e3 (spread: near-uniform to near-one-hot over 2 tiles): the float32 entropy must not lose
    ulp(1e3) ~ 1e-4 to a difference of two ~1e3 terms (lse - sum p z), nor the gradient to exp(z - lse) with a
    rounded lse; computed relative to the max they stay within a few float32 ulps of the float64 values."""
    gen = torch.Generator().manual_seed(int(spread * 100) + int(temperature * 10))
    master = (torch.randn(4, 3001, generator=gen, dtype=F64) * spread + 1000).to(torch.float32).to(F64).to(device)
    targets = torch.randint(0, 3001, (4,), generator=gen).to(device)
    logits = master.float().requires_grad_(True)
    out = token_logprobs(logits, targets, temperature, return_entropy=True)
    leaf = master.clone().requires_grad_(True)
    want = oracle_logprobs(leaf, targets, temperature)
    torch.testing.assert_close(out.entropy.to(F64), want[1], rtol=1e-5, atol=2e-6)
    # log p = (x - max) / T - log s keeps the log-probs and their gradient free of ulp(1e3) too.
    torch.testing.assert_close(out.logps.to(F64), want[0], rtol=1e-5, atol=2e-5)
    (grad,) = torch.autograd.grad(out.logps.sum(), logits)
    (want_grad,) = torch.autograd.grad(want[0].sum(), leaf)
    torch.testing.assert_close(grad.to(F64), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)])
def test_token_logprobs_each_output_gradient(which, device):
    master, gen = make_logits((4, 3), 515, torch.float32, seed=3, device=device)
    targets = torch.randint(0, 515, (4, 3), generator=gen).to(device)
    logits = master.float().requires_grad_(True)
    ref_leaf = master.clone().requires_grad_(True)
    out = token_logprobs(logits, targets, 0.7, return_entropy=True, return_vocab_mean=True)
    ref = oracle_logprobs(ref_leaf, targets, 0.7)
    weight = torch.randn(4, 3, generator=gen, dtype=F64).to(device)
    sum((o * weight.float()).sum() for o, w in zip(out, which) if w).backward()
    sum((r * weight).sum() for r, w in zip(ref, which) if w).backward()
    close(logits.grad, ref_leaf.grad, torch.float32)


def test_token_logprobs_strided_views_and_inplace_backward(device):
    master, gen = make_logits((2, 6), 333, torch.float32, seed=11, device=device)
    full = master.float().clone().requires_grad_(False)
    targets = torch.randint(0, 333, (2, 5), generator=gen).to(device)
    leaf = full.clone().requires_grad_(True)
    sliced = leaf[:, :-1]  # non-contiguous rows, as logits[:, :-1] in training
    assert not sliced.is_contiguous()
    logps = token_logprobs(sliced, targets, 1.0)
    ref_leaf = master.clone().requires_grad_(True)
    ref = oracle_logprobs(ref_leaf[:, :-1], targets, 1.0)[0]
    close(logps, ref, torch.float32)
    weight = torch.randn(2, 5, generator=gen).to(device)
    (logps * weight).sum().backward()
    (ref * weight.double()).sum().backward()
    close(leaf.grad, ref_leaf.grad, torch.float32)

    # In place: d(logits) is written over the logits buffer and returned as the gradient.
    buffer = full.clone().requires_grad_(True)
    inner = buffer * 1.0  # a non-leaf whose storage the backward may overwrite
    out = token_logprobs(inner[:, :-1], targets, 1.0, inplace_backward=True)
    close(out, ref, torch.float32)
    (out * weight).sum().backward()
    close(buffer.grad, ref_leaf.grad, torch.float32)
    torch.testing.assert_close(inner[:, :-1].detach(), buffer.grad[:, :-1])  # the storage now holds d(logits)


def test_token_logprobs_transposed_and_flat_inputs(device):
    master, gen = make_logits((4,), 129, torch.float32, seed=5, device=device)
    targets = torch.randint(0, 129, (4,), generator=gen).to(device)
    transposed = master.float().t().contiguous().t()  # vocabulary stride != 1
    close(token_logprobs(transposed, targets, 1.0), oracle_logprobs(master, targets, 1.0)[0], torch.float32)
    one = token_logprobs(master[0].float(), targets[0], 1.0)
    close(one, oracle_logprobs(master[0], targets[0], 1.0)[0], torch.float32)


def test_token_logprobs_errors_on_triton_path(device):
    logits = torch.randn(2, 3, 10, device=device)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(logits, torch.full((2, 3), 10, device=device))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long, device=device))


def test_out_of_range_ids_give_nan_inside_cuda_graph_capture(device):
    """Inside CUDA-graph capture the host id check (a sync) is skipped: out-of-range ids give NaN log-probs
    at their positions alone, and the kernel reads nothing out of bounds."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need pytest --device cuda")
    master, gen = make_logits((2, 3), 50, torch.float32, seed=3, device=device)
    logits = master.float()
    good = torch.randint(0, 50, (2, 3), generator=gen).to(device)
    targets = good.clone()
    token_logprobs(logits, targets)  # compiles the kernel before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logps = token_logprobs(logits, targets)  # a (2, 3) tensor: no entropy or vocab mean asked for
    targets[0, 1], targets[1, 2] = 50, -3
    graph.replay()
    torch.cuda.synchronize()
    bad = torch.zeros(2, 3, dtype=torch.bool, device=device)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(logps[bad]).all()
    close(logps[~bad], oracle_logprobs(master, good, 1.0)[0][~bad], torch.float32)


def loss_inputs(config, batch=4, seq=5, vocab=211, dtype=torch.float32, seed=0, device="cpu"):
    """Drawn on the CPU (the same values on every device), returned on ``device``."""
    master, gen = make_logits((batch, seq), vocab, dtype, seed=seed, scale=3.0)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    ref_logps = oracle_logprobs(master, targets, 0.7)[0]
    old = (ref_logps + 0.3 * torch.randn(batch, seq, generator=gen, dtype=F64)).float()
    mask = torch.rand(batch, seq, generator=gen) > 0.25
    mask[1] = False  # a fully masked row
    mask[0, 0] = True
    rewards = torch.randn(batch, generator=gen)
    inputs = dict(master=master, targets=targets, old_logps=old, advantages=rewards, completion_mask=mask,
                  ref_logps=(ref_logps + 0.2 * torch.randn(batch, seq, generator=gen, dtype=F64)).float(),
                  old_vocab_mean=(oracle_logprobs(master, targets, 0.7)[2] + 0.1).float())
    return {name: value.to(device) for name, value in inputs.items()}


def oracle_policy_loss(master, inputs, config):
    """float64: the reference policy loss composed with float64 log-probs, and its d(logits)."""
    leaf = master.clone().requires_grad_(True)
    logps, entropy, vocab_mean = oracle_logprobs(leaf, inputs["targets"], 0.7)
    to64 = {k: inputs[k].to(F64) for k in ("old_logps", "advantages", "ref_logps", "old_vocab_mean")}
    loss, metrics = policy_loss(logps, to64["old_logps"], to64["advantages"], inputs["completion_mask"], config=config,
                                ref_logps=to64["ref_logps"], vocab_mean=vocab_mean, old_vocab_mean=to64["old_vocab_mean"])
    loss.backward()
    mask = inputs["completion_mask"]
    metrics["entropy"] = entropy.detach()[mask].mean()
    return loss.detach(), metrics, leaf.grad


CONFIG_CASES = [pytest.param(cls(), id=name) for name, cls in ALGO_CONFIGS.items()] + [
    pytest.param(ALGO_CONFIGS["grpo"]().replace(beta=0.1, kl_estimator=est, clip_ratio_c=3.0), id=f"grpo-{est}-dual")
    for est in ("k1", "k2", "k3")
] + [
    pytest.param(ALGO_CONFIGS["dapo"]().replace(loss_agg_mode=mode), id=f"dapo-{mode}")
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
] + [pytest.param(ALGO_CONFIGS["topr"]().replace(importance_sampling_level="sequence"), id="topr-sequence"),
     pytest.param(ALGO_CONFIGS["rover"]().replace(rho=0.5), id="rover-rho")]


@pytest.mark.parametrize("config", CONFIG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_from_logits_matches_reference(config, dtype, device):
    inputs = loss_inputs(config, dtype=dtype, seed=sum(map(ord, config.algo)), device=device)
    master = inputs["master"]
    logits = master.to(dtype).requires_grad_(True)
    kwargs = {k: inputs[k] for k in ("old_logps", "advantages", "completion_mask")}
    loss, metrics = policy_loss_from_logits(
        logits, inputs["targets"], **kwargs, config=config, ref_logps=inputs["ref_logps"],
        old_vocab_mean=inputs["old_vocab_mean"], temperature=0.7,
    )
    want_loss, want_metrics, want_grad = oracle_policy_loss(master, inputs, config)
    close(loss, want_loss, dtype)
    for name in ("clip_frac", "kl", "ratio_mean", "entropy"):
        assert not metrics[name].requires_grad
        close(metrics[name], want_metrics[name], dtype)
    loss.backward()
    close(logits.grad, want_grad, dtype)
    assert torch.count_nonzero(logits.grad[1]) == 0  # the fully masked row


def test_policy_loss_from_logits_scales_and_writes_in_place(device):
    config = ALGO_CONFIGS["dapo"]()
    inputs = loss_inputs(config, seed=9, device=device)
    master = inputs["master"]
    kwargs = {k: inputs[k] for k in ("old_logps", "advantages", "completion_mask", "ref_logps")}
    _, _, want_grad = oracle_policy_loss(master, inputs, config)
    leaf = master.float().requires_grad_(True)
    loss, _ = policy_loss_from_logits(leaf, inputs["targets"], **kwargs, config=config, temperature=0.7)
    (3.0 * loss).backward()  # an upstream gradient other than 1 scales the stored d(logits)
    close(leaf.grad, 3.0 * want_grad, torch.float32)

    base = master.float().requires_grad_(True)
    inner = base * 1.0
    loss, _ = policy_loss_from_logits(inner, inputs["targets"], **kwargs, config=config, temperature=0.7,
                                      inplace_backward=True)
    loss.backward()
    close(base.grad, want_grad, torch.float32)


def test_policy_loss_from_logits_checks_inputs(device):
    config = ALGO_CONFIGS["grpo"]()
    inputs = loss_inputs(config, device=device)
    logits = inputs["master"].float()
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss_from_logits(logits, inputs["targets"], inputs["old_logps"][:, :2], inputs["advantages"],
                                inputs["completion_mask"], config=config)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss_from_logits(logits, inputs["targets"], inputs["old_logps"], inputs["advantages"],
                                inputs["completion_mask"], config=dataclasses.replace(config, beta=0.1))


@pytest.mark.parametrize("group_size", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_kernel_matches_reference(group_size, scale, estimator, dtype, monkeypatch, device):
    gen = torch.Generator().manual_seed(group_size * 31)
    rewards = torch.randn(4 * group_size, generator=gen, dtype=dtype).to(device)
    rewards[:group_size] = 0.3  # a group of equal rewards
    got = group_advantages(rewards, group_size, scale=scale, estimator=estimator)
    monkeypatch.setenv("RLFUSE_BACKEND", "torch")
    want = group_advantages(rewards, group_size, scale=scale, estimator=estimator)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(got[:group_size]) == 0


def test_backend_variable_is_validated(monkeypatch, device):
    monkeypatch.setenv("RLFUSE_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="RLFUSE_BACKEND"):
        token_logprobs(torch.randn(2, 5, device=device), torch.zeros(2, dtype=torch.long, device=device))
