"""The compile gate: every Triton kernel, as the wrappers launch it at real model shapes (the specialization
Triton's binder gives those launches), compiles for sm_80 and sm_90a without register spills, within the
shared memory of a block, and with tensor-core instructions wherever it multiplies matrices whose operands
allow them; and the gate does fail on a kernel that spills.

``python -m bench.compiled --gate`` does the compiling (Triton ahead of time, then the ptxas inside the
triton wheel); it runs here in a subprocess because this process runs Triton's interpreter.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compiled import (KERNEL_MODULES, SPILL_BYTES_OUTSIDE_LOOPS, blocks_per_sm, gate_failures, parse_ptxas,
                            sass_spills, tensor_core_op, tensor_core_shapes, uses_tma)

ROOT = Path(__file__).resolve().parents[1]

PTXAS_SPILLING = """ptxas info    : Compiling entry function '_linear_fwd_kernel' for 'sm_80'
ptxas info    : Function properties for _linear_fwd_kernel
    1560 bytes stack frame, 2120 bytes spill stores, 2580 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1560 bytes cumulative stack size, 488 bytes cmem[0]
"""
PTXAS_CLEAN = """ptxas info    : Function properties for _logprobs_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 488 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_and_spills():
    assert parse_ptxas(PTXAS_SPILLING) == {"registers": 168, "spill_stores": 2120, "spill_loads": 2580,
                                           "stack_frame": 1560}
    assert parse_ptxas(PTXAS_CLEAN)["spill_stores"] == 0
    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas fatal   : Unsupported .version 9.4")


# SASS as ``nvdisasm -c`` prints it: a persistent loop (.L_x_0) around a streaming loop (.L_x_1).
SASS = """        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1+0x8], R0 ;
.L_x_0:
        /*0020*/                   LDG.E R2, [R4.64] ;
        /*0030*/                   STL [R1], R2 ;
.L_x_1:
        /*0040*/                   LDG.E.128 R8, [R6.64] ;
        /*0050*/                   {STEP}
        /*0060*/              @P0 BRA `(.L_x_1) ;
        /*0070*/                   LDL.LU R2, [R1] ;
        /*0080*/              @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_sass_spills_tell_streaming_loops_from_the_rest():
    # Spills once per program and once per persistent-loop iteration: none in the innermost loop.
    assert sass_spills(SASS.replace("{STEP}", "FADD R3, R3, R8 ;")) == {"spill_instructions": 3,
                                                                         "loop_spill_instructions": 0}
    # A spill reload inside the loop over tiles is counted there.
    assert sass_spills(SASS.replace("{STEP}", "LDL R3, [R1+0x4] ;")) == {"spill_instructions": 4,
                                                                          "loop_spill_instructions": 1}
    assert sass_spills("") == {"spill_instructions": 0, "loop_spill_instructions": 0}


def test_tensor_core_detection():
    assert tensor_core_op("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}", 90) == "wgmma.mma_async"
    assert tensor_core_op("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}", 80) == "mma.sync"
    assert tensor_core_op("\tfma.rn.f32 %f1, %f2, %f3, %f4;", 80) is None


def test_tensor_core_shapes_and_tma():
    ptx = ("\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}\n"
           "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}\n"
           "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}\n")
    assert tensor_core_shapes(ptx) == ["wgmma m64n128k16", "wgmma m64n64k16"]
    assert tensor_core_shapes("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == ["mma m16n8k16"]
    assert tensor_core_shapes("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == []
    assert uses_tma("\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], ...")
    assert not uses_tma("\tcp.async.cg.shared.global [%r1], [%rd2], 16;")


def test_blocks_per_sm_follow_registers_warps_and_shared_memory():
    # 128 registers x 256 threads = 32768 of 65536 registers: 2 blocks.
    assert blocks_per_sm(90, 128, 8, 0) == {"blocks_per_sm": 2, "occupancy_limiter": "registers", "warps_per_sm": 16}
    assert blocks_per_sm(90, 32, 8, 0)["blocks_per_sm"] == 8  # 64 warps a multiprocessor at most
    assert blocks_per_sm(90, 64, 4, 100_000)["blocks_per_sm"] == 2  # 228 KiB of shared memory
    assert blocks_per_sm(80, 64, 4, 100_000) == {"blocks_per_sm": 1, "occupancy_limiter": "shared",
                                                 "warps_per_sm": 4}
    assert blocks_per_sm(90, 16, 1, 0)["blocks_per_sm"] == 32


def _record(**changes):
    record = {"kernel": "k", "gpu": "sm_80", "arch": 80, "dtype": "bf16", "num_warps": 4, "constexprs": {},
              "spill_stores": 0, "spill_loads": 0, "shared_bytes": 1024, "multiplies_matrices": True,
              "tensor_core_op": "mma.sync"}
    return {**record, **changes}


def test_gate_rules_catch_each_failure():
    assert gate_failures([_record()]) == []
    assert "spills" in gate_failures([_record(spill_stores=8)])[0]  # no SASS count: any spill fails
    assert "innermost loop" in gate_failures([_record(spill_stores=4, loop_spill_instructions=1)])[0]
    assert gate_failures([_record(spill_stores=12, spill_loads=12, loop_spill_instructions=0)]) == []
    over = SPILL_BYTES_OUTSIDE_LOOPS + 4
    assert "outside loops" in gate_failures([_record(spill_stores=over, loop_spill_instructions=0)])[0]
    assert "shared memory" in gate_failures([_record(shared_bytes=200_000)])[0]
    assert gate_failures([_record(shared_bytes=200_000, arch=90, gpu="sm_90a")]) == []
    assert "tensor-core" in gate_failures([_record(tensor_core_op=None)])[0]
    assert gate_failures([_record(tensor_core_op=None, dtype="fp32", constexprs={"PRECISION": "ieee"})]) == []
    assert gate_failures([_record(tensor_core_op=None, dtype="fp32", constexprs={"PRECISION": "tf32"})])


def _jit_kernels(module_name):
    """Names of the ``@triton.jit`` functions named ``*_kernel`` in a module's source."""
    path = ROOT / (module_name.replace(".", "/") + ".py")
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.append(node.name)
    return names


