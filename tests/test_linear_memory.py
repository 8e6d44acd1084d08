"""The fused-linear backward owns its outputs: no (V, H) fp32 scratch, extra memory within its formula.

Under Triton's interpreter every allocation the wrappers make is a real CPU tensor, so a
``TorchDispatchMode`` sees each one. The measured extra bytes at a small shape must equal the formula
``backward_extra_bytes`` (plus O(N) per-token vectors), and the formula at N = 8192, H = 4096,
V = 131072 in bf16 must stay within 10% of inputs plus gradients.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlfuse.kernels import linear_token_logprobs, linear_token_logprobs_reference


class AllocationCounter(TorchDispatchMode):
    """Every tensor an op creates on new storage: (op, bytes, shape, dtype).

    Outputs that share storage with an input (views, ``out=`` ops) are not allocations; neither are the
    interpreter's ``set_`` calls, which alias storage that already exists.
    """

    def __init__(self):
        super().__init__()
        self.allocations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func).startswith("aten.set_"):
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((str(func), tensor.untyped_storage().nbytes(), tuple(tensor.shape), tensor.dtype))
        return out


def _measure(n_rows, hidden, vocab, dtype, bias, device):
    gen = torch.Generator().manual_seed(n_rows + vocab)
    h = torch.randn(n_rows, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=gen).to(device, dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, vocab, (n_rows,), generator=gen).to(device)
    with AllocationCounter() as counter:
        out = linear_token_logprobs(h, w, targets, bias=b, temperature=0.8, return_entropy=True)
        (out.logps.sum() - 0.3 * out.entropy.sum()).backward()
    return counter.allocations, (h, w, b, targets, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_extra_memory_matches_its_formula(dtype, device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("allocations are counted under Triton's interpreter")
    from rlfuse.kernels.linear_logprobs_triton import backward_extra_bytes, forward_extra_bytes

    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    n_rows, hidden, vocab = 50, 48, 300
    allocations, (h, w, _, _, _) = _measure(n_rows, hidden, vocab, dtype, False, device)
    element = torch.finfo(dtype).bits // 8
    outputs_and_grads = h.numel() * element + w.numel() * element  # d(hidden), d(weight)
    total = sum(nbytes for _, nbytes, _, _ in allocations)
    per_token = (total - outputs_and_grads - backward_extra_bytes(n_rows, hidden, vocab, dtype, capability=None)
                 - forward_extra_bytes(n_rows, hidden, vocab, dtype, capability=None))
    # What is left are (N,) float32 vectors: log-prob, entropy, vocab mean, log-sum-exp, input checks and
    # the incoming per-token gradients; a (V, H) or (N, V) buffer would leave far more.
    assert 0 <= per_token <= 16 * 4 * n_rows, allocations
    assert not any(shape in ((vocab, hidden),) and dt == torch.float32 and dtype != torch.float32
                   for _, _, shape, dt in allocations), "an fp32 (V, H) scratch was allocated"
    assert not any(len(shape) == 2 and shape[1] == vocab for _, _, shape, _ in allocations), "(N, V) logits"


def test_backward_extra_memory_at_full_shape_is_within_ten_percent():
    from rlfuse.kernels.linear_logprobs_triton import backward_extra_bytes

    n_rows, hidden, vocab = 8192, 4096, 131072
    element = 2  # bf16
    inputs_and_grads = 2 * (n_rows * hidden + vocab * hidden) * element
    extra = backward_extra_bytes(n_rows, hidden, vocab, torch.bfloat16, capability=90)
    assert extra <= 0.10 * inputs_and_grads, (extra / 2**20, inputs_and_grads / 2**20)
    # The previous design's fp32 (V, H) scratch alone would be 2 GiB, 94% of inputs plus gradients.
    assert vocab * hidden * 4 > 0.9 * inputs_and_grads


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_backward_gradients_match_the_reference(bias, device, monkeypatch):
    """Several vocabulary chunks (the last one partial) against the materialized float64 reference."""
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    n_rows, hidden, vocab = 37, 24, 203
    _, (h, w, b, targets, out) = _measure(n_rows, hidden, vocab, torch.float32, bias, device)
    grads = [h.grad, w.grad] + ([b.grad] if bias else [])
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w) + ((b,) if bias else ())]
    ref = linear_token_logprobs_reference(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                                          temperature=0.8, return_entropy=True)
    (ref.logps.sum() - 0.3 * ref.entropy.sum()).backward()
    torch.testing.assert_close(out.logps, ref.logps.float(), atol=1e-5, rtol=1e-5)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-5, rtol=1e-4)


def test_forward_splits_fill_the_gpu_and_never_exceed_the_vocabulary_tiles():
    from rlfuse.kernels.launch import LINEAR_FORWARD_PROGRAMS_PER_SM, linear_forward_splits

    # 8192 tokens in 128-token tiles: 64 tiles, cut until 2 programs per multiprocessor (264 on 132).
    splits = linear_forward_splits(90, 8192, 151936, 128, 64, 132)
    assert 64 * splits >= LINEAR_FORWARD_PROGRAMS_PER_SM * 132 > 64 * (splits - 1)
    assert linear_forward_splits(90, 1 << 20, 151936, 128, 64, 132) == 1  # enough token tiles already
    assert linear_forward_splits(90, 1, 100, 128, 64, 132) == 2  # at most one slice per 64 columns
    assert linear_forward_splits(90, 0, 151936, 128, 64, 132) >= 1  # no token: no division by zero
    assert linear_forward_splits(None, 8192, 151936, 16, 32, None) == 2  # the interpreter covers the merge
    assert linear_forward_splits(None, 8, 20, 16, 32, None) == 1
