"""Ahead-of-time compile report: every Triton kernel configuration of pvt_fast.kernels, for sm_80 and sm_90.

    python -m pvt_fast.kernels.report [--jobs N] [--filter TEXT]
    python -m pvt_fast.kernels.report --traffic [--filter TEXT]

``--traffic`` prints the traffic and roofline model of every fused kernel at the benchmark shapes instead
(:mod:`pvt_fast.kernels.traffic`; nothing is compiled).

Imports every module of ``pvt_fast.kernels`` that defines ``aot_specs()``, compiles each spec with
``triton.compile`` for ``GPUTarget("cuda", 80, 32)`` and ``("cuda", 90, 32)`` (no GPU needed), runs the
ptxas bundled with Triton on the PTX with the options Triton itself uses (``-v``, ``--gpu-name sm_80`` /
``sm_90a``) and prints one row per kernel x configuration x target: registers, spill stores/loads,
shared memory, the tensor-core instructions the dots became (``mma.sync`` on sm_80; ``wgmma`` on sm_90,
or ``mma.sync`` where the tile is too small for a warpgroup) and any problem:

- the compile failed;
- ptxas spilled registers;
- a ``tl.dot`` on fp16/bf16 (or tf32) operands did not become tensor-core instructions;
- the shared memory exceeds what one block may use on the target.

Specs are compiled as the JIT would for tensors from PyTorch's allocator: every pointer 16-byte aligned,
and integer arguments named ``stride_*`` divisible by 16 (true of PVT's channel counts); Triton's cache
makes repeated runs fast. Needs a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the
kernels with Python functions that cannot be compiled).
"""
import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

TARGETS = (80, 90)
# Shared memory one block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Result:
    module: str
    name: str
    capability: int
    seconds: float
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    tensor_core_dots: int = 0  # tt.dot ops on fp16/bf16 operands, or fp32 with tf32 precision
    mma_sync: int = 0
    wgmma: int = 0
    problems: list = field(default_factory=list)

    @property
    def instructions(self):
        kinds = [k for k, n in (("wgmma", self.wgmma), ("mma.sync", self.mma_sync)) if n]
        return "+".join(kinds) or "-"


def _check_not_interpreted():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("pvt_fast.kernels.report compiles kernels for real GPUs and cannot run with "
                         "TRITON_INTERPRET=1 set; run it in a process without it (unset TRITON_INTERPRET).")


def kernel_modules():
    """Names of the pvt_fast.kernels modules that define aot_specs(), in alphabetical order."""
    import pvt_fast.kernels as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in ("report", "traffic"):
            continue
        if hasattr(importlib.import_module(f"pvt_fast.kernels.{info.name}"), "aot_specs"):
            names.append(info.name)
    return sorted(names)


@lru_cache(maxsize=None)
def _specs(module):
    return tuple(importlib.import_module(f"pvt_fast.kernels.{module}").aot_specs())


def _attrs(spec):
    """The divisibility the JIT would see for allocator-made tensors (see the module docstring)."""
    hint = [["tt.divisibility", 16]]
    return {(spec.fn.arg_names.index(name),): hint for name, ty in spec.signature.items()
            if ty.startswith("*") or (name.startswith("stride") and ty in ("i32", "i64"))}


def _ptxas(ptx, capability):
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _tensor_core_dots(ttir):
    """tt.dot ops whose operands are fp16/bf16, or fp32 multiplied as tf32: those must use tensor cores."""
    count = 0
    for line in ttir.splitlines():
        if " tt.dot " not in line:
            continue
        elem = re.search(r": tensor<[0-9x]+x(\w+)", line).group(1)
        precision = re.search(r"inputPrecision = (\w+)", line)
        count += elem in ("f16", "bf16") or (elem == "f32" and precision is not None and precision.group(1) == "tf32")
    return count


def _count(pattern, text):
    match = re.search(pattern, text)
    return int(match.group(1)) if match else 0


def compile_one(module, index, capability):
    """Compile spec ``index`` of ``module`` for sm_<capability> and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs(module)[index]
    start = time.perf_counter()
    result = Result(module, spec.name, capability, 0.0)
    try:
        kernel = triton.compile(
            ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec)),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        log = _ptxas(kernel.asm["ptx"], capability)
    except Exception as err:  # reported as a row, not raised: one bad spec must not hide the others
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        result.problems.append(f"compile failed: {result.error}")
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.registers = _count(r"Used (\d+) registers", log)
    result.spill_stores = _count(r"(\d+) bytes spill stores", log)
    result.spill_loads = _count(r"(\d+) bytes spill loads", log)
    result.shared = kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    result.mma_sync = len(re.findall(r"\bmma\.sync\.", ptx))
    result.wgmma = len(re.findall(r"\bwgmma\.mma_async\.", ptx))
    result.tensor_core_dots = _tensor_core_dots(kernel.asm["ttir"])
    if result.spill_stores or result.spill_loads:
        result.problems.append(f"spills {result.spill_stores} B stored / {result.spill_loads} B loaded")
    if result.tensor_core_dots and not (result.mma_sync or result.wgmma):
        result.problems.append(f"no tensor cores: {result.tensor_core_dots} fp16/bf16/tf32 tl.dot without mma/wgmma")
    if result.shared > SHARED_LIMIT[capability]:
        result.problems.append(f"shared memory over the limit: {result.shared} B > {SHARED_LIMIT[capability]} B")
    return result


def compile_all(jobs=None, name_filter=""):
    """Compile every spec of every kernel module for every target; results in module/spec/target order."""
    _check_not_interpreted()
    tasks = [(module, i, cap) for module in kernel_modules() for i, spec in enumerate(_specs(module))
             if name_filter in spec.name for cap in TARGETS]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_one(*task) for task in tasks]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks))) if tasks else []


def format_table(results):
    header = ("module", "kernel configuration", "target", "regs", "spill st/ld B", "smem KiB", "tc dots",
              "tensor cores", "compile s", "problems")
    rows = [(r.module, r.name, f"sm_{r.capability}", str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
             f"{r.shared / 1024:.1f}", str(r.tensor_core_dots), r.instructions, f"{r.seconds:.1f}",
             "; ".join(r.problems) or "ok") for r in results]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--filter", default="", help="only specs (or, with --traffic, rows) whose name contains this text")
    parser.add_argument("--traffic", action="store_true", help="print the traffic and roofline model instead")
    args = parser.parse_args(argv)
    if args.traffic:
        from pvt_fast.kernels import traffic

        rows = [r for r in traffic.benchmark_rows() if args.filter in f"{r.op} {r.shape}"]
        print(traffic.format_rows(rows))
        return 0
    _check_not_interpreted()
    start = time.perf_counter()
    results = compile_all(args.jobs, args.filter)
    print(format_table(results))
    bad = [r for r in results if r.problems]
    print(f"\n{len(results)} compiles ({len({(r.module, r.name) for r in results})} configurations x "
          f"{len(TARGETS)} targets) in {time.perf_counter() - start:.0f} s; {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
