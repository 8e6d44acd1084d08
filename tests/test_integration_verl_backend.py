"""The ``rlfuse`` fused-kernel backend inside verl's patched forward, against verl's own ``torch`` backend.

verl's ``patch_forward_with_backends`` (as wrapped by :func:`rlfuse.integrations.verl_backend.install_backend`)
installs a forward on tiny random Qwen2 and Llama models, tied and untied; the rlfuse forward's log-probs,
entropy and gradients (to the last hidden states and to every weight) equal those of verl's ``torch``
backend, which is verl's separately written chunked PyTorch head. A counting test fails when the forward is not
rlfuse's. Skips when verl's model patches cannot be imported.
"""

from __future__ import annotations

import pytest
import torch

monkey_patch = pytest.importorskip("verl.models.transformers.monkey_patch")
vb = pytest.importorskip("rlfuse.integrations.verl_backend")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

VOCAB = 101  # odd, not a power of two
FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def tiny_model(family, tied, device, seed=0):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).to(device)
    with torch.no_grad():  # random heads give log-probs of every size, not just ≈ -log V
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(autouse=True)
def restore_forwards(monkeypatch):
    """verl patches the model class's forward; put each class's own forward and verl's function back."""
    vb.install_backend()
    for _, model_cls in FAMILIES.values():
        monkeypatch.setattr(model_cls, "forward", model_cls.forward)


def patched_forward(model, backend, **inputs):
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
    return model(return_dict=True, use_cache=False, **inputs)


def label_inputs(source, device):
    """Inputs as verl's engine passes them: padded (B, T) ids, or packed (1, total_nnz) with ``shift_labels``."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g).to(device)
    if source == "input_ids":
        return {"input_ids": ids}
    if source == "labels":
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (3, 11), generator=g).to(device)}
    packed = ids.reshape(1, -1)[:, :29]  # three sequences of 11, 11 and 7 tokens packed into one row
    position_ids = torch.cat([torch.arange(11), torch.arange(11), torch.arange(7)]).unsqueeze(0).to(device)
    return {"input_ids": packed, "position_ids": position_ids, "shift_labels": torch.roll(packed, -1, dims=-1)}


def run(model, backend, inputs, temperature):
    """(log_probs, entropy, vocab_mean or None, grad of the final hidden states, {name: grad}) of one forward."""
    model.zero_grad(set_to_none=True)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep)
    try:
        out = patched_forward(model, backend, temperature=temperature, **inputs)
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(5)
    w_logp, w_ent = (torch.randn(out.log_probs.shape, generator=g).to(out.log_probs.device) for _ in range(2))
    ((out.log_probs * w_logp).sum() + (out.entropy * w_ent).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["head"] = model.lm_head.weight.grad.clone()  # the input embedding's when tied
    return (out.log_probs.detach(), out.entropy.detach(), getattr(out, "vocab_mean", None),
            captured["hidden"].grad.clone(), grads)


def assert_grad_close(actual, expected, name):
    """Float32 sums of differently ordered chunks: absolute tolerance relative to the gradient's scale."""
    scale = float(expected.abs().max())
    assert scale > 0, name
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * scale, msg=name)


@pytest.mark.parametrize("source", ["input_ids", "labels", "shift_labels"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rlfuse_backend_equals_verl_torch_backend(family, tied, source, device):
    model = tiny_model(family, tied, device)
    inputs = label_inputs(source, device)
    logps, entropy, _, hidden_grad, grads = run(model, "torch", inputs, temperature=0.7)
    ours_logps, ours_entropy, vocab_mean, ours_hidden_grad, ours_grads = run(model, "rlfuse", inputs, temperature=0.7)

    assert ours_logps.shape == logps.shape and ours_logps.dtype == torch.float32
    assert logps.min() < -3.0  # the scaled head gives confident and unlikely tokens alike
    torch.testing.assert_close(ours_logps, logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_entropy, entropy, rtol=1e-5, atol=1e-5)
    assert_grad_close(ours_hidden_grad, hidden_grad, "hidden states")
    assert set(ours_grads) == set(grads)
    for name, grad in grads.items():
        assert_grad_close(ours_grads[name], grad, name)
    assert vocab_mean is not None and vocab_mean.shape == logps.shape


def test_vocab_mean_and_temperature_against_materialized_logits(device):
    """The extra output against float64 logits: log_softmax(logits / T) at the rolled ids, and its vocab mean."""
    model = tiny_model("qwen2", False, device)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    out = patched_forward(model, "rlfuse", input_ids=ids, temperature=0.6)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logp = torch.log_softmax((hidden.double() @ model.lm_head.weight.double().T) / 0.6, dim=-1)
    targets = torch.roll(ids, -1, dims=-1)
    torch.testing.assert_close(out.log_probs.double(), logp.gather(-1, targets[..., None])[..., 0], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(out.vocab_mean.double(), logp.mean(-1), rtol=1e-5, atol=1e-5)
    assert out.logits is None


def test_forward_calls_rlfuse_kernel(monkeypatch, device):
    """Fails when the installed forward is not rlfuse's: the kernel is called once per forward, and never by
    verl's own backend."""
    calls = []
    kernel = vb.linear_token_logprobs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(vb, "linear_token_logprobs", counting)
    model = tiny_model("llama", True, device)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2)).to(device)
    patched_forward(model, "torch", input_ids=ids)
    assert calls == []
    patched_forward(model, "rlfuse", input_ids=ids)
    patched_forward(model, "rlfuse", input_ids=ids)
    assert calls == [torch.Size([2, 7, 32])] * 2
    assert model._verl_fused_kernels_backend == "rlfuse"


def test_apply_monkey_patch_accepts_rlfuse(monkeypatch, device):
    """verl's own entry point, as its FSDP engine calls it, installs the rlfuse forward."""
    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)  # TRL >= 1.0 has no value-head model
    model = tiny_model("qwen2", True, device)
    monkey_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                                    fused_kernels_backend="rlfuse")
    assert type(model).forward is vb.forward_with_rlfuse_backend


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl", "glm4v", "gemma2"])
def test_unsupported_models_raise(model_type, device):
    model = tiny_model("qwen2", True, device)
    model.config.model_type = model_type
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*llama, qwen2, qwen3, mistral"):
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="rlfuse")


def test_other_backends_reach_verl_unchanged(device):
    vb.install_backend()
    vb.install_backend()  # idempotent: one wrapper around verl's function
    original = monkey_patch.patch_forward_with_backends.rlfuse_original
    assert getattr(original, "rlfuse_original", None) is None
    model = tiny_model("llama", False, device)
    own_forward = type(model).forward
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend="rlfuse")
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="nope")
    assert type(model).forward is own_forward
