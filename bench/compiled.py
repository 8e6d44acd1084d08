"""Static report: every Triton kernel as the wrappers launch it, compiled ahead of time for sm_80 and sm_90a.

For every kernel module and every real model shape (``SHAPES`` x ``N_ROWS``) in fp32, bf16 and fp16, the
module's ``aot_launches`` runs its wrappers on meta tensors with launches configured for an A100 or an
H100 (``bench.launches``), and each captured launch goes through Triton's own binder: the specialization
(alignment, divisibility by 16 of sizes and strides, integers equal to 1) is the one that launch gets on a
GPU. Each distinct specialization is compiled once for that GPU, and the ``ptxas`` inside the triton wheel
(``-v``) reports registers and spill bytes; Triton's metadata gives the shared memory; the PTX shows the
tensor-core instruction and its tile shape (``wgmma m64n64k16``, ``mma m16n8k16``) and whether TMA
(``cp.async.bulk.tensor``) is used; where ptxas spills, ``nvdisasm`` says whether a spill sits in an innermost
loop (:func:`sass_spills`). Blocks per multiprocessor follow from registers, warps and shared
memory.

    python -m bench.compiled                  # writes bench/results/compiled-triton<version>.json
    python -m bench.compiled --gate           # also exits 1 when a kernel spills in an innermost loop
                                              # (or over 64 B outside), overflows shared memory or
                                              # multiplies matrices without tensor cores
    PYTHONPATH=.venv/triton-3.6 python -m bench.compiled --gate   # the same with Triton 3.6, the GPU image's

These are compiled for, not run on, those GPUs: no timing comes from here. The gate runs in
``make test`` (``tests/test_compiled_gate.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import torch

#: Model shapes (hidden size H, vocabulary size V) the wrappers are run at. Llama 2 with an added padding
#: token gives an odd vocabulary, whose strides are not divisible by 16.
SHAPES = {
    "smollm2-135m": (576, 49152),
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama-2-7b+pad": (4096, 32001),
    "llama-3-8b": (4096, 128256),
    "v262144": (4096, 262144),
}
N_ROWS = (1000, 8192, 32768)  # tokens per call: 1000 is not divisible by 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL_MODULES = (
    "rlfuse.kernels.logprobs_triton",
    "rlfuse.kernels.token_loss_triton",
    "rlfuse.kernels.linear_logprobs_triton",
    "rlfuse.kernels.linear_hybrid",
    "rlfuse.kernels.advantages_triton",
)
#: Dynamic shared memory one block may use (opt-in maximum), and one multiprocessor holds, bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
SHARED_PER_SM = {80: 167936, 90: 233472}
SHARED_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
TENSOR_CORE_OPS = {80: ("mma.sync",), 90: ("wgmma.mma_async", "mma.sync")}
RESULTS = Path(__file__).resolve().parent / "results"
VARIANT_KEYS = ("PRECISION", "LOSS", "SCALE", "WRITE_GRAD", "WANT_ENTROPY")  # shown in the table


def _kernel(module_name: str, kernel_name: str):
    return getattr(importlib.import_module(module_name), kernel_name)


def _json_safe(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def enumerate_specs(archs=(80, 90), dtypes=tuple(DTYPES), shapes=tuple(SHAPES), modules=KERNEL_MODULES,
                    n_rows=N_ROWS) -> List[dict]:
    """Every distinct (kernel, arch, specialization, options) the wrappers launch at the given shapes.

    Returns a list of jobs: ``{"module", "kernel", "arch", "dtype", "signature", "constexprs", "attrs",
    "options", "num_warps", "num_stages", "specialization", "multiplies_matrices", "shapes"}``;
    ``constexprs`` maps argument names to values, ``specialization`` says which arguments Triton's binder
    marked divisible by 16 or turned into the constant 1, and ``shapes`` lists the (model, N) pairs that
    launched it.
    """
    from bench.launches import captured_launches, describe, specialize
    from rlfuse.kernels import launch

    jobs: Dict[str, dict] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        matmuls = set(getattr(module, "DOT_KERNELS", ()))
        for arch in archs:
            for dtype_name in dtypes:
                for shape in shapes:
                    hidden, vocab = SHAPES[shape]
                    for n in n_rows:
                        with captured_launches(launch.TARGETS[arch]) as launches:
                            module.aot_launches(DTYPES[dtype_name], n, hidden, vocab)
                        seen = set()
                        for captured in launches:
                            spec = specialize(captured, arch)
                            names = captured.kernel.arg_names
                            constexprs = {names[path[0]]: _json_safe(value)
                                          for path, value in spec["constexprs"].items()}
                            attrs = {names[path[0]]: value for path, value in spec["attrs"].items() if value}
                            job = {
                                "module": module_name, "kernel": captured.name, "arch": arch, "dtype": dtype_name,
                                "signature": spec["signature"], "constexprs": dict(sorted(constexprs.items())),
                                "attrs": attrs, "options": spec["options"], **spec["options"],
                                "specialization": describe(spec, captured.kernel),
                                "multiplies_matrices": captured.name.rsplit(".", 1)[1] in matmuls,
                            }
                            key = json.dumps(job, sort_keys=True, default=str)
                            entry = jobs.setdefault(key, {**job, "shapes": []})
                            if (key, shape, n) not in seen:
                                seen.add((key, shape, n))
                                entry["shapes"].append(f"{shape}/N={n}")
    return list(jobs.values())


def parse_ptxas(text: str) -> Dict[str, int]:
    """Registers per thread and spill bytes from ``ptxas -v`` output (the entry kernel's lines).

    Raises:
        ValueError: the output has no ``Used N registers`` line (ptxas failed or was not verbose).
    """
    registers = re.search(r"Used (\d+) registers", text)
    if registers is None:
        raise ValueError(f"no register count in ptxas output: {text.strip()[:500]}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
        "stack_frame": int(stack.group(1)) if stack else 0,
    }


#: Spill bytes (stores) a kernel may have outside its innermost loops: a few registers saved once per program
#: or per persistent-loop iteration, which ptxas trades for an occupancy step (e.g. 128 registers, 2 blocks of
#: 8 warps, against 183 and 1 block). A spill inside an innermost loop, where tiles stream, always fails.
SPILL_BYTES_OUTSIDE_LOOPS = 64


def sass_spills(sass: str) -> Dict[str, int]:
    """Where the local-memory spills (``STL``/``LDL``) of a kernel's SASS (``nvdisasm -c``) sit: their count,
    and how many lie inside an innermost loop.

    A loop is a backward branch: the span from its target label to the branch. An innermost loop holds no
    other loop's span; the streaming loops over vocabulary tiles and K slices are the innermost loops.
    """
    labels: Dict[str, int] = {}
    lines = sass.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^\s*(\.L_x_\d+):", line)
        if match:
            labels[match.group(1)] = index
    loops = []
    for index, line in enumerate(lines):
        match = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
        if match and labels.get(match.group(1), index + 1) < index:
            loops.append((labels[match.group(1)], index))
    innermost = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    spills = [i for i, line in enumerate(lines) if re.search(r"\b(STL|LDL)(\.\S+)?\s", line)]
    in_loops = [i for i in spills if any(a <= i <= b for a, b in innermost)]
    return {"spill_instructions": len(spills), "loop_spill_instructions": len(in_loops)}


def tensor_core_op(ptx: str, arch: int) -> Optional[str]:
    """The tensor-core instruction the PTX uses (``wgmma.mma_async`` or ``mma.sync``), or None."""
    for op in TENSOR_CORE_OPS[arch]:
        if re.search(r"^\s*" + re.escape(op), ptx, re.MULTILINE):
            return op
    return None


def tensor_core_shapes(ptx: str) -> List[str]:
    """Every distinct tensor-core instruction with its tile shape in the PTX, e.g. ``wgmma m64n64k16`` or
    ``mma m16n8k16``, most frequent first."""
    counts: Dict[str, int] = {}
    for op, shape in re.findall(r"^\s*(wgmma\.mma_async|mma\.sync)\S*?\.(m\d+n\d+k\d+)", ptx, re.MULTILINE):
        name = f"{op.split('.')[0]} {shape}"
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda name: -counts[name])


def uses_tma(ptx: str) -> bool:
    """Whether the PTX copies tiles with the tensor memory accelerator (``cp.async.bulk.tensor``)."""
    return "cp.async.bulk.tensor" in ptx


def blocks_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> Dict[str, object]:
    """Resident blocks per multiprocessor, and what limits them: registers (allocated per warp in units of
    256), warps (64 per SM), shared memory (plus 1 KiB reserved per block), or the 32-block cap."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else MAX_BLOCKS_PER_SM,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "shared": SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED_PER_BLOCK),
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=lambda name: limits[name])
    return {"blocks_per_sm": limits[limiter], "occupancy_limiter": limiter,
            "warps_per_sm": limits[limiter] * num_warps}


