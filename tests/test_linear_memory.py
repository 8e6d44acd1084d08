"""What the log-probs from hidden states and the LM head allocate and keep: within their formulas, within 10%
of inputs plus gradients at full model shapes, and nothing kept under ``torch.no_grad()``.

Two ways to count, both without a GPU: under Triton's interpreter every buffer the wrappers make is a real
CPU tensor (small shapes, the interpreter's launch configuration); on meta tensors, with the launches
captured instead of run (``bench.launches``), the same wrapper code runs at full shapes configured as on an
H100, and :class:`memory_tracking.LiveBytes` follows every allocation to its release.
"""

import pytest
import torch

from bench.launches import captured_launches
from memory_tracking import LiveBytes, saved_for_backward
from rlfuse.kernels import launch, linear_token_logprobs, linear_token_logprobs_reference

FULL_SHAPES = [(8192, 896, 151936), (8192, 896, 128256), (8192, 4096, 128256), (8192, 4096, 151936),
               (32768, 896, 151936)]


def _leaves(n_rows, hidden, vocab, dtype, device, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed + n_rows + vocab)
    h = torch.randn(n_rows, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=gen).to(device, dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, vocab, (n_rows,), generator=gen).to(device)
    return h, w, b, targets


def _peak_extra(n_rows, hidden, vocab, dtype, device, backward=True):
    """Peak bytes alive during the op (and its backward) beyond the gradients it returns."""
    h, w, _, targets = _leaves(n_rows, hidden, vocab, dtype, device)
    with LiveBytes() as tracker:
        if backward:
            out = linear_token_logprobs(h, w, targets, temperature=0.8, return_entropy=True)
            (out.logps.sum() - 0.3 * out.entropy.sum()).backward()
        else:
            with torch.no_grad():
                out = linear_token_logprobs(h, w, targets, temperature=0.8, return_entropy=True)
    grads = (h.numel() + w.numel()) * h.element_size() if backward else 0
    return tracker.peak - grads, tracker, (h, w)


@pytest.mark.parametrize("backward", [True, False])
def test_hybrid_memory_matches_its_formula(backward, device, monkeypatch):
    """Several row blocks and vocabulary chunks through the interpreter: the peak is the formula plus
    (N,) float32 vectors (outputs, input checks, incoming per-token gradients)."""
    if device.type != "cpu":
        pytest.skip("allocations are counted under Triton's interpreter")
    from rlfuse.kernels.linear_hybrid import extra_bytes

    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", "hybrid")
    n_rows, hidden, vocab = 70, 24, 300  # 3 row blocks of 32, 5 chunks of 64 columns
    extra, tracker, _ = _peak_extra(n_rows, hidden, vocab, torch.float32, device, backward)
    formula = extra_bytes(n_rows, hidden, vocab, torch.float32, None, backward=backward)
    assert 0 <= extra - formula <= 16 * 4 * n_rows, (extra, formula, tracker.allocations)
    assert not any(len(shape) == 2 and shape[-1] == vocab for _, _, shape, _ in tracker.allocations), "(N, V) logits"


@pytest.mark.parametrize("n_rows, hidden, vocab", FULL_SHAPES)
def test_hybrid_memory_at_full_shapes_is_within_ten_percent(n_rows, hidden, vocab, monkeypatch):
    """The wrapper's own allocations at the full shape, configured for an H100 (meta tensors, launches
    captured): forward+backward within 10% of inputs plus gradients, and equal to the formula."""
    from rlfuse.kernels.linear_hybrid import extra_bytes, linear_logprobs_hybrid

    dtype = torch.bfloat16
    h = torch.empty(n_rows, hidden, dtype=dtype, device="meta", requires_grad=True)
    w = torch.empty(vocab, hidden, dtype=dtype, device="meta", requires_grad=True)
    targets = torch.empty(n_rows, dtype=torch.int64, device="meta")
    with captured_launches(launch.TARGETS[90]) as launches:
        with LiveBytes() as forward:
            logps, entropy, _ = linear_logprobs_hybrid(h, w, None, targets, 0.7)
        with LiveBytes() as backward:
            (logps.sum() + entropy.sum()).backward()
    inputs_and_grads = 2 * (h.numel() + w.numel()) * 2
    # The forward's peak, or what it keeps plus the backward's peak beyond the gradients it returns.
    extra = max(forward.peak, forward.live + backward.peak - (h.numel() + w.numel()) * 2)
    formula = extra_bytes(n_rows, hidden, vocab, dtype, launch.TARGETS[90])
    assert 0 <= extra - formula <= 16 * 4 * n_rows, (extra, formula)
    assert extra <= 0.10 * inputs_and_grads, (extra / 2**20, inputs_and_grads / 2**20)
    assert launches, "no kernel was launched"
    # The (N, V) bf16 logits the materialized path keeps would be 13-50x this.
    assert n_rows * vocab * 2 > 5 * extra


