"""Passes over the (N, V) logits, counted element by element, and what the logits kernels allocate and keep.

Under Triton's interpreter every ``tl.load`` and ``tl.store`` of the kernels is counted against the logits'
memory and the d(logits) buffer (:class:`memory_tracking.ElementTraffic`). The fused token-local loss reads
each row twice in one program and writes d(logits) once; the second read finds the row in L2 because the
launch configuration caps the rows in flight (checked below at full shapes against the L2 of an H100 and
an H200), so in memory it is one read and one write: two passes. The log-prob op reads once forward and
reads and writes once backward: three passes. Under ``torch.no_grad()`` the logits are read once, nothing is
written, nothing (N, V)-sized is allocated and nothing is kept for a backward.
"""

import pytest
import torch

from bench.launches import captured_launches
from memory_tracking import ElementTraffic, LiveBytes, saved_for_backward
from rlfuse.algos import get_config, policy_loss_from_logits
from rlfuse.kernels import launch, token_logprobs

FULL_SHAPES = [(8192, 128256), (8192, 151936), (32768, 151936)]
GPUS = {"H100": launch.Target(90, 132, 50 << 20), "H200": launch.Target(90, 132, 60 << 20)}


@pytest.fixture(autouse=True)
def _triton(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("memory traffic is counted through Triton's interpreter")
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")


def _inputs(batch=3, seq=5, vocab=701, seed=0):
    gen = torch.Generator().manual_seed(seed)
    storage = torch.randn(batch, seq + 1, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[0, 1] = -100
    old = -torch.rand(batch, seq, generator=gen)
    advantages = torch.randn(batch, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[2, 3:] = False
    return storage, targets, old, advantages, mask


def test_token_local_loss_reads_each_row_twice_in_one_program_and_writes_once():
    storage, targets, old, adv, mask = _inputs()
    logits = storage[:, :-1].clone().requires_grad_(True)
    n_rows, vocab = targets.numel(), logits.shape[-1]
    reads = ElementTraffic(logits)
    with reads.watching():
        loss, _ = policy_loss_from_logits(logits, targets, old, adv, mask, config=get_config("dapo"))
    grad_buffer = [t for t in loss.grad_fn.saved_tensors if t.shape == logits.shape]
    writes = ElementTraffic(grad_buffer[0]) if grad_buffer else None
    # Two sweeps of every row (statistics, then gradient), plus one gather of each kept target logit.
    kept = int((targets != -100).sum())
    assert reads.loaded == 2 * n_rows * vocab + kept
    assert reads.stored == 0
    with writes.watching():  # the forward already wrote d(logits); the backward of grad 1 moves nothing
        loss.backward()
    assert writes.loaded == 0 and writes.stored == 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_token_local_loss_writes_dlogits_once_in_the_forward():
    storage, targets, old, adv, mask = _inputs(seed=1)
    logits = storage[:, :-1].requires_grad_(True)  # in place: d(logits) overwrites the logits' storage
    traffic = ElementTraffic(storage)
    with traffic.watching():
        loss, _ = policy_loss_from_logits(logits, targets, old, adv, mask, config=get_config("grpo"),
                                          inplace_backward=True)
    n_rows, vocab = targets.numel(), logits.shape[-1]
    assert traffic.stored == n_rows * vocab  # one write of every element of d(logits)
    assert traffic.loaded == 2 * n_rows * vocab + int((targets != -100).sum())


@pytest.mark.parametrize("algo", ["dapo", "topr"])
def test_token_local_loss_under_no_grad_reads_once_writes_nothing_keeps_nothing(algo):
    storage, targets, old, adv, mask = _inputs(seed=2)
    logits = storage[:, :-1].requires_grad_(True)
    n_rows, vocab = targets.numel(), logits.shape[-1]
    traffic = ElementTraffic(storage)
    with traffic.watching(), LiveBytes() as tracker, saved_for_backward() as saved, torch.no_grad():
        loss, metrics = policy_loss_from_logits(logits, targets, old, adv, mask, config=get_config(algo))
    assert traffic.loaded == n_rows * vocab + int((targets != -100).sum()) and traffic.stored == 0
    assert saved == [] and loss.grad_fn is None
    assert max(nbytes for _, nbytes, _, _ in tracker.allocations) < n_rows * vocab  # nothing (N, V)-sized
    with torch.no_grad():
        reference, _ = policy_loss_from_logits(logits.detach().double(), targets, old, adv, mask,
                                               config=get_config(algo))
    torch.testing.assert_close(loss.double(), reference.double(), atol=1e-6, rtol=1e-6)


def test_sequence_level_loss_under_no_grad_reads_once_and_keeps_nothing():
    storage, targets, old, adv, mask = _inputs(seed=3)
    logits = storage[:, :-1].requires_grad_(True)
    traffic = ElementTraffic(storage)
    with traffic.watching(), saved_for_backward() as saved, torch.no_grad():
        loss, _ = policy_loss_from_logits(logits, targets, old, adv, mask, config=get_config("gspo"))
    assert traffic.loaded == targets.numel() * logits.shape[-1] + int((targets != -100).sum())
    assert traffic.stored == 0 and saved == [] and loss.grad_fn is None


def test_logprobs_read_once_forward_and_read_write_once_backward():
    storage, targets, _, _, _ = _inputs(seed=4)
    logits = storage[:, :-1].clone().requires_grad_(True)
    n_rows, vocab = targets.numel(), logits.shape[-1]
    traffic = ElementTraffic(logits)
    with traffic.watching():
        out = token_logprobs(logits, targets, return_entropy=True)
    assert traffic.loaded == n_rows * vocab + int((targets != -100).sum()) and traffic.stored == 0
    grads = ElementTraffic(logits)
    with grads.watching():
        (out.logps.sum() + out.entropy.sum()).backward()
    assert grads.loaded == n_rows * vocab and grads.stored == 0  # d(logits) goes to a new buffer
    assert logits.grad is not None


def test_logprobs_under_no_grad_allocate_and_keep_nothing_of_logits_size():
    storage, targets, _, _, _ = _inputs(seed=5)
    logits = storage[:, :-1].requires_grad_(True)
    with LiveBytes() as tracker, saved_for_backward() as saved, torch.no_grad():
        out = token_logprobs(logits, targets, return_entropy=True)
    assert saved == [] and out.logps.grad_fn is None and out.vocab_mean is None
    assert tracker.peak <= 8 * 4 * targets.numel()  # O(N): three outputs and two row statistics


@pytest.mark.parametrize("n_rows, vocab", FULL_SHAPES)
def test_at_full_shapes_no_grad_allocates_o_n_and_the_loss_rows_in_flight_fit_in_l2(n_rows, vocab):
    """Meta tensors, launches captured as on a GPU: the wrappers' own allocations and grids at full shapes."""
    from rlfuse.kernels.logprobs_triton import token_logprobs_triton
    from rlfuse.kernels.token_loss_triton import TokenLossParams, fused_token_loss

    seq = 1024
    logits = torch.empty(n_rows // seq, seq + 1, vocab, dtype=torch.bfloat16, device="meta")[:, :-1]
    logits.requires_grad_(True)
    targets = torch.empty(n_rows // seq, seq, dtype=torch.int64, device="meta")
    per_token = torch.empty(n_rows // seq, seq, device="meta")
    for name, gpu in GPUS.items():
        with captured_launches(gpu) as launches, LiveBytes() as tracker, torch.no_grad():
            token_logprobs_triton(logits, targets, 1.0, True, False, False)
            fused_token_loss(logits, targets, per_token, per_token, per_token, TokenLossParams("ppo_clip"))
        assert tracker.peak <= 16 * 4 * n_rows, (name, tracker.allocations)  # no (N, V)-sized buffer
        loss_launch = [entry for entry in launches if entry.name.endswith("_token_loss_kernel")][0]
        cfg = launch.token_loss_config(gpu, torch.bfloat16, vocab)
        rows_in_flight = loss_launch.grid[0] * cfg.constexprs["ROWS"]
        assert rows_in_flight == launch.rows_in_flight(cfg, n_rows)
        assert rows_in_flight * vocab * 2 <= launch.L2_RESIDENT_FRACTION * gpu.l2_bytes, name
        assert rows_in_flight >= 64  # and still enough programs to stream


def test_token_loss_grid_is_persistent_under_the_interpreter_too():
    """The interpreter's configuration caps the grid below the row groups, so the tests run the loop."""
    cfg = launch.token_loss_config(None, torch.float32, 701)
    assert cfg.programs(100) == cfg.max_programs < 100
