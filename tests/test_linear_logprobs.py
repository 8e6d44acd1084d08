"""Log-probs and policy losses from hidden states and the LM head, on every path (chunked PyTorch; the hybrid
and the fused GPU paths, interpreted on the CPU, compiled under ``pytest --device cuda``), against the
materialized float64 reference; plus Liger-Kernel as a peer."""


import pytest
import torch

from rlfuse import ALGO_CONFIGS, FusedLinearPolicyLoss, get_config, linear_token_logprobs, policy_loss
from rlfuse.kernels import linear_token_logprobs_reference

F64 = torch.float64
# One tolerance per dtype on every device: compiled on a GPU, the kernels' tl.dot multiplies float32 operands in
# IEEE precision (as torch does unless TF32 is allowed), so the interpreter's tolerances hold there too.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


@pytest.fixture(params=["torch", "hybrid", "fused"])
def backend(request, monkeypatch):
    """The chunked PyTorch path, or one of the two GPU paths (Triton's interpreter on the CPU): the hybrid
    one (GEMMs per vocabulary chunk with Triton row kernels) or the fused one (Triton tiles)."""
    monkeypatch.setenv("RLFUSE_BACKEND", "torch" if request.param == "torch" else "triton")
    if request.param != "torch":
        monkeypatch.setenv("RLFUSE_LINEAR_IMPL", request.param)
    return request.param


def oracle(hidden, weight, bias, targets, temperature):
    """float64 materialized logits -> (logps, entropy, vocab mean); -100 targets give 0."""
    z = torch.nn.functional.linear(hidden.to(F64), weight.to(F64), None if bias is None else bias.to(F64))
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    keep = targets != -100
    logps = log_probs.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)  # p log p = 0 where p = 0
    zero = z.new_zeros(())
    return tuple(torch.where(keep, x, zero) for x in (logps, entropy, log_probs.mean(-1)))


