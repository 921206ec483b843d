"""What every pvt_fast benchmark shares: the device, the sizes' memory check, the timed call, extra_info.

    pytest benchmarks/                                   # time everything (CUDA: full sizes, CPU: small)
    pytest benchmarks/ --benchmark-disable -m "not compiled"   # CI: each case runs once
    pytest benchmarks/ --benchmark-autosave   then   pytest benchmarks/ --benchmark-compare

Each benchmark sets ``extra_info``: ``impl``, ``resolution``, ``batch``, ``dtype``, ``peak_mem_bytes`` and a
derived ``tflops`` and/or ``gbps`` (from the median time). Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (inputs and weights included); on CPU it
is the peak of the allocations made during one call, from torch.profiler memory events. A case that would not
fit is skipped before anything runs, with the bytes it would need in the reason.
"""
import itertools
import math

import pytest
import torch

from pvt_fast.ops import get_backend_ops
from pvt_fast.profiler import over_budget, peak_memory_bytes, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
ITEMSIZE = DTYPE.itemsize
L2_BYTES = 60 * 2**20  # H100 50 MB, H200 60 MB; inputs smaller than twice this are rotated between calls
MAX_COPIES = 64
WARMUP_CALLS = 3
MAX_FLOPS_PER_CALL = 5e14 if ON_CUDA else 2e11  # about a second per call: more would stretch the suite


def cases(cpu, cuda):
    """The (resolution, batch) cases of this machine: full sizes on CUDA, small ones on CPU."""
    return cuda if ON_CUDA else cpu


# The single-op groups (patch-embed, mlp-dwconv): their sizes, and the op table behind each impl.
OP_CASES = cases(cpu=[(224, 1), (512, 1)], cuda=[(224, 64), (512, 16), (1024, 4), (2048, 1), (4096, 1)])
OP_IMPLS = {"torch": "reference", "fused": "fused"}


def random_tensor(*shape, scale=1.0):
    """Normal noise times ``scale`` on the benchmark device, in the benchmark dtype."""
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale


def op_table(impl):
    """The op table behind ``impl`` (``reference``, ``sdpa`` or ``fused``), or a skip saying why not here."""
    if impl == "fused" and not ON_CUDA:
        pytest.skip("fused kernels are timed on CUDA only (on CPU they run only under TRITON_INTERPRET=1)")
    return get_backend_ops(impl)


def require_bytes(nbytes, what):
    """Skip, before anything is allocated, when ``what`` needs more than the profiler would give one case on this
    device (on CPU at most ``PVT_FAST_CPU_CAP_MIB``)."""
    too_big = over_budget(nbytes, DEVICE, cpu_cap=True)
    if too_big:
        pytest.skip(f"{what} {too_big}")


def require_flops(flops, what):
    """Skip a case whose single call would take seconds (global attention at 8192x8192 is 4.5 PFLOP)."""
    if flops > MAX_FLOPS_PER_CALL:
        pytest.skip(f"{what} costs {flops:.3g} FLOP per call, over this suite's {MAX_FLOPS_PER_CALL:.0e} "
                    f"on {DEVICE.type}")


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def run_benchmark(benchmark, call, make_inputs, *, impl, resolution, batch, flops=0, moved_bytes=0, **info):
    """Time ``call(*make_inputs())`` with the device synchronized inside the timed target.

    The first call measures peak memory (and warms up); more warm-up calls follow. On CUDA, inputs smaller
    than twice the L2 cache are rotated between several copies so that no call finds them in L2.
    ``flops`` / ``moved_bytes`` per call give ``tflops`` / ``gbps``; ``info`` goes into extra_info as is.
    """
    inputs = [make_inputs()]

    def measured_call():
        return peak_memory_bytes(lambda: call(*inputs[0]), DEVICE)[1]

    extra = dict(impl=impl, resolution=resolution, batch=batch, dtype=str(DTYPE).removeprefix("torch."),
                 device=str(DEVICE), **info)
    if benchmark.disabled:
        extra["peak_mem_bytes"] = benchmark(measured_call)  # CI: the one call also checks the memory path
        benchmark.extra_info.update(extra)
        return
    extra["peak_mem_bytes"] = measured_call()
    size = tensor_bytes(*[t for t in inputs[0] if isinstance(t, torch.Tensor)])
    if ON_CUDA and 0 < size < 2 * L2_BYTES:
        inputs += [make_inputs() for _ in range(min(MAX_COPIES, math.ceil(2 * L2_BYTES / size)))]
    for args in itertools.islice(itertools.cycle(inputs), WARMUP_CALLS):
        call(*args)
    synchronize(DEVICE)
    rotation = itertools.cycle(inputs)

    def target():
        call(*next(rotation))
        synchronize(DEVICE)

    benchmark(target)
    seconds = benchmark.stats.stats.median
    if flops:
        extra.update(flops=flops, tflops=flops / seconds / 1e12)
    if moved_bytes:
        extra.update(moved_bytes=moved_bytes, gbps=moved_bytes / seconds / 1e9)
    benchmark.extra_info.update(extra)
