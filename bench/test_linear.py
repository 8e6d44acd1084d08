"""Log-probs from hidden states and the LM head (``linear_token_logprobs``), forward and forward+backward,
against its peers. Judged by FLOPs against a bare GEMM of the same shape measured in the same run
(see :func:`bench.linear.roofline_flops`); the fewest bytes are recorded too.
"""

import pytest
import torch

# bench/conftest.py parametrizes `shape` with this module's SMOKE_SHAPES (FULL_SHAPES under --full).
from bench.linear import FULL_SHAPES, SMOKE_SHAPES  # noqa: F401
from bench.linear import IMPLEMENTATIONS, implementations, linear_passes, make_inputs, roofline_bytes, roofline_flops
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
    index = ("fwd", "fwd_bwd").index(pass_name)
    fn_pass = linear_passes(fn, hidden, weight, targets, run.device)[pass_name]
    seconds = time_pass(benchmark, fn_pass, run, name="linear", impl=impl, pass_name=pass_name,
                        shape={"m_tokens": m, "hidden": h, "vocab": v},
                        extra={"dtype": str(dtype).replace("torch.", "")})
    record_roofline(benchmark, run, seconds, roofline_bytes(m, h, v, hidden.element_size())[index],
                    roofline_flops(m, h, v)[index], gemm_ceiling_tflops(m, h, v, str(run.device), dtype))
    if seconds is not None:  # as python -m bench.linear: the peak above the inputs and their gradients
        grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
        peak = benchmark.extra_info["peak_mem_bytes"]
        benchmark.extra_info["peak_extra_mem_bytes"] = peak - grads_bytes if peak >= 0 else -1
    if impl.startswith("rlfuse"):
        from rlfuse.kernels.launch import capability_of
        from rlfuse.kernels.linear_logprobs_triton import backward_extra_bytes

        # No (N, V) logits exist. The backward writes d(logits) once, chunk by chunk, and reads each chunk
        # twice (d(weight), d(hidden)): 3 passes over an (N, V) quantity, none in the forward.
        benchmark.extra_info["logits_passes"] = {"fwd": 0, "fwd_bwd": 3}[pass_name]
        benchmark.extra_info["extra_mem_bytes_formula"] = backward_extra_bytes(
            m, h, v, dtype, capability=capability_of(run.device))