def test_every_triton_module_is_in_the_report():
    triton_modules = {f"rlfuse.kernels.{p.stem}" for p in (ROOT / "rlfuse" / "kernels").glob("*.py")
                      if "\n@triton.jit" in p.read_text()}
    assert triton_modules <= set(KERNEL_MODULES)


#: The Triton of the GPU image the kernels are measured on (pyproject's lower bound), which ``make setup``
#: installs beside the environment's own: the gate compiles every launch with both.
GPU_IMAGE_TRITON = ("3.6.0", Path(sys.prefix) / "triton-3.6")


def _compiler_env(triton_build: str) -> dict:
    """The environment for a ``bench.compiled`` subprocess: no interpreter, and for ``gpu-image`` Triton 3.6
    first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_build == "gpu-image":
        version, path = GPU_IMAGE_TRITON
        if not (path / "triton" / "__init__.py").is_file():
            pytest.fail(f"Triton {version} is not installed at {path}: run `make setup`")
        env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("triton_build", ["environment", "gpu-image"])
def test_gate_passes_on_every_launch(tmp_path, triton_build):
    out = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, "-m", "bench.compiled", "--gate", "--out", str(out)], cwd=ROOT,
                          env=_compiler_env(triton_build), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    if triton_build == "gpu-image":
        assert report["triton_version"] == GPU_IMAGE_TRITON[0]
    records = report["records"]
    assert report["gate_failures"] == []
    assert report["triton_version"] and report["ptxas_version"]
    compiled = {(r["kernel"].rsplit(".", 1)[1], r["gpu"], r["dtype"]) for r in records}
    for module in KERNEL_MODULES:
        for kernel in _jit_kernels(module):
            for gpu in ("sm_80", "sm_90a"):
                for dtype in ("fp32", "bf16", "fp16"):
                    assert (kernel, gpu, dtype) in compiled, (kernel, gpu, dtype)
    for r in records:
        assert r["triton_version"] == report["triton_version"]
        assert r["loop_spill_instructions"] == 0 and r["spill_stores"] <= SPILL_BYTES_OUTSIDE_LOOPS, r
        assert r["blocks_per_sm"] >= 1 and r["occupancy_limiter"] in ("registers", "warps", "shared", "blocks")
        assert isinstance(r["tma"], bool) and r["shapes"]
        if r["multiplies_matrices"] and r["dtype"] != "fp32":
            assert r["tensor_core_op"] == ("wgmma.mma_async" if r["arch"] == 90 else "mma.sync"), r
            assert r["tensor_core"].startswith("wgmma m64n" if r["arch"] == 90 else "mma m16n8k"), r
        if r["dtype"] == "fp32" and r["constexprs"].get("PRECISION") == "ieee":
            # fp32 operands multiply in IEEE fp32 by default (torch's own default), not as TF32 on tensor cores
            assert r["tensor_core_op"] is None, r
    # The launch's own specialization: the odd vocabulary (32001) launches the row kernels with V and the
    # row strides not divisible by 16, the even ones with them divisible; each is compiled as it launches.
    fwd = [r for r in records if r["kernel"].endswith("_logprobs_fwd_kernel") and r["gpu"] == "sm_90a"
           and r["dtype"] == "bf16"]
    odd = [r for r in fwd if any(shape.startswith("llama-2-7b+pad") for shape in r["shapes"])]
    even = [r for r in fwd if any(shape.startswith("qwen2.5-0.5b/N=8192") for shape in r["shapes"])]
    assert odd and all("V" not in r["specialization"]["divisible_by_16"] for r in odd)
    assert even and all({"V", "stride_t", "N"} <= set(r["specialization"]["divisible_by_16"]) for r in even)


def test_gate_fails_on_a_kernel_that_spills(tmp_path):
    """A kernel that keeps 4 x 8192 floats live in one warp, compiled through the same path: the gate fails."""
    out = tmp_path / "spill.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "bench.compiled", "--gate", "--modules", "gate_fixture_spill",
                           "--archs", "90", "--dtypes", "fp32", "--shapes", "smollm2-135m", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "spills" in proc.stderr
    (record,) = json.loads(out.read_text())["records"]
    assert record["spill_stores"] > 0 and record["kernel"].endswith("_spilling_kernel")


@pytest.mark.parametrize("triton_build", ["environment", "gpu-image"])
def test_every_kernel_compiles_with_integer_arguments_equal_to_one(triton_build):
    """Triton makes an integer argument equal to 1 a constant at launch; a kernel that calls ``.to`` on one
    compiles for other values and fails on the GPU for 1 (the interpreter does not specialize)."""
    proc = subprocess.run([sys.executable, "-m", "bench.compiled", "--ones", "--archs", "90", "--dtypes", "bf16"],
                          cwd=ROOT, env=_compiler_env(triton_build), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fp32_dot_precision_follows_torch():
    import torch

    from rlfuse.kernels.linear_logprobs_triton import input_precision

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert input_precision(torch.float32) == "ieee"
        assert input_precision(torch.bfloat16) == "ieee"  # unused for half operands: tensor cores as they are
        torch.backends.cuda.matmul.allow_tf32 = True
        assert input_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