@pytest.mark.parametrize("n_rows, hidden, vocab", FULL_SHAPES[:3])
def test_hybrid_under_no_grad_saves_nothing_and_stays_within_bound(n_rows, hidden, vocab):
    from rlfuse.kernels.linear_hybrid import extra_bytes, linear_logprobs_hybrid

    h = torch.empty(n_rows, hidden, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(vocab, hidden, dtype=torch.bfloat16, device="meta", requires_grad=True)
    targets = torch.empty(n_rows, dtype=torch.int64, device="meta")
    with captured_launches(launch.TARGETS[90]), LiveBytes() as tracker, saved_for_backward() as saved, \
            torch.no_grad():
        outs = linear_logprobs_hybrid(h, w, None, targets, 0.7)
    assert saved == [] and all(out.grad_fn is None for out in outs)
    assert tracker.peak <= extra_bytes(n_rows, hidden, vocab, torch.bfloat16, launch.TARGETS[90], backward=False) \
        + 16 * 4 * n_rows
    assert tracker.peak <= 0.10 * 2 * (h.numel() + w.numel()) * 2


@pytest.mark.parametrize("impl", ["hybrid", "fused"])
def test_no_grad_keeps_nothing_for_a_backward(impl, device, monkeypatch):
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", impl)
    h, w, b, targets = _leaves(9, 16, 100, torch.float32, device, bias=True)
    with saved_for_backward() as saved:
        with torch.no_grad():
            out = linear_token_logprobs(h, w, targets, bias=b, return_entropy=True)
    assert saved == [] and out.logps.grad_fn is None
    with saved_for_backward() as saved:  # the same call with gradients on does keep its inputs
        linear_token_logprobs(h, w, targets, bias=b, return_entropy=True)
    assert len(saved) >= 4


def test_fused_backward_extra_memory_matches_its_formula(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("allocations are counted under Triton's interpreter")
    from rlfuse.kernels.linear_logprobs_triton import backward_extra_bytes, forward_extra_bytes

    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", "fused")
    for dtype in (torch.float32, torch.bfloat16):
        n_rows, hidden, vocab = 50, 48, 300
        h, w, _, targets = _leaves(n_rows, hidden, vocab, dtype, device)
        with LiveBytes() as tracker:
            out = linear_token_logprobs(h, w, targets, temperature=0.8, return_entropy=True)
            (out.logps.sum() - 0.3 * out.entropy.sum()).backward()
        total = sum(nbytes for _, nbytes, _, _ in tracker.allocations)
        outputs_and_grads = (h.numel() + w.numel()) * h.element_size()
        per_token = (total - outputs_and_grads - backward_extra_bytes(n_rows, hidden, vocab, dtype, target=None)
                     - forward_extra_bytes(n_rows, hidden, vocab, dtype, target=None))
        assert 0 <= per_token <= 16 * 4 * n_rows, tracker.allocations
        assert not any(shape == (vocab, hidden) and dt == torch.float32 and dtype != torch.float32
                       for _, _, shape, dt in tracker.allocations), "an fp32 (V, H) scratch was allocated"


@pytest.mark.parametrize("impl", ["hybrid", "fused"])
@pytest.mark.parametrize("bias", [False, True])
def test_blocked_and_chunked_gradients_match_the_reference(impl, bias, device, monkeypatch):
    """Several row blocks and vocabulary chunks (the last ones partial) against the float64 reference."""
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", impl)
    n_rows, hidden, vocab = 37, 24, 203
    h, w, b, targets = _leaves(n_rows, hidden, vocab, torch.float32, device, bias=bias)
    targets[3] = -100
    out = linear_token_logprobs(h, w, targets, bias=b, temperature=0.8, return_entropy=True, return_vocab_mean=True)
    (out.logps.sum() - 0.3 * out.entropy.sum() + 0.2 * out.vocab_mean.sum()).backward()
    grads = [h.grad, w.grad] + ([b.grad] if bias else [])
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w) + ((b,) if bias else ())]
    ref = linear_token_logprobs_reference(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                                          temperature=0.8, return_entropy=True, return_vocab_mean=True)
    (ref.logps.sum() - 0.3 * ref.entropy.sum() + 0.2 * ref.vocab_mean.sum()).backward()
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-5, rtol=1e-4)


