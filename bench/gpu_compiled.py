"""What a GPU compiled: every Triton kernel in a Triton cache folder, with its registers, spills and shared
memory, set against the compile gate's static report of the same Triton version.

``bench/gpu_lease.sh`` points ``TRITON_CACHE_DIR`` at a fresh folder, so the folder holds exactly the
kernels the lease's benchmarks, sweeps and tests launched. Each one's PTX goes through the ``ptxas`` of the
installed triton wheel (``bench.compiled.ptxas_figures``, the gate's own path); its metadata gives the
warps, stages and shared memory. A kernel of rlfuse's whose (name, GPU, warps, stages, registers, shared
memory) appears in the static report was compiled ahead of time exactly as it launched; one that does not
is either a sweep's candidate configuration or a specialization the gate missed.

    python -m bench.gpu_compiled CACHE_DIR --out parts/gpu-compiled.json
        [--static bench/results/compiled-triton<version>.json]

Static figures of what ran, not timings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Set

from bench.compiled import (KERNEL_MODULES, RESULTS, SHARED_PER_SM, blocks_per_sm, gpu_name_of, ptxas_figures,
                            resource_failures)


def rlfuse_kernel_names() -> Set[str]:
    """Names of the ``@triton.jit`` kernels of rlfuse's kernel modules (``*_kernel``)."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        names |= {name for name in vars(module) if name.endswith("_kernel") and hasattr(getattr(module, name), "fn")}
    return names


def _record(meta_path: Path) -> dict:
    """One cached kernel's metadata and its PTX's ptxas figures."""
    meta = json.loads(meta_path.read_text())
    arch = int(meta["target"]["arch"])
    name = meta.get("name", meta_path.stem)
    figures = ptxas_figures(meta_path.with_suffix(".ptx").read_text(), arch, name)
    shared = int(meta.get("shared", 0))
    occupancy = blocks_per_sm(arch, figures["registers"], meta["num_warps"], shared) if arch in SHARED_PER_SM else {}
    return {"kernel": name, "arch": arch, "gpu": gpu_name_of(arch), "num_warps": meta["num_warps"],
            "num_stages": meta.get("num_stages"), "triton_version": meta.get("triton_version"), **figures,
            "shared_bytes": shared, **occupancy, "cache_entry": meta_path.parent.name}


def cached_kernels(cache_dir: Path, names: Optional[Set[str]] = None, workers: int = 1) -> List[dict]:
    """One record per CUDA kernel in a Triton cache folder (only those named in ``names``, when given).

    Raises:
        ValueError: ``cache_dir`` is not a folder.
    """
    if not cache_dir.is_dir():
        raise ValueError(f"cache_dir {cache_dir} is not a folder: give the TRITON_CACHE_DIR the kernels compiled into")
    paths = []
    for meta_path in sorted(cache_dir.glob("*/*.json")):
        if meta_path.name.startswith("__grp__") or not meta_path.with_suffix(".ptx").is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if (meta.get("target") or {}).get("backend") == "cuda" and (names is None or meta.get("name") in names):
            paths.append(meta_path)
    if workers <= 1:
        return [_record(p) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_record, paths))


def _key(record: dict) -> tuple:
    return (record["kernel"].rsplit(".", 1)[-1], record["gpu"], record["num_warps"], record["num_stages"],
            record["registers"], record["shared_bytes"])


def compare(records: List[dict], static: Optional[dict], ours: Set[str]) -> dict:
    """Mark each record ``rlfuse`` (one of rlfuse's kernels) and ``in_static_report``; the summary."""
    static_keys = {_key(r) for r in static["records"]} if static else set()
    for r in records:
        r["rlfuse"] = r["kernel"] in ours
        r["in_static_report"] = _key(r) in static_keys if (static and r["rlfuse"]) else None
        r["gate_failures"] = resource_failures(r)
    mine = [r for r in records if r["rlfuse"]]
    return {"kernels": len(records), "rlfuse_kernels": len(mine),
            "rlfuse_in_static_report": sum(1 for r in mine if r["in_static_report"]),
            "rlfuse_not_in_static_report": sorted({f"{r['kernel']} {r['gpu']} warps={r['num_warps']} "
                                                   f"regs={r['registers']} shared={r['shared_bytes']}"
                                                   for r in mine if static and not r["in_static_report"]}),
            "gate_failures": sorted({f"{r['kernel']} {r['gpu']}: {why}" for r in records
                                     for why in r["gate_failures"]}),
            "max_spill_bytes": max((r["spill_stores"] + r["spill_loads"] for r in records), default=0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", type=Path, help="the TRITON_CACHE_DIR the kernels were compiled into")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    parser.add_argument("--all", action="store_true", help="every kernel in the cache, not only rlfuse's")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--static", type=Path, default=None,
                        help="the static report to compare with (default: bench/results/compiled-triton<v>.json of "
                             "the installed Triton, when present)")
    args = parser.parse_args(argv)
    import triton

    static_path = args.static or RESULTS / f"compiled-triton{triton.__version__}.json"
    static = json.loads(static_path.read_text()) if static_path.is_file() else None
    ours = rlfuse_kernel_names()
    records = cached_kernels(args.cache_dir, None if args.all else ours, args.workers)
    summary = compare(records, static, ours)
    report = {"kind": "gpu_compiled", "triton_version": triton.__version__,
              "static_report": str(static_path) if static else None, "summary": summary, "rows": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
