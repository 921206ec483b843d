"""The CUDA patch embedding's launch plan and traffic, for the traffic model (the kernel is C++: csrc/).

:func:`plan` is ``make_plan`` and ``choose_vec`` of ``csrc/patch_embed_core.h`` written again in Python (the
model must run without building the extension); ``tests/test_patch_embed.py`` checks it against the C++
plan, and the element counts of :func:`counts` against the host test's emulation of every block
(``patch_embed_host_test --traffic``), so the two cannot drift apart unnoticed.
"""
from dataclasses import dataclass

import torch

from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost, cdiv, pytorch_kernel, reuse_set

MAX_FRAGMENTS_PER_WARP = 4
STREAMED_CHUNK = 64
RESIDENT_SMEM_BYTES = 110 * 1024
MAX_SMEM_BYTES = 160 * 1024
_SMEM_PER_SM = 228 * 1024  # H100: 228 KB of shared memory per SM (Hopper tuning guide)
_THREADS_PER_SM = 2048
_TOKEN_ORIGIN_BYTES = 16  # sizeof(TokenOrigin)
_COLUMN_TAP_BYTES = 16  # sizeof(ColumnTap)


@dataclass(frozen=True)
class Problem:
    """One call: batch, input channels, input height and width, output channels, kernel, stride, padding,
    layout ("nchw" or "nhwc"), x's dtype and whether the weight and the parameters are fp32 (autocast)."""

    B: int
    cin: int
    H: int
    W: int
    cout: int
    k: int
    s: int
    p: int
    layout: str
    dtype: torch.dtype
    weight_fp32: bool = False
    params_fp32: bool = False

    @property
    def Ho(self):
        return (self.H + 2 * self.p - self.k) // self.s + 1

    @property
    def Wo(self):
        return (self.W + 2 * self.p - self.k) // self.s + 1

    @property
    def M(self):
        return self.B * self.Ho * self.Wo

    @property
    def K(self):
        return self.cin * self.k * self.k

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def for_stage(cls, stage, dtype):
        return cls(stage.batch, stage.cin, stage.H_in, stage.H_in, stage.C, stage.kernel, stage.stride,
                   stage.padding, "nchw" if stage.index == 1 else "nhwc", dtype)


@dataclass(frozen=True)
class Plan:
    warps: int
    warps_m: int
    warps_n: int
    bm: int
    npad: int
    bk: int
    chunks: int
    vec: int
    smem_bytes: int
    tiles: int

    @property
    def threads(self):
        return 32 * self.warps


def _round_up(a, b):
    return cdiv(a, b) * b


def _pow2_ceil(v):
    r = 1
    while r < v:
        r *= 2
    return r


def _smem_bytes(npad, bm, bk, elem):
    ld = bk + 16 // elem
    off = 0
    for size in (3 * npad * 4, npad * ld * elem, bm * ld * elem, bm * (npad + 4) * 4, bm * _TOKEN_ORIGIN_BYTES,
                 bk * _COLUMN_TAP_BYTES):
        off = _round_up(off + size, 128)
    return off


def choose_vec(p):
    """Elements per x load for a contiguous x (an image in "nchw", a token grid in "nhwc"), aligned."""
    if p.layout == "nchw":
        return 4 if p.k % 4 == 0 and p.s % 4 == 0 and p.p % 4 == 0 and p.W % 4 == 0 else 1
    v = 16 // p.elem
    return v if p.cin % v == 0 else 1


def plan(p):
    """``make_plan`` for problem ``p`` with contiguous tensors."""
    elem = p.elem
    npad = _round_up(p.cout, 16)
    warps = 8 if npad <= 128 else 16
    warps_n = _pow2_ceil(cdiv(npad // 16, MAX_FRAGMENTS_PER_WARP))
    warps_m = warps // warps_n
    bm = 16 * warps_m
    whole_k = _round_up(p.K, 16)
    bk = whole_k if whole_k * (npad + bm) * elem <= RESIDENT_SMEM_BYTES else STREAMED_CHUNK
    smem = _smem_bytes(npad, bm, bk, elem)
    candidate = STREAMED_CHUNK
    while smem > RESIDENT_SMEM_BYTES and candidate >= 16:
        if candidate < whole_k:
            bk = candidate
            smem = _smem_bytes(npad, bm, bk, elem)
            if smem <= MAX_SMEM_BYTES:
                break
        candidate //= 2
    return Plan(warps, warps_m, warps_n, bm, npad, bk, cdiv(p.K, bk), choose_vec(p), smem, cdiv(p.M, bm))


def grid(pl):
    """Persistent blocks: the tiles, or as many blocks as fit on the SMs (shared memory, threads)."""
    per_sm = max(1, min(_SMEM_PER_SM // (pl.smem_bytes + 1024), _THREADS_PER_SM // pl.threads))
    return min(pl.tiles, per_sm * SMS)


def packed_pitch(p):
    """Row pitch of the packed weight: K rounded up to 16."""
    return _round_up(p.K, 16)


def _valid_taps(size, out, k, s, p):
    """Sum over output positions of the kernel taps that land inside the input (padding is never read)."""
    return sum(sum(1 for kh in range(k) if 0 <= o * s - p + kh < size) for o in range(out))


def counts(p, blocks=None):
    """Elements the kernel reads and writes for problem ``p`` on ``blocks`` persistent blocks (None: the
    launcher's count): ``{"x", "weight", "params", "out"}``. Every tile of a streamed plan, and every block
    of a resident one, reads the packed weight's rows, zero padding included."""
    pl = plan(p)
    blocks = grid(pl) if blocks is None else blocks
    x = p.B * p.cin * _valid_taps(p.H, p.Ho, p.k, p.s, p.p) * _valid_taps(p.W, p.Wo, p.k, p.s, p.p)
    weight_reads = min(blocks, pl.tiles) if pl.chunks == 1 else pl.tiles
    return {"x": x, "weight": weight_reads * p.cout * packed_pitch(p), "params": blocks * 3 * p.cout,
            "out": p.M * p.cout}


def forward_cost(p):
    """The op's launches: the weight packing (PyTorch copies) and the kernel."""
    pl = plan(p)
    blocks = grid(pl)
    c = counts(p)
    e = p.elem
    we = 4 if p.weight_fp32 else e
    pe = 4 if p.params_fp32 else e
    x_bytes, w_bytes, out_bytes = p.B * p.cin * p.H * p.W * e, p.cout * p.K * we, p.M * p.cout * e
    packed = p.cout * packed_pitch(p) * e
    launches = [pytorch_kernel("pack weight", {"weight": w_bytes}, {"packed": p.cout * p.K * e})]
    if packed > p.cout * p.K * e:
        launches.append(pytorch_kernel("zero pitch padding", {}, {"packed": packed - p.cout * p.K * e}))
    launches.append(Launch("patch_embed (CUDA)", blocks, (
        Access("x", x_bytes, loaded=c["x"] * e, reuse_set=reuse_set(pl.bm * p.K * e, 1)),
        Access("packed", packed, loaded=c["weight"] * e, reuse_set=packed),
        Access("params", 3 * p.cout * pe, loaded=c["params"] * pe),
        Access("out", out_bytes, stored=c["out"] * e),
    ), flops=pl.tiles * 2 * pl.bm * pl.npad * pl.chunks * pl.bk, peak="fp32" if p.dtype == torch.float32 else "16-bit"))
    return OpCost(tuple(launches), x_bytes + w_bytes + 3 * p.cout * pe + out_bytes, 2 * p.M * p.cout * p.K)
