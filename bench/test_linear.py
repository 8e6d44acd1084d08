"""Log-probs from hidden states and the LM head (``linear_token_logprobs``), forward and forward+backward,
against its peers. Each implementation is judged by the FLOPs and bytes it does (:func:`bench.linear.work`)
against a bare GEMM of the same shape and the copy bandwidth, both measured in the same run.
"""

import pytest
import torch

# bench/conftest.py parametrizes `shape` with this module's SMOKE_SHAPES (FULL_SHAPES under --full).
from bench.linear import FULL_SHAPES, SMOKE_SHAPES  # noqa: F401
from bench.linear import IMPLEMENTATIONS, implementations, linear_passes, make_inputs, work
from bench.suite import gemm_ceiling_tflops, record_roofline, time_pass



def dtype_of(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (as ``python -m bench.linear``)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_linear(benchmark, run, shape, impl, pass_name):
    run.require_kernel_shapes()
    fn = implementations(run.device).get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not installed, or runs only on a GPU")
    m, h, v = shape
    dtype = dtype_of(run.device)
    hidden, weight, targets = make_inputs(m, h, v, run.device, dtype)
    fn_pass = linear_passes(fn, hidden, weight, targets, run.device)[pass_name]
    seconds = time_pass(benchmark, fn_pass, run, name="linear", impl=impl, pass_name=pass_name,
                        shape={"m_tokens": m, "hidden": h, "vocab": v},
                        extra={"dtype": str(dtype).replace("torch.", "")})
    record_roofline(benchmark, run, seconds, work(impl, pass_name, m, h, v, dtype, run.device),
                    gemm_ceiling_tflops(m, h, v, str(run.device), dtype))
    if seconds is not None:  # as python -m bench.linear: the peak above the inputs and their gradients
        grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
        peak = benchmark.extra_info["peak_mem_bytes"]
        benchmark.extra_info["peak_extra_mem_bytes"] = peak - grads_bytes if peak >= 0 else -1
    if impl in ("rlfuse-fused-linear-triton", "rlfuse-linear-hybrid"):
        from rlfuse.kernels.launch import target_of
        from rlfuse.kernels.linear_hybrid import extra_bytes
        from rlfuse.kernels.linear_logprobs_triton import backward_extra_bytes

        target = target_of(run.device)
        benchmark.extra_info["extra_mem_bytes_formula"] = (
            extra_bytes(m, h, v, dtype, target, backward=pass_name == "fwd_bwd") if impl == "rlfuse-linear-hybrid"
            else backward_extra_bytes(m, h, v, dtype, target=target))
