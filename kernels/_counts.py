"""What one kernel launch moves and computes: the records the traffic model (:mod:`pvt_fast.kernels.traffic`)
is built from. Every kernel module describes its own launches with these, from the same plan functions its
launchers call, so the model counts what the launchers really choose.

Bytes are counted as the kernels issue them: every element of every tile load and store whose mask is true
(a masked-off lane moves nothing; a clamped, unmasked lane does), each load counted again when it is
repeated (no credit for reuse: this is the traffic through L2).
"""
from dataclasses import dataclass, field

# H100 SXM: streaming multiprocessors, and the programs assumed resident on each at once (the kernels use
# 4-16 warps and up to ~200 registers per thread: one or two programs per SM).
SMS = 132
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class Access:
    """One tensor as one launch touches it.

    ``distinct``: bytes of the tensor the launch touches at least once; ``loaded`` / ``stored``: bytes moved
    by all programs, every tile load counted; ``reuse_set``: bytes that must stay in L2 between two loads
    of the same byte (0 when nothing is loaded twice). See :func:`reuse_set`.
    """

    tensor: str
    distinct: int
    loaded: int = 0
    stored: int = 0
    reuse_set: int = 0


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its name, how many programs (thread blocks) it runs, what it touches and the
    floating-point operations it executes (every tile of every dot at its padded size, recomputation
    included). ``peak`` names the peak the FLOPs run at: ``"16-bit"`` and ``"tf32"`` tensor cores, or
    ``"fp32"`` CUDA-core FMAs. ``pytorch`` marks a PyTorch kernel (the unfused chain, or the PyTorch
    ops a fused op's backward is built from); the model assumes those fill the GPU."""

    kernel: str
    programs: int
    accesses: tuple
    flops: int = 0
    peak: str = "fp32"
    pytorch: bool = False
    notes: tuple = field(default=())

    @property
    def loaded(self):
        return sum(a.loaded for a in self.accesses)

    @property
    def stored(self):
        return sum(a.stored for a in self.accesses)


def reuse_set(slice_bytes, programs_per_slice):
    """The bytes L2 must hold for programs that re-read a slice of an operand: programs are launched in
    grid order, so the ones sharing a slice are adjacent; with ``SMS * PROGRAMS_PER_SM`` programs resident,
    about that many / ``programs_per_slice`` slices are live at once."""
    live = max(1, cdiv(SMS * PROGRAMS_PER_SM, max(1, programs_per_slice)))
    return slice_bytes * live


def pytorch_kernel(kernel, reads, writes, flops=0, peak="fp32"):
    """A PyTorch kernel that reads each of ``reads`` and writes each of ``writes`` once: ``{tensor: bytes}``."""
    accesses = [Access(name, n, loaded=n) for name, n in reads.items()]
    accesses += [Access(name, n, stored=n) for name, n in writes.items()]
    return Launch(kernel, SMS, tuple(accesses), flops, peak, pytorch=True)


def pytorch_gemm(kernel, M, N, K, elem, a="A", b="B", c="C", c_elem=None, extra_reads=None, tile=(128, 128),
                 a_distinct=None, peak="16-bit"):
    """A cuBLAS/cuDNN GEMM ``C (M, N) = A (M, K) @ B (K, N)`` with ``tile`` = (rows, columns) per block:
    A is read once per column block, B once per row block (the L2 traffic of a tiled GEMM), C written
    once. ``a_distinct`` is the bytes of the tensor A is gathered from (an implicit-GEMM convolution reads
    overlapping windows of a smaller input)."""
    bm, bn = tile
    row_blocks, col_blocks = cdiv(M, bm), cdiv(N, bn)
    accesses = [
        Access(a, a_distinct if a_distinct is not None else M * K * elem, loaded=M * K * elem * col_blocks,
               reuse_set=reuse_set(bm * K * elem, col_blocks)),
        Access(b, K * N * elem, loaded=K * N * elem * row_blocks, reuse_set=K * N * elem),
        Access(c, M * N * (c_elem or elem), stored=M * N * (c_elem or elem)),
    ]
    for name, n in (extra_reads or {}).items():
        accesses.append(Access(name, n, loaded=n))
    return Launch(kernel, SMS, tuple(accesses), 2 * M * N * K, peak, pytorch=True)


def cdiv(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class OpCost:
    """One direction (forward or backward) of one op: its launches in order, the minimum bytes (every input
    read once, every output written once) and the FLOPs the op's formula counts (what FlopCounterMode
    reports for it; padded tiles and recomputation are the launches' own)."""

    launches: tuple
    minimum_bytes: int
    useful_flops: int
