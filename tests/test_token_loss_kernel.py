"""The single-kernel token-local policy loss from logits (``rlfuse.kernels.token_loss_triton``).

Oracle: the plain composition ``token_logprobs_reference`` + ``policy_loss`` in float64 (the torch path of
``policy_loss_from_logits``), loss, metrics and d(logits) alike. Launches are counted through Triton's
interpreter: a token-local loss makes exactly one launch over the logits.
"""

import zlib

import pytest
import torch

from rlfuse.algos import get_config, policy_loss_from_logits
from rlfuse.algos.fused import is_token_local, passes_over_logits

ALGOS = ["grpo", "dr_grpo", "dapo", "topr", "reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_drop",
         "red_weight", "cispo"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _inputs(device, batch=4, seq=6, vocab=37, seed=0, dtype=torch.float64, temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq + 1, vocab, generator=gen, dtype=dtype) * 2).to(device)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    # Old log-probs near the current ones, so ratios land on both sides of the clip range.
    ref_lp = torch.log_softmax(logits[:, :-1].double() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = (ref_lp + 0.2 * torch.randn(batch, seq, generator=gen, dtype=torch.float64).to(device)).to(torch.float32)
    ref = (ref_lp + 0.3 * torch.randn(batch, seq, generator=gen, dtype=torch.float64).to(device)).to(torch.float32)
    advantages = torch.randn(batch, generator=gen).to(device)
    mask = torch.rand(batch, seq, generator=gen).to(device) > 0.25
    mask[1] = False  # a fully masked sequence
    return logits, targets, old, advantages, mask, ref


def _run(backend, monkeypatch, logits, *args, grad_scale=1.0, **kwargs):
    monkeypatch.setenv("RLFUSE_BACKEND", backend)
    x = logits.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss_from_logits(x[:, :-1], *args, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach().double(), x.grad.double(), {k: v for k, v in metrics.items() if v is not None}


def _assert_matches(fused, reference, atol=1e-6):
    # Both sides compute in fp32 (the reference upcasts the logits to fp32 too), in different orders.
    torch.testing.assert_close(fused[0], reference[0], atol=max(atol, 1e-5), rtol=1e-5)
    torch.testing.assert_close(fused[1], reference[1], atol=atol, rtol=1e-5)
    assert fused[2].keys() == reference[2].keys()
    for key in reference[2]:
        torch.testing.assert_close(fused[2][key].double(), reference[2][key].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
def test_matches_reference_every_aggregation(algo, loss_agg_mode, device, monkeypatch):
    config = get_config(algo, loss_agg_mode=loss_agg_mode)
    logits, targets, old, adv, mask, _ = _inputs(device, seed=zlib.crc32(f"{algo}/{loss_agg_mode}".encode()) % 1000,
                                                 temperature=0.7)
    args = (targets, old, adv, mask)
    fused = _run("triton", monkeypatch, logits, *args, config=config, temperature=0.7)
    reference = _run("torch", monkeypatch, logits, *args, config=config, temperature=0.7)
    _assert_matches(fused, reference)
    assert fused[1].abs().sum() > 0  # a gradient that is not trivially zero


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_matches_reference_with_kl(algo, kl_estimator, beta, device, monkeypatch):
    config = get_config(algo, beta=beta, kl_estimator=kl_estimator)
    logits, targets, old, adv, mask, ref = _inputs(device, seed=7)
    args = (targets, old, adv, mask)
    fused = _run("triton", monkeypatch, logits, *args, config=config, ref_logps=ref)
    reference = _run("torch", monkeypatch, logits, *args, config=config, ref_logps=ref)
    _assert_matches(fused, reference)
    assert "kl" in fused[2]


@pytest.mark.parametrize("overrides", [
    {"clip_mode": "one-side"}, {"clip_mode": "two-side"}, {"clip_mode": "ring"},
    {"clip_mode": "ring", "weight": "truncated_importance_sampling", "regularizer": "k2", "regularizer_coef": 0.3},
    {"weight": "importance_sampling", "regularizer": "forward-kl", "regularizer_coef": 0.2},
    {"weight": "advantage", "weight_temperature": 0.5},
])
def test_rec_dials_with_ratios_in_every_region(overrides, device, monkeypatch):
    """Old log-probs far from the current ones, so ratios fall inside the band, between the band and the
    ring, and beyond the ring, for advantages of both signs (per-token advantages)."""
    config = get_config("rec", **overrides)
    logits, targets, _, _, mask, _ = _inputs(device, batch=6, seq=8, seed=21)
    gen = torch.Generator().manual_seed(22)
    current = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = (current + 1.5 * torch.randn(current.shape, generator=gen, dtype=torch.float64).to(device)).float()
    adv = torch.randn(targets.shape, generator=gen).to(device)
    ratio = (current - old.double()).exp()[mask]
    assert (ratio < 0.4).any() and ((ratio > 0.8) & (ratio < 1.2)).any() and (ratio > 3).any()
    args = (targets, old, adv, mask)
    fused = _run("triton", monkeypatch, logits, *args, config=config)
    reference = _run("torch", monkeypatch, logits, *args, config=config)
    _assert_matches(fused, reference)


def test_dual_clip_token_advantages_and_grad_scale(device, monkeypatch):
    config = get_config("grpo", clip_ratio_c=1.5, epsilon_low=0.05, epsilon_high=0.05)
    logits, targets, old, _, mask, _ = _inputs(device, seed=3)
    adv = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5)).to(device)  # (B, T) advantages
    args = (targets, old, adv, mask)
    fused = _run("triton", monkeypatch, logits, *args, config=config, grad_scale=2.5)
    reference = _run("torch", monkeypatch, logits, *args, config=config, grad_scale=2.5)
    _assert_matches(fused, reference)
    assert 0 < float(fused[2]["clip_frac"]) < 1


@pytest.mark.parametrize("algo", ["grpo", "topr"])
def test_awkward_inputs(algo, device, monkeypatch):
    """Odd V over several vocabulary tiles, -inf logits, a strided slice, ignored targets, zero advantages
    (G = 1 or equal rewards), in bf16 logits."""
    logits, targets, old, adv, mask, _ = _inputs(device, batch=3, seq=5, vocab=2053, seed=11)
    logits[0, 2, :1000] = float("-inf")
    logits[2, 0, 5] = float("-inf")
    targets[2, 0] = 5  # a -inf target logit: log-prob -inf, masked out below
    mask[2, 0] = False
    targets[0, 4] = -100
    mask[0, 4] = False
    adv[2] = 0.0
    config = get_config(algo)
    for dtype, atol in ((torch.float64, 1e-6), (torch.bfloat16, 1e-2)):
        x = logits.to(dtype)
        args = (targets, old, adv, mask)
        fused = _run("triton", monkeypatch, x, *args, config=config)
        reference = _run("torch", monkeypatch, x, *args, config=config)
        _assert_matches(fused, reference, atol=atol)
        assert torch.isfinite(fused[1]).all()
        assert fused[1][2, :, :].abs().sum() == 0  # zero advantage everywhere in sequence 2: no gradient


def test_inplace_backward_writes_into_the_logits(device, monkeypatch):
    config = get_config("dapo")
    logits, targets, old, adv, mask, _ = _inputs(device, seed=2)
    reference = _run("torch", monkeypatch, logits, targets, old, adv, mask, config=config)
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    storage = logits.detach().clone()
    x = storage[:, :-1].requires_grad_(True)
    loss, _ = policy_loss_from_logits(x, targets, old, adv, mask, config=config, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(storage[:, :-1].double(), reference[1][:, :-1], atol=1e-6, rtol=1e-5)


class _LaunchCounter:
    """Records every Triton launch made through the interpreter: (kernel name, tensor data pointers)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        self.launches = []
        original = InterpretedFunction.run

        def run(fn_self, *args, **kwargs):
            pointers = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self.launches.append((fn_self.fn.__name__, pointers))
            return original(fn_self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", run)

    def over(self, tensor):
        return [name for name, pointers in self.launches if tensor.data_ptr() in pointers]


@pytest.mark.parametrize("algo, launches", [("grpo", 1), ("dr_grpo", 1), ("dapo", 1), ("topr", 1), ("rec", 1),
                                            ("opmd", 1), ("cispo", 1), ("gspo", 2), ("rover", 2), ("gmpo", 2)])
def test_token_local_losses_launch_one_kernel_over_the_logits(algo, launches, device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("launches are counted through Triton's interpreter")
    config = get_config(algo)
    logits, targets, old, adv, mask, _ = _inputs(device, seed=4)
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    counter = _LaunchCounter(monkeypatch)
    x = logits.detach().clone().requires_grad_(True)
    kwargs = {"old_vocab_mean": torch.zeros_like(old)} if algo == "rover" else {}
    loss, _ = policy_loss_from_logits(x[:, :-1], targets, old, adv, mask, config=config, **kwargs)
    loss.backward()
    over_logits = counter.over(x)
    assert len(over_logits) == launches, over_logits
    assert is_token_local(config) == (launches == 1)
    assert passes_over_logits(config) == (2 if launches == 1 else 3)


def test_kernel_params_come_from_the_config_field_by_field():
    """Every scalar the kernel takes is a PolicyLossConfig field of the same name and default, read by name: a
    setting is declared once."""
    import dataclasses

    from rlfuse.algos import get_config
    from rlfuse.algos.configs import PolicyLossConfig
    from rlfuse.algos.fused import token_loss_params
    from rlfuse.kernels.token_loss_triton import TokenLossParams

    fields = {f.name: f.default for f in dataclasses.fields(PolicyLossConfig)}
    missing = [name for name in TokenLossParams._fields if name not in fields]
    assert not missing, f"kernel parameters without a config field: {missing}"
    for name, default in TokenLossParams._field_defaults.items():
        assert fields[name] == default, name
    config = get_config("rec_ring", beta=0.3, kl_estimator="k2", clip_ratio_c=2.5, epsilon_high_prime=3.0)
    params = token_loss_params(config)
    assert all(getattr(params, name) == getattr(config, name) for name in TokenLossParams._fields)
