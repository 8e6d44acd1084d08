"""rlfuse.kernels.token_logprobs against an independent float64 oracle.

The oracle works row by row in float64 with an explicit max-subtracted logsumexp, and its gradients are
the closed forms (not autograd):

    d logp_y / dz_v = (1[v = y] - p_v) / T
    d H / dz_v      = -p_v (log p_v + H) / T        (0 where p_v = 0)
    d vmean / dz_v  = (1 / V - p_v) / T

with z the raw logits and T the temperature. Values and gradients (for random cotangents on every
requested output) of the package are compared with it. The oracle always runs on the CPU; the package runs
on the ``device`` fixture's device (its Triton kernel under ``pytest --device cuda``).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.kernels import IGNORE_INDEX, TokenLogprobs, token_logprobs, token_logprobs_reference

F64 = torch.float64

# float32 results against the float64 oracle.
RTOL, ATOL = 1e-5, 1e-6
# Gradients w.r.t. low-precision logits are rounded to the logits' dtype (half an ulp: 2^-8 for bf16,
# 2^-11 for fp16), so compare them with that relative tolerance.
GRAD_TOL = {
    torch.float32: (RTOL, ATOL),
    torch.float64: (RTOL, ATOL),  # computed in float32 internally, cast back to float64
    torch.float16: (2e-3, 1e-6),
    torch.bfloat16: (1e-2, 1e-6),
}


# --------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------


def oracle(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Per-position float64 logp, entropy, vocab mean and the softmax rows, one row at a time.

    Returns python-side float64 tensors shaped like ``targets`` plus the list of (p, log p) rows
    (None for ignored rows) used by :func:`oracle_grad`.
    """
    V = logits.shape[-1]
    rows = logits.detach().to("cpu", F64).reshape(-1, V)
    tgts = targets.reshape(-1).tolist()
    logp, ent, vmean, probs = [], [], [], []
    for row, y in zip(rows, tgts):
        if y == IGNORE_INDEX:
            logp.append(0.0)
            ent.append(0.0)
            vmean.append(0.0)
            probs.append(None)
            continue
        z = row / temperature
        m = z.max()
        lse = m + torch.log(torch.exp(z - m).sum())
        log_p = z - lse  # -inf stays -inf
        p = torch.exp(log_p)
        live = p > 0
        h = -(p[live] * log_p[live]).sum().item()
        logp.append(log_p[y].item())
        ent.append(h)
        vmean.append(log_p.mean().item())
        probs.append((p, log_p, h))
    shape = tuple(targets.shape)
    as_t = lambda xs: torch.tensor(xs, dtype=F64).reshape(shape)  # noqa: E731
    return as_t(logp), as_t(ent), as_t(vmean), probs


def oracle_grad(logits, targets, temperature, probs, g_logp=None, g_ent=None, g_vmean=None):
    """Closed-form d(sum of cotangent · output)/d logits in float64, shaped like ``logits``."""
    V = logits.shape[-1]
    n = len(probs)
    flat = lambda g: ([0.0] * n) if g is None else g.detach().to(F64).reshape(-1).tolist()  # noqa: E731
    gl, ge, gv = flat(g_logp), flat(g_ent), flat(g_vmean)
    tgts = targets.reshape(-1).tolist()
    out = torch.zeros(n, V, dtype=F64)
    for i, item in enumerate(probs):
        if item is None:
            continue
        p, log_p, h = item
        onehot = torch.zeros(V, dtype=F64)
        onehot[tgts[i]] = 1.0
        safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        row = gl[i] * (onehot - p) + ge[i] * (-p * (safe_log_p + h)) + gv[i] * (1.0 / V - p)
        out[i] = row / temperature
    return out.reshape(tuple(logits.shape))


# --------------------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------------------


def make_logits(B, T, V, dtype, layout, gen, scale=3.0, device="cpu"):
    """(leaf, logits view) with logits (B, T, V) in ``dtype`` on ``device``, laid out as asked."""
    if layout == "contiguous":
        leaf = (torch.randn(B, T, V, generator=gen) * scale).to(dtype).to(device).requires_grad_(True)
        view = leaf
    elif layout == "slice":  # logits[:, :-1] of a bigger tensor
        leaf = (torch.randn(B, T + 1, V, generator=gen) * scale).to(dtype).to(device).requires_grad_(True)
        view = leaf[:, :-1]
    elif layout == "transpose":  # a (B, V, T) buffer seen as (B, T, V)
        leaf = (torch.randn(B, V, T, generator=gen) * scale).to(dtype).to(device).requires_grad_(True)
        view = leaf.transpose(1, 2)
    else:
        raise AssertionError(layout)
    assert tuple(view.shape) == (B, T, V)
    if layout != "contiguous" and T > 1:
        assert not view.is_contiguous()
    return leaf, view