def gpu_name_of(arch: int) -> str:
    """ptxas's name for a capability: ``sm_80``, and ``sm_90a`` for Hopper (wgmma and TMA need the ``a``)."""
    return "sm_90a" if arch == 90 else f"sm_{arch}"


def ptxas_figures(ptx: str, arch: int, kernel: str = "kernel") -> Dict[str, int]:
    """Assemble ``ptx`` with the ``ptxas`` inside the triton wheel (``-v``): registers, spill and stack bytes
    (:func:`parse_ptxas`), and where ptxas spills, where in the SASS (:func:`sass_spills`, via ``nvdisasm``).

    Raises:
        RuntimeError: ptxas fails (``kernel`` names it in the message).
    """
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = gpu_name_of(arch)
    with tempfile.TemporaryDirectory() as folder:
        path, cubin = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
        path.write_text(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", str(path), "-o", str(cubin)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed on {kernel} for {gpu_name}: {out.stderr[-2000:]}")
        figures = parse_ptxas(out.stdout + out.stderr)
        if figures["spill_stores"] or figures["spill_loads"]:
            sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            figures.update(sass_spills(sass))
        else:
            figures.update(spill_instructions=0, loop_spill_instructions=0)
    return figures


def compile_one(job: dict) -> dict:
    """Compile one job for its GPU, run ptxas -v on its PTX, and return the job with the static figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel(job["module"], job["kernel"].rsplit(".", 1)[1])
    names = kernel.arg_names
    constexprs = {(names.index(name),): value for name, value in job["constexprs"].items()}
    attrs = {(names.index(name),): value for name, value in job["attrs"].items()}
    arch = job["arch"]
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, job["signature"], constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(job["options"]))
    ptx = compiled.asm["ptx"]
    gpu_name = gpu_name_of(arch)
    figures = ptxas_figures(ptx, arch, job["kernel"])
    shared = int(compiled.metadata.shared)
    shapes = tensor_core_shapes(ptx)
    return {**job, "gpu": gpu_name, "triton_version": triton.__version__, **figures, "shared_bytes": shared,
            **blocks_per_sm(arch, figures["registers"], job["num_warps"], shared),
            "tensor_core_op": tensor_core_op(ptx, arch), "tensor_core": shapes[0] if shapes else None,
            "tensor_core_shapes": shapes, "tma": uses_tma(ptx), "compile_s": round(time.perf_counter() - start, 2)}


def with_ones(job: dict) -> dict:
    """``job`` with every integer scalar argument equal to 1, as the runtime specializes it.

    At launch Triton turns an integer argument equal to 1 (a stride, N = 1 token, one vocabulary slice) into
    a compile-time constant, so code that treats the argument as a tensor (``x.to(tl.int64)``) compiles for
    other values and fails at launch for 1. Compiling this variant too finds that ahead of time.
    """
    signature = {name: ("constexpr" if kind in ("i32", "i64") else kind) for name, kind in job["signature"].items()}
    ones = {name: 1 for name, kind in job["signature"].items() if kind in ("i32", "i64")}
    attrs = {name: value for name, value in job["attrs"].items() if name not in ones}
    return {**job, "signature": signature, "constexprs": {**job["constexprs"], **ones}, "attrs": attrs,
            "ones": sorted(ones)}


def compile_ones(jobs: List[dict]) -> List[str]:
    """Compile :func:`with_ones` of one job per (kernel, arch); the errors, as text (empty when all compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    errors, seen = [], set()
    for job in jobs:
        if (job["kernel"], job["arch"]) in seen:
            continue
        seen.add((job["kernel"], job["arch"]))
        variant = with_ones(job)
        kernel = _kernel(variant["module"], variant["kernel"].rsplit(".", 1)[1])
        names = kernel.arg_names
        constexprs = {(names.index(name),): value for name, value in variant["constexprs"].items()}
        try:
            triton.compile(ASTSource(kernel, variant["signature"], constexprs),
                           target=GPUTarget("cuda", variant["arch"], 32), options=dict(variant["options"]))
        except Exception as error:  # reported, with the kernel's name
            errors.append(f"{variant['kernel']} for sm_{variant['arch']} with {variant['ones']} = 1: "
                          f"{type(error).__name__}: {str(error)[-400:]}")
    return errors


def resource_failures(r: dict) -> List[str]:
    """The gate's rules on one compiled kernel's resources (spills and shared memory), as reasons."""
    reasons = []
    spilled = bool(r["spill_stores"] or r["spill_loads"])
    if r.get("loop_spill_instructions", spilled):  # without the SASS count, any spill counts as in a loop
        reasons.append(f"spills inside an innermost loop ({r['spill_stores']} B stores, {r['spill_loads']} B loads)")
    elif r["spill_stores"] > SPILL_BYTES_OUTSIDE_LOOPS:
        reasons.append(f"spills {r['spill_stores']} B stores, {r['spill_loads']} B loads "
                       f"(over {SPILL_BYTES_OUTSIDE_LOOPS} B outside loops)")
    limit = SHARED_LIMIT.get(r["arch"])
    if limit is not None and r["shared_bytes"] > limit:
        reasons.append(f"{r['shared_bytes']} B shared memory > {limit}")
    return reasons


def gate_failures(records: List[dict]) -> List[str]:
    """Why each record fails the gate: a spill inside an innermost loop, or more than
    :data:`SPILL_BYTES_OUTSIDE_LOOPS` spilled outside them; shared memory over the arch's limit; a matrix
    kernel whose operands allow tensor cores (bf16, fp16, or fp32 as TF32) compiled without them. A record
    without the SASS count (``loop_spill_instructions``) fails on any spill."""
    failures = []
    for r in records:
        where = f"{r['kernel']} {r['gpu']} {r['dtype']} warps={r['num_warps']} {r['constexprs']}"
        failures += [f"{where}: {why}" for why in resource_failures(r)]
        wants_tensor_cores = r["dtype"] != "fp32" or r["constexprs"].get("PRECISION") == "tf32"
        if r["multiplies_matrices"] and wants_tensor_cores and r["tensor_core_op"] is None:
            failures.append(f"{where}: multiplies matrices without tensor-core instructions")
    return failures


def versions() -> Dict[str, str]:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    def ptxas_version(arch):
        text = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release ([\d.]+)", text)
        return match.group(1) if match else text.strip().splitlines()[-1]

    return {"triton_version": triton.__version__,
            "ptxas_version": {f"sm_{a}" + ("a" if a == 90 else ""): ptxas_version(a) for a in (80, 90)}}


def run(jobs: List[dict], workers: int) -> List[dict]:
    if workers <= 1:
        return [compile_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, jobs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/compiled-triton<v>.json)")
    parser.add_argument("--gate", action="store_true", help="exit 1 if any kernel fails the gate")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=[80, 90])
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES),
                        help="kernel modules, each with an aot_launches(dtype, n_rows, hidden, vocab)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ones", action="store_true",
                        help="only compile each kernel with its integer arguments equal to 1 (see with_ones); "
                             "exit 1 if one fails")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.compiled needs compiled @triton.jit kernels: run it without TRITON_INTERPRET=1")
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter's @triton.jit objects cannot be compiled
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    import triton

    start = time.perf_counter()
    jobs = enumerate_specs(tuple(args.archs), tuple(args.dtypes), tuple(args.shapes), tuple(args.modules))
    if args.ones:
        errors = compile_ones(jobs)
        print("\n".join(errors) or f"every kernel compiles with its integer arguments equal to 1 "
                                    f"({time.perf_counter() - start:.0f} s)")
        return 1 if errors else 0
    records = run(jobs, args.workers)
    failures = gate_failures(records)
    report = {"kind": "compiled", "note": "compiled ahead of time for these GPUs, not run on them",
              "specialization": "Triton's binder on the arguments the wrappers launch with (meta tensors)",
              **versions(), "fp32_dot": "IEEE by default, TF32 where torch allows it: both compiled",
              "shapes": {k: {"hidden": h, "vocab": v} for k, (h, v) in SHAPES.items() if k in args.shapes},
              "n_rows": list(N_ROWS), "records": records, "gate_failures": failures,
              "wall_s": round(time.perf_counter() - start, 1)}
    out = args.out or RESULTS / f"compiled-triton{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_report(report))
    print(format_table(records))
    print(f"{len(records)} distinct compiles in {report['wall_s']} s -> {out}")
    for failure in failures:
        print("GATE:", failure, file=sys.stderr)
    return 1 if (args.gate and failures) else 0