def test_hybrid_blocks_follow_the_budget():
    blocks = launch.linear_hybrid_blocks
    h100 = launch.TARGETS[90]
    assert blocks(h100, torch.bfloat16, 8192, 896, 151936) == launch.HybridBlocks(rows=8192, columns=512)
    assert blocks(h100, torch.bfloat16, 8192, 4096, 128256) == launch.HybridBlocks(rows=8192, columns=1792)
    # The forward holds no d(logits) and no accumulator: the same budget buys wider chunks, fewer launches.
    assert blocks(h100, torch.bfloat16, 8192, 896, 151936, backward=False) == \
        launch.HybridBlocks(rows=8192, columns=1664)
    # 32768 tokens of a small LM head: the fp32 d(hidden) accumulator alone would pass the budget, so the
    # tokens are split into row blocks.
    wide = blocks(h100, torch.bfloat16, 32768, 896, 151936)
    assert wide.rows < 32768 and wide.rows % 128 == 0 and wide.columns >= launch.LINEAR_CHUNK_MIN
    assert blocks(None, torch.float32, 70, 24, 300) == launch.HybridBlocks(rows=32, columns=64)
    assert blocks(h100, torch.bfloat16, 16, 64, 100).columns == 128  # never wider than the vocabulary


def test_fused_forward_splits_fill_the_gpu_and_never_exceed_the_vocabulary_tiles():
    from rlfuse.kernels.launch import LINEAR_FORWARD_PROGRAMS_PER_SM, linear_forward_splits

    h100 = launch.TARGETS[90]
    # 8192 tokens in 128-token tiles: 64 tiles, cut until 2 programs per multiprocessor (264 on 132).
    splits = linear_forward_splits(h100, 8192, 151936, 128, 64)
    assert 64 * splits >= LINEAR_FORWARD_PROGRAMS_PER_SM * 132 > 64 * (splits - 1)
    assert linear_forward_splits(h100, 1 << 20, 151936, 128, 64) == 1  # enough token tiles already
    assert linear_forward_splits(h100, 1, 100, 128, 64) == 2  # at most one slice per 64 columns
    assert linear_forward_splits(h100, 0, 151936, 128, 64) >= 1  # no token: no division by zero
    assert linear_forward_splits(None, 8192, 151936, 16, 32) == 2  # the interpreter covers the merge
    assert linear_forward_splits(None, 8, 20, 16, 32) == 1


def test_implementation_table_and_override(monkeypatch):
    monkeypatch.delenv("RLFUSE_LINEAR_IMPL", raising=False)
    assert launch.linear_implementation(launch.TARGETS[90]) == launch.LINEAR_IMPLEMENTATION[90]
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", "fused")
    assert launch.linear_implementation(launch.TARGETS[90]) == "fused"
    monkeypatch.setenv("RLFUSE_LINEAR_IMPL", "cublas")
    with pytest.raises(ValueError, match="RLFUSE_LINEAR_IMPL"):
        launch.linear_implementation(None)


def test_launch_overrides_for_sweeps(monkeypatch):
    monkeypatch.setenv("RLFUSE_ROW_CONFIG", "ROWS=2,BLOCK_V=1024,num_warps=4")
    cfg = launch.row_config(launch.TARGETS[90], 151936)
    assert cfg.constexprs == {"ROWS": 2, "BLOCK_V": 1024} and cfg.num_warps == 4
    monkeypatch.setenv("RLFUSE_LINEAR_HYBRID_BLOCKS", "rows=2048,columns=4096")
    assert launch.linear_hybrid_blocks(launch.TARGETS[90], torch.bfloat16, 8192, 896, 151936) == \
        launch.HybridBlocks(rows=2048, columns=4096)
    monkeypatch.setenv("RLFUSE_ROW_CONFIG", "ROWS=two")
    with pytest.raises(ValueError, match="RLFUSE_ROW_CONFIG"):
        launch.row_config(None, 100)