def leaf_grad_as_view(grad_leaf, layout):
    """Map a gradient on the leaf back to the (B, T, V) layout of the logits view."""
    if layout == "contiguous":
        return grad_leaf
    if layout == "slice":
        # the unused last position of the bigger tensor gets no gradient
        assert torch.count_nonzero(grad_leaf[:, -1]).item() == 0
        return grad_leaf[:, :-1]
    return grad_leaf.transpose(1, 2)


def make_targets(shape, V, gen, ignore_frac=0.25, ignore_row=True, device="cpu"):
    targets = torch.randint(0, V, shape, generator=gen)
    if ignore_frac:
        drop = torch.rand(shape, generator=gen) < ignore_frac
        targets = torch.where(drop, torch.full_like(targets, IGNORE_INDEX), targets)
    if ignore_row and len(shape) >= 2 and shape[0] >= 2:
        targets[0] = IGNORE_INDEX  # a fully ignored sequence
    # keep at least one real target so the comparison is not vacuous
    flat = targets.view(-1)
    if flat.numel() and bool((flat == IGNORE_INDEX).all()):
        flat[-1] = V - 1
    return targets.to(device)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    torch.testing.assert_close(actual.detach().to("cpu", F64), expected.to(F64), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "slice", "transpose"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("V", [7, 128, 1007])
def test_values_and_grads_match_oracle(V, dtype, temperature, layout, device):
    gen = torch.Generator().manual_seed(1000 + V + int(temperature * 10) + len(layout))
    B, T = 3, 5
    leaf, logits = make_logits(B, T, V, dtype, layout, gen, device=device)
    targets = make_targets((B, T), V, gen, device=device)

    out = token_logprobs(logits, targets, temperature=temperature, return_entropy=True, return_vocab_mean=True)
    assert isinstance(out, TokenLogprobs)
    for field in out:
        assert field.dtype == torch.float32 and tuple(field.shape) == (B, T)

    # the oracle reads the very same (possibly bf16/fp16) values, upcast to float64
    want_logp, want_ent, want_vm, probs = oracle(logits, targets, temperature)
    assert_close(out.logps, want_logp, what="logps")
    assert_close(out.entropy, want_ent, what="entropy")
    assert_close(out.vocab_mean, want_vm, what="vocab_mean")

    ignored = targets == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    for field in out:
        assert torch.all(field[ignored] == 0)

    # gradients for random cotangents on the three outputs at once
    g = [torch.randn(B, T, generator=gen).to(device) for _ in range(3)]
    total = (out.logps * g[0]).sum() + (out.entropy * g[1]).sum() + (out.vocab_mean * g[2]).sum()
    (grad_leaf,) = torch.autograd.grad(total, leaf)
    assert grad_leaf.dtype == dtype
    grad = leaf_grad_as_view(grad_leaf, layout)
    want = oracle_grad(logits, targets, temperature, probs, *g)
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, want, rtol=rtol, atol=atol, what="d/dlogits")
    # ignored positions get exactly zero gradient
    assert torch.count_nonzero(grad[ignored]).item() == 0


@pytest.mark.parametrize("fn", [token_logprobs, token_logprobs_reference], ids=["token_logprobs", "reference"])
@pytest.mark.parametrize(
    "flags", [(False, False), (True, False), (False, True), (True, True)], ids=["plain", "entropy", "vmean", "both"]
)
def test_return_types_and_each_output_gradient(fn, flags, device):
    """Without flags a bare tensor; with flags a TokenLogprobs with None for what was not asked for."""
    return_entropy, return_vocab_mean = flags
    gen = torch.Generator().manual_seed(7 + 2 * return_entropy + return_vocab_mean)
    B, T, V = 2, 4, 33
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(device).requires_grad_(True)
    targets = make_targets((B, T), V, gen, ignore_frac=0.2, ignore_row=False, device=device)
    out = fn(logits, targets, 1.0, return_entropy, return_vocab_mean)
    want_logp, want_ent, want_vm, probs = oracle(logits, targets, 1.0)
    if not (return_entropy or return_vocab_mean):
        assert isinstance(out, torch.Tensor) and not isinstance(out, tuple)
        logps, ent, vm = out, None, None
    else:
        assert isinstance(out, TokenLogprobs)
        logps, ent, vm = out
        assert (ent is None) == (not return_entropy)
        assert (vm is None) == (not return_vocab_mean)
    assert_close(logps, want_logp, what="logps")
    checks = [("logps", logps, want_logp, {"g_logp": None})]
    if ent is not None:
        assert_close(ent, want_ent, what="entropy")
        checks.append(("entropy", ent, want_ent, {"g_ent": None}))
    if vm is not None:
        assert_close(vm, want_vm, what="vocab_mean")
        checks.append(("vocab_mean", vm, want_vm, {"g_vmean": None}))
    # each output on its own: gradient of (cotangent · output)
    for name, value, _, kw in checks:
        cot = torch.randn(B, T, generator=gen).to(device)
        (grad,) = torch.autograd.grad((value * cot).sum(), logits, retain_graph=True)
        kw = {k: cot for k in kw}
        assert_close(grad, oracle_grad(logits, targets, 1.0, probs, **kw), what=f"d {name}/dlogits")