#: Record fields that only feed the compiler (the rest says what was compiled and what came out).
COMPILE_INPUTS = ("signature", "attrs", "options")


def dump_report(report: dict) -> str:
    """The report as JSON, one record a line, without the compile inputs (:data:`COMPILE_INPUTS`)."""
    head = {key: value for key, value in report.items() if key != "records"}
    records = [{k: v for k, v in r.items() if k not in COMPILE_INPUTS} for r in report["records"]]
    lines = ",\n".join(json.dumps(r, sort_keys=False) for r in records)
    body = json.dumps(head, indent=1)[:-2]
    return f'{body},\n "records": [\n{lines}\n ]\n}}\n'


def format_table(records: List[dict]) -> str:
    """A markdown table: one row per kernel, dtype, configuration and specialization, sm_80 and sm_90a side
    by side (registers / spill bytes, shared memory, blocks per multiprocessor, tensor-core tile, TMA)."""
    rows: Dict[tuple, Dict[int, dict]] = {}
    for r in records:
        tiles = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k == "ROWS")
        variant = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k in VARIANT_KEYS)
        dtype = r["dtype"] + (f" ({variant})" if variant else "")
        odd = [name for name in ("V", "N", "H") if name in r["specialization"].get("not_divisible_by_16", ())]
        spec = "÷16" if not odd else "not ÷16: " + ",".join(odd)
        key = (r["kernel"].rsplit(".", 1)[1], dtype, tiles, r["num_warps"], r["num_stages"], spec)
        rows.setdefault(key, {})[r["arch"]] = r
    lines = ["| kernel | dtype | tiles | warps/stages | sizes | sm_80 regs / spill B | sm_90a regs / spill B | "
             "shared B (80/90) | blocks/SM (80/90) | tensor cores (80/90) | TMA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, dtype, tiles, warps, stages, spec), by_arch in sorted(rows.items()):
        def cell(arch, fmt):
            r = by_arch.get(arch)
            return "–" if r is None else fmt(r)
        regs = [cell(a, lambda r: f"{r['registers']} / {r['spill_stores'] + r['spill_loads']}") for a in (80, 90)]
        shared = "/".join(cell(a, lambda r: str(r["shared_bytes"])) for a in (80, 90))
        blocks = "/".join(cell(a, lambda r: str(r["blocks_per_sm"])) for a in (80, 90))
        cores = " / ".join(cell(a, lambda r: r["tensor_core"] or "–") for a in (80, 90))
        tma = "/".join(cell(a, lambda r: "yes" if r["tma"] else "no") for a in (80, 90))
        lines.append(f"| `{kernel}` | {dtype} | {tiles or '–'} | {warps}/{stages} | {spec} | {regs[0]} | {regs[1]} | "
                     f"{shared} | {blocks} | {cores} | {tma} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