def make(batch, seq, size_h, vocab, dtype, seed, with_bias=True, device="cpu"):
    """Drawn on the CPU (the same values on every device); the tensors are returned on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq + 1, size_h, generator=gen, dtype=F64).to(dtype).to(F64)
    weight = (torch.randn(vocab, size_h, generator=gen, dtype=F64) * 3 / size_h ** 0.5).to(dtype).to(F64)
    bias = torch.randn(vocab, generator=gen, dtype=F64).to(dtype).to(F64) if with_bias else None
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[0, 1] = -100
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    return hidden, weight, None if bias is None else bias.to(device), targets, gen


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("size_h, vocab", [(40, 301), (16, 64), (33, 1000)])  # not multiples of the tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients(backend, size_h, vocab, dtype, with_bias, device):
    hidden, weight, bias, targets, gen = make(2, 9, size_h, vocab, dtype, seed=size_h + vocab, with_bias=with_bias,
                                              device=device)
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    refs = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    # A strided slice, as h[:, P - 1:-1] in training.
    out = linear_token_logprobs(leaves[0][:, :-1], leaves[1], targets, leaves[2], 0.7, True, True, chunk_size=5)
    ref = oracle(refs[0][:, :-1], refs[1], refs[2], targets, 0.7)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32 and got.shape == targets.shape
        close(got, want, dtype)
    weights = [torch.randn(targets.shape, generator=gen, dtype=F64).to(device) for _ in range(3)]
    sum((o.to(F64) * w).sum() for o, w in zip(out, weights)).backward()
    sum((r * w).sum() for r, w in zip(ref, weights)).backward()
    for leaf, ref_leaf in zip(leaves, refs):
        if leaf is not None:
            assert leaf.grad.dtype == dtype
            close(leaf.grad, ref_leaf.grad, dtype)


@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_output_alone(backend, which, device):
    hidden, weight, bias, targets, gen = make(3, 4, 24, 130, torch.float32, seed=5, device=device)
    leaves = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    refs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = linear_token_logprobs(leaves[0][:, 1:], leaves[1], targets, leaves[2], 1.0, True, True)
    ref = oracle(refs[0][:, 1:], refs[1], refs[2], targets, 1.0)
    sum(o.sum() for o, w in zip(out, which) if w).backward()
    sum(r.sum() for r, w in zip(ref, which) if w).backward()
    for leaf, ref_leaf in zip(leaves, refs):
        close(leaf.grad, ref_leaf.grad, torch.float32)


def test_tied_embedding_gets_both_gradients(backend, device):
    """The LM head is the input embedding: its gradient is the sum of both uses."""
    gen = torch.Generator().manual_seed(3)
    vocab, size_h = 97, 24
    table = (torch.randn(vocab, size_h, generator=gen, dtype=F64) * 0.3).to(device)
    ids = torch.randint(0, vocab, (2, 6), generator=gen).to(device)
    targets = torch.randint(0, vocab, (2, 5), generator=gen).to(device)
    leaf, ref_leaf = table.float().requires_grad_(True), table.clone().requires_grad_(True)
    hidden = torch.tanh(torch.nn.functional.embedding(ids, leaf))[:, :-1]
    linear_token_logprobs(hidden, leaf, targets).sum().backward()
    ref_hidden = torch.tanh(torch.nn.functional.embedding(ids, ref_leaf))[:, :-1]
    oracle(ref_hidden, ref_leaf, None, targets, 1.0)[0].sum().backward()
    close(leaf.grad, ref_leaf.grad, torch.float32)


def test_flat_inputs_and_errors(backend, device):
    hidden, weight, bias, targets, _ = make(1, 7, 16, 50, torch.float32, seed=1, device=device)
    flat = linear_token_logprobs(hidden[0, :7].float(), weight.float(), targets[0])
    close(flat, oracle(hidden[0, :7], weight, None, targets[0], 1.0)[0], torch.float32)
    with pytest.raises(ValueError, match="hidden_states"):
        linear_token_logprobs(hidden[..., :5].float(), weight.float(), targets)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_token_logprobs(hidden[:, :-1].float(), weight.to(torch.bfloat16), targets)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_token_logprobs(hidden[:, :-1].float(), weight.float(), torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="targets shape"):
        linear_token_logprobs(hidden.float(), weight.float(), targets)


CONFIGS = [pytest.param(cls(), id=name) for name, cls in ALGO_CONFIGS.items()] + [
    pytest.param(get_config("grpo", beta=0.05, kl_estimator="k3", clip_ratio_c=3.0), id="grpo-kl-dual"),
    pytest.param(get_config("topr", importance_sampling_level="sequence"), id="topr-sequence"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_linear_policy_loss_matches_materialized(backend, config, device):
    hidden, weight, bias, targets, gen = make(4, 6, 20, 150, torch.float32, seed=len(config.algo), device=device)
    with torch.no_grad():
        logps, _, vocab_mean = oracle(hidden[:, :-1], weight, bias, targets, 0.7)
    old = (logps + 0.2 * torch.randn(logps.shape, generator=gen, dtype=F64).to(device)).float()
    ref_logps = (logps + 0.1 * torch.randn(logps.shape, generator=gen, dtype=F64).to(device)).float()
    old_vocab_mean = (vocab_mean + 0.05).float()
    advantages = torch.randn(4, generator=gen).to(device)
    mask = (torch.rand(4, 6, generator=gen) > 0.2).to(device)
    mask[2] = False  # a fully masked row
    leaves = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = FusedLinearPolicyLoss(config, temperature=0.7, chunk_size=7)(
        leaves[0][:, :-1], leaves[1], targets, old, advantages, mask, ref_logps=ref_logps,
        old_vocab_mean=old_vocab_mean, bias=leaves[2])
    refs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    r_logps, r_entropy, r_vmean = oracle(refs[0][:, :-1], refs[1], refs[2], targets, 0.7)
    want, want_metrics = policy_loss(r_logps, old.to(F64), advantages.to(F64), mask, config=config,
                                     ref_logps=ref_logps.to(F64), vocab_mean=r_vmean,
                                     old_vocab_mean=old_vocab_mean.to(F64))
    close(loss, want, torch.float32)
    for name in ("clip_frac", "kl", "ratio_mean"):
        close(metrics[name], want_metrics[name], torch.float32)
    close(metrics["entropy"], r_entropy.detach()[mask].mean(), torch.float32)
    loss.backward()
    want.backward()
    for leaf, ref_leaf in zip(leaves, refs):
        close(leaf.grad, ref_leaf.grad, torch.float32)


@pytest.mark.parametrize("algo, loss_type", [("grpo", "grpo"), ("dapo", "dapo"), ("dr_grpo", "dr_grpo")])
def test_matches_liger_fused_linear_grpo_loss(algo, loss_type, monkeypatch, device):
    """Same inputs, same loss and gradients as Liger-Kernel's LigerFusedLinearGRPOLoss (its PyTorch path)."""
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    monkeypatch.setenv("RLFUSE_BACKEND", "torch")
    config = get_config(algo)
    hidden, weight, _, targets, gen = make(3, 5, 16, 50, torch.float32, seed=11, device=device)
    targets[0, 1] = 3  # Liger has no ignore_index; the mask does the skipping
    mask = torch.ones(3, 5, dtype=torch.long, device=device)
    mask[1, 3:] = 0
    advantages = torch.randn(3, generator=gen).to(device)
    with torch.no_grad():
        old = (oracle(hidden[:, :-1], weight, None, targets, 0.7)[0]
               + 0.1 * torch.randn(3, 5, generator=gen, dtype=F64).to(device)).float()
    liger = chunked_loss.LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=False, use_ref_model=False, epsilon_low=config.epsilon_low,
        epsilon_high=config.epsilon_high, loss_type=loss_type, max_completion_length=5, temperature=0.7)
    grads = []
    for run in ("liger", "rlfuse"):
        h, w = hidden[:, :-1].float().clone().requires_grad_(True), weight.float().clone().requires_grad_(True)
        if run == "liger":
            loss = liger(h, w, targets, mask, advantages, old_per_token_logps=old)[0]
        else:
            loss = FusedLinearPolicyLoss(config, temperature=0.7)(h, w, targets, old, advantages, mask)[0]
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spread", [0.01, 0.05])
def test_entropy_of_shifted_logits(spread, backend, device):
    """A bias of 1e3 shifts every logit: the float32 entropy must stay within a few ulps of the float64 one
    (no lse - sum p z cancellation, which would cost ulp(1e3) ~ 1e-4). The logits' spread stays small: the
    entropy is then insensitive to the float32 rounding of the logits themselves (ulp(1e3) ~ 6e-5 each),
    which a wider spread would pass on to it on any path."""
    gen = torch.Generator().manual_seed(int(spread * 10))
    hidden = torch.randn(6, 32, generator=gen, dtype=F64).float().to(F64)
    weight = (torch.randn(1001, 32, generator=gen, dtype=F64) * spread / 32 ** 0.5).float().to(F64)
    bias = torch.full((1001,), 1000.0, dtype=F64)
    targets = torch.randint(0, 1001, (6,), generator=gen)
    hidden, weight, bias, targets = (x.to(device) for x in (hidden, weight, bias, targets))
    out = linear_token_logprobs(hidden.float(), weight.float(), targets, bias.float(), 0.7, True)
    want = oracle(hidden, weight, bias, targets, 0.7)[1]
    torch.testing.assert_close(out.entropy.to(F64), want, rtol=1e-5, atol=2e-6)