@pytest.mark.parametrize(
    "shape", [(), (6,), (2, 3), (2, 2, 3)], ids=lambda s: "x".join(map(str, s)) or "scalar"
)
@pytest.mark.parametrize("V", [2, 1007])
def test_any_number_of_leading_dims(shape, V, device):
    gen = torch.Generator().manual_seed(31 + len(shape) + V)
    logits = (torch.randn(*shape, V, generator=gen) * 2).to(device).requires_grad_(True)
    targets = torch.randint(0, V, shape, generator=gen).to(device)
    out = token_logprobs(logits, targets, temperature=0.7, return_entropy=True, return_vocab_mean=True)
    want_logp, want_ent, want_vm, probs = oracle(logits, targets, 0.7)
    for got, want, name in zip(out, (want_logp, want_ent, want_vm), ("logps", "entropy", "vocab_mean")):
        assert tuple(got.shape) == shape
        assert_close(got, want, what=name)
    cot = [torch.randn(shape, generator=gen, dtype=torch.float32).to(device) for _ in range(3)]
    total = sum((o * c).sum() for o, c in zip(out, cot))
    (grad,) = torch.autograd.grad(total, logits)
    assert_close(grad, oracle_grad(logits, targets, 0.7, probs, *cot), what="d/dlogits")


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_large_and_shifted_logits_are_stable(temperature, device):
    """Logits of magnitude ~1e3 would overflow a naive exp; max subtraction must keep things finite."""
    gen = torch.Generator().manual_seed(5)
    B, T, V = 2, 3, 257
    logits = (torch.randn(B, T, V, generator=gen) * 40 + 1000).to(device).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=gen).to(device)
    out = token_logprobs(logits, targets, temperature=temperature, return_entropy=True, return_vocab_mean=True)
    want_logp, want_ent, want_vm, probs = oracle(logits, targets, temperature)
    for got, want, name in zip(out, (want_logp, want_ent, want_vm), ("logps", "entropy", "vocab_mean")):
        assert torch.isfinite(got).all(), name
        # |log-probs| reach ~1e2 here, so the relative error of a float32 log-softmax applies. The entropy
        # (near 0 at this spread) must not inherit ulp(1e3) ~ 1e-4 from a difference of two ~1e3 terms.
        atol = 2e-6 if name == "entropy" else 1e-4
        assert_close(got, want, rtol=1e-5, atol=atol, what=name)
    cot = torch.randn(B, T, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out.logps * cot).sum(), logits)
    assert_close(grad, oracle_grad(logits, targets, temperature, probs, g_logp=cot), what="d logps/dlogits")


# --------------------------------------------------------------------------------------------------
# ignore_index
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_targets_ignored_give_zeros_and_zero_grad(dtype, device):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 4, 19, generator=gen).to(dtype).to(device).requires_grad_(True)
    targets = torch.full((3, 4), IGNORE_INDEX, dtype=torch.long, device=device)
    out = token_logprobs(logits, targets, return_entropy=True, return_vocab_mean=True)
    for field in out:
        assert field.dtype == torch.float32
        assert torch.all(field == 0)
    cot = [torch.randn(3, 4, generator=gen).to(device) for _ in range(3)]
    (grad,) = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cot)), logits)
    assert torch.count_nonzero(grad).item() == 0


def test_ignored_position_is_zero_even_if_its_logits_are_garbage_free_of_influence(device):
    """Changing the logits of an ignored position changes nothing in the kept ones."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 3, 50, generator=gen).to(device)
    targets = torch.randint(0, 50, (2, 3), generator=gen).to(device)
    targets[1, 1] = IGNORE_INDEX
    a = token_logprobs(logits, targets, return_entropy=True, return_vocab_mean=True)
    logits2 = logits.clone()
    logits2[1, 1] = torch.randn(50, generator=gen).to(device) * 10
    b = token_logprobs(logits2, targets, return_entropy=True, return_vocab_mean=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert x[1, 1] == 0


# --------------------------------------------------------------------------------------------------
# -inf logits (masked vocabulary entries)
# --------------------------------------------------------------------------------------------------


def logits_with_neg_inf(B, T, V, dtype, gen, frac=0.3, device="cpu"):
    """Random logits on ``device`` where ~frac of the entries are -inf, never at the target; one row is one-hot."""
    logits = torch.randn(B, T, V, generator=gen) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    dead = torch.rand(B, T, V, generator=gen) < frac
    dead.scatter_(-1, targets.unsqueeze(-1), False)
    dead[0, 0] = True  # only the target survives in this row: p = 1, logp = 0, H = 0
    dead[0, 0, targets[0, 0]] = False
    logits = logits.masked_fill(dead, float("-inf")).to(dtype)
    return logits.to(device), targets.to(device), dead.to(device)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [5, 1007])
def test_neg_inf_logits_values_finite_and_logp_grad(V, dtype, temperature, device):
    gen = torch.Generator().manual_seed(21 + V)
    logits, targets, dead = logits_with_neg_inf(2, 4, V, dtype, gen, device=device)
    targets[1, 2] = IGNORE_INDEX
    logits.requires_grad_(True)
    out = token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    want_logp, want_ent, _, probs = oracle(logits, targets, temperature)
    assert_close(out.logps, want_logp, what="logps")
    assert_close(out.entropy, want_ent, what="entropy")
    assert out.logps[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.entropy[0, 0].item() == pytest.approx(0.0, abs=1e-6)

    cot = torch.randn(2, 4, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out.logps * cot).sum(), logits)
    assert torch.isfinite(grad).all()
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, oracle_grad(logits, targets, temperature, probs, g_logp=cot), rtol=rtol, atol=atol, what="d logps")
    assert torch.count_nonzero(grad[dead]).item() == 0


@pytest.mark.parametrize("V", [5, 1007])
def test_neg_inf_logits_entropy_grad_finite(V, device):
    gen = torch.Generator().manual_seed(41 + V)
    logits, targets, dead = logits_with_neg_inf(2, 3, V, torch.float32, gen, device=device)
    logits.requires_grad_(True)
    out = token_logprobs(logits, targets, return_entropy=True)
    cot = torch.randn(2, 3, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out.entropy * cot).sum(), logits)
    _, _, _, probs = oracle(logits, targets, 1.0)
    assert torch.isfinite(grad).all()
    assert_close(grad, oracle_grad(logits, targets, 1.0, probs, g_ent=cot), what="d entropy")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [7, 8, 1000, -1, -2, -101])
def test_out_of_range_token_ids_raise(bad, device):
    logits = torch.randn(2, 3, 7, device=device)
    targets = torch.randint(0, 7, (2, 3), device=device)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"targets.*{bad}"):
        token_logprobs(logits, targets)


@pytest.mark.parametrize(
    "logits_shape,targets_shape",
    [((2, 3, 7), (2, 4)), ((2, 3, 7), (2, 3, 7)), ((2, 3, 7), (3,)), ((2, 3, 7), (3, 2))],
)
def test_shape_mismatch_raises(logits_shape, targets_shape, device):
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(torch.randn(logits_shape, device=device),
                       torch.zeros(targets_shape, dtype=torch.long, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool], ids=str)
def test_non_integer_targets_raise(dtype, device):
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(torch.randn(2, 3, 7, device=device), torch.zeros(2, 3, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_non_float_logits_raise(dtype, device):
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(torch.zeros(2, 3, 7, dtype=dtype, device=device),
                       torch.zeros(2, 3, dtype=torch.long, device=device))


@pytest.mark.parametrize("temperature", [0.0, -0.7, float("inf"), float("nan")])
def test_bad_temperature_raises(temperature, device):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 3, 7, device=device), torch.zeros(2, 3, dtype=torch.long, device=device),
                       temperature=temperature)


def test_int32_targets_accepted_like_int64(device):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 11, generator=gen).to(device)
    targets = torch.randint(0, 11, (2, 3), generator=gen).to(device)
    assert torch.equal(token_logprobs(logits, targets.int()), token_logprobs(logits, targets))


def test_device_mismatch_raises(device):
    if device.type != "cuda":
        pytest.skip("needs pytest --device cuda to put tensors on two devices")
    with pytest.raises(ValueError, match="targets are on"):
        token_logprobs(torch.randn(2, 3, 7, device=device), torch.zeros(2, 3, dtype=torch.long))


def test_oracle_sanity_against_math():
    """The oracle itself on a hand-sized row (guards the oracle, not the package)."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    lp, h, vm, _ = oracle(logits, torch.tensor([2]), 1.0)
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    ps = [math.exp(v - lse) for v in (1, 2, 3)]
    assert lp.item() == pytest.approx(3 - lse, rel=1e-14)
    assert h.item() == pytest.approx(-sum(p * math.log(p) for p in ps), rel=1e-14)
    assert vm.item() == pytest.approx(2 - lse, rel=1e-14)