def test_minus_infinity_bias_entries(backend, device):
    """Vocabulary entries a bias of -inf rules out: probability 0, finite log-probs elsewhere, no gradient
    to them, entropy and gradients as the float64 oracle's."""
    hidden, weight, bias, targets, _ = make(2, 5, 24, 203, torch.float32, seed=9, device=device)
    bias[::7] = float("-inf")
    targets = torch.where(targets % 7 == 0, targets + 1, targets)  # no target on a ruled-out entry
    leaves = [t.float().requires_grad_(True) for t in (hidden[:, :-1], weight)]
    out = linear_token_logprobs(leaves[0], leaves[1], targets, bias=bias.float(), temperature=0.7,
                                return_entropy=True)
    (out.logps.sum() + 0.5 * out.entropy.sum()).backward()
    ref = [t.detach().double().requires_grad_(True) for t in (hidden[:, :-1], weight)]
    want = oracle(ref[0], ref[1], bias.double(), targets, 0.7)
    (want[0].sum() + 0.5 * want[1].sum()).backward()
    close(out.logps, want[0], torch.float32)
    close(out.entropy, want[1], torch.float32)
    for got, leaf in zip(leaves, ref):
        assert torch.isfinite(got.grad).all()
        close(got.grad, leaf.grad, torch.float32)


def test_autocast_does_not_round_the_logits(backend, device):
    """Under bf16 autocast (the trainer's --mixed-precision) fp32 inputs still give fp32 logits on every path."""
    hidden, weight, bias, targets, _ = make(2, 4, 24, 203, torch.float32, seed=10, device=device)
    h, w = hidden[:, :-1].float(), weight.float()
    plain = linear_token_logprobs(h, w, targets, return_entropy=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed = linear_token_logprobs(h, w, targets, return_entropy=True)
    torch.testing.assert_close(mixed.logps, plain.logps, rtol=0, atol=0)
    torch.testing.assert_close(mixed.entropy, plain.entropy, rtol=0, atol=0)


def test_a_per_call_temperature_is_the_modules_temperature():
    """The trainer passes the temperature with each call, as to the logits loss: the same loss as a module built
    with it, and a different one from the module's own default."""
    torch.manual_seed(0)
    B, T, H, V = 2, 5, 8, 13
    h = torch.randn(B, T, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    old = -torch.rand(B, T, dtype=torch.float64)
    advantages = torch.tensor([0.5, -1.0], dtype=torch.float64)
    config = get_config("dapo")
    built = FusedLinearPolicyLoss(config, temperature=0.6)(h, w, targets, old, advantages, mask)[0]
    per_call = FusedLinearPolicyLoss(config)(h, w, targets, old, advantages, mask, temperature=0.6)[0]
    default = FusedLinearPolicyLoss(config)(h, w, targets, old, advantages, mask)[0]
    torch.testing.assert_close(per_call, built, rtol=0, atol=0)
    assert not torch.allclose(per_call, default)
