"""The CUDA patch embedding's launch plan and traffic, for the traffic model (the kernel is C++: csrc/).

:func:`plan` is ``make_plan`` and ``choose_vec`` of ``csrc/patch_embed_core.h`` written again in Python (the
model must run without building the extension): the fused plan or the split plan of least estimated time
(:func:`estimated_seconds`, the traffic model's roofline in closed form). ``tests/test_patch_embed.py``
checks the choice and the estimate against the C++ (``patch_embed_host_test --plan``) at every benchmark
shape, and the element counts of :func:`counts` against the host test's emulation of both kernels
(``--traffic``), so the two cannot drift apart unnoticed.
"""
import functools
from dataclasses import dataclass

import torch

from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost, cdiv, pytorch_kernel, reuse_set

MAX_FRAGMENTS_PER_WARP = 4
STREAMED_CHUNK = 64
RESIDENT_SMEM_BYTES = 110 * 1024
MAX_SMEM_BYTES = 160 * 1024
_SMEM_PER_SM = 228 * 1024  # H100: 228 KB of shared memory per SM (Hopper tuning guide)
_THREADS_PER_SM = 2048
_NORM_BLOCKS_PER_SM = 4  # the norm pass's __launch_bounds__(128, 4)
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
    """``Plan`` of ``csrc/patch_embed_core.h``: a fused plan (``partial`` False: bm tokens x all npad channels,
    LayerNorm in the epilogue) or a split plan (bm x bn tiles, K in ``splits`` ranges, fp32 sums to a workspace
    that the norm pass finishes)."""

    warps: int
    warps_m: int
    warps_n: int
    bm: int
    bn: int
    npad: int
    bk: int
    chunks: int
    chunks_per_split: int
    splits: int
    vec: int
    smem_bytes: int
    row_tiles: int
    col_blocks: int
    partial: bool

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def tiles(self):
        return self.row_tiles * self.col_blocks * self.splits


@dataclass(frozen=True)
class NormPlan:
    """``make_norm_plan``: the norm pass after a split plan, bm rows per tile."""

    threads: int
    bm: int
    tiles: int
    smem_bytes: int


# csrc/patch_embed_core.h kSplitShapes (warps, bm, bn) and kSplitCounts.
SPLIT_SHAPES = ((4, 64, 64), (8, 128, 64), (8, 64, 128), (16, 128, 128), (16, 64, 256))
SPLIT_COUNTS = (1, 2, 3, 4, 6, 8)


def _round_up(a, b):
    return cdiv(a, b) * b


def _pow2_ceil(v):
    r = 1
    while r < v:
        r *= 2
    return r


def _pow2_floor(v):
    r = 1
    while r * 2 <= v:
        r *= 2
    return r


def _smem_bytes(npad, bm, bn, bk, elem, partial):
    ld = bk + 16 // elem
    off = 0
    for size in (0 if partial else 3 * npad * 4, bn * ld * elem, bm * ld * elem, bm * (bn + 4) * 4,
                 bm * _TOKEN_ORIGIN_BYTES, bk * _COLUMN_TAP_BYTES):
        off = _round_up(off + size, 128)
    return off


def choose_vec(p):
    """Elements per x load for a contiguous x (an image in "nchw", a token grid in "nhwc"), aligned."""
    if p.layout == "nchw":
        return 4 if p.k % 4 == 0 and p.s % 4 == 0 and p.p % 4 == 0 and p.W % 4 == 0 else 1
    v = 16 // p.elem
    return v if p.cin % v == 0 else 1


def _default_fused_warps(npad):
    return 8 if npad <= 128 else 16


def fused_plan(p, warps=None):
    """``make_fused_plan`` for problem ``p`` with contiguous tensors (``warps`` None: the default)."""
    elem = p.elem
    npad = _round_up(p.cout, 16)
    warps = _default_fused_warps(npad) if warps is None else warps
    warps_n = _pow2_ceil(cdiv(npad // 16, MAX_FRAGMENTS_PER_WARP))
    warps_m = warps // warps_n
    bm = 16 * warps_m
    whole_k = packed_pitch(p)
    bk = whole_k if whole_k * (npad + bm) * elem <= RESIDENT_SMEM_BYTES else STREAMED_CHUNK
    smem = _smem_bytes(npad, bm, npad, bk, elem, False)
    candidate = STREAMED_CHUNK
    while smem > RESIDENT_SMEM_BYTES and candidate >= 16:
        if candidate < whole_k:
            bk = candidate
            smem = _smem_bytes(npad, bm, npad, bk, elem, False)
            if smem <= MAX_SMEM_BYTES:
                break
        candidate //= 2
    chunks = cdiv(p.K, bk)
    return Plan(warps, warps_m, warps_n, bm, npad, npad, bk, chunks, chunks, 1, choose_vec(p), smem, cdiv(p.M, bm), 1,
                False)


def split_plan(p, shape, want):
    """``make_split_plan``: ``shape`` = (warps, bm, bn) tiles, K cut into about ``want`` ranges of chunks."""
    warps, bm, bn = shape
    elem = p.elem
    npad = _round_up(p.cout, 16)
    warps_n = cdiv(bn // 16, MAX_FRAGMENTS_PER_WARP)
    bk = min(packed_pitch(p), STREAMED_CHUNK)
    chunks = cdiv(p.K, bk)
    per_split = cdiv(chunks, want)
    return Plan(warps, warps // warps_n, warps_n, bm, bn, npad, bk, chunks, per_split, cdiv(chunks, per_split),
                choose_vec(p), _smem_bytes(npad, bm, bn, bk, elem, True), cdiv(p.M, bm), cdiv(npad, bn), True)


def norm_plan(p, pl):
    """``make_norm_plan``: 4 warps, ``32 / lanes_per_row`` rows per warp."""
    lanes = _pow2_floor(min(pl.npad // 8, 32))
    bm = 4 * (32 // lanes)
    smem = _round_up(_round_up(3 * pl.npad * 4, 128) + bm * (pl.npad + 4) * 4, 128)
    return NormPlan(128, bm, cdiv(p.M, bm), smem)


def _resident(pl):
    return not pl.partial and pl.chunks == 1


def norm_grid(p, pl):
    """Blocks of the norm pass: its tiles, or at least 4 blocks per SM (its launch bounds) on every SM."""
    return min(norm_plan(p, pl).tiles, SMS * _NORM_BLOCKS_PER_SM)


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


@functools.lru_cache(maxsize=1024)
def _x_gather_elements(p):
    return p.B * p.cin * _valid_taps(p.H, p.Ho, p.k, p.s, p.p) * _valid_taps(p.W, p.Wo, p.k, p.s, p.p)


def estimated_seconds(p, pl):
    """``plan_seconds``: the estimate ``make_plan`` ranks plans by, the traffic model's roofline in closed form
    (checked against :func:`forward_cost` in ``tests/test_traffic.py``)."""
    from pvt_fast.kernels.traffic import HBM_BANDWIDTH, L2_BANDWIDTH, PEAK_FLOPS

    e = p.elem
    blocks = grid(pl)
    weight = p.cout * packed_pitch(p) * e
    weight_loads = (blocks if _resident(pl) else pl.row_tiles) * weight
    tokens = p.M * p.cout * e
    written = pl.splits * p.M * pl.npad * 4 if pl.partial else tokens
    l2 = _x_gather_elements(p) * pl.col_blocks * e + weight_loads + written
    hbm = p.B * p.cin * p.H * p.W * e + weight + written
    flops = 2.0 * pl.row_tiles * pl.col_blocks * pl.bm * pl.bn * pl.chunks * pl.bk
    t = max(hbm / HBM_BANDWIDTH, l2 / L2_BANDWIDTH, flops / PEAK_FLOPS["fp32" if e == 4 else "16-bit"])
    if blocks < SMS:
        t *= SMS / blocks
    if pl.partial:
        t += (written + tokens) / HBM_BANDWIDTH
    return t


def _fused_candidates(p):
    out = [fused_plan(p)]
    if _default_fused_warps(out[0].npad) < 16:
        wide = fused_plan(p, 16)
        if wide.smem_bytes <= MAX_SMEM_BYTES:
            out.append(wide)
    return out


def _split_candidates(p):
    out = []
    npad = _round_up(p.cout, 16)
    for shape in SPLIT_SHAPES:
        if shape[2] > npad:
            continue
        last = 0
        for want in SPLIT_COUNTS:
            pl = split_plan(p, shape, want)
            if pl.splits == last or pl.smem_bytes > MAX_SMEM_BYTES:
                continue
            last = pl.splits
            out.append(pl)
    return out


def candidates(p):
    """Every plan ``make_plan`` weighs, in its order: the fused plan, the 16-warp fused plan where the default
    has 8 warps, then each split shape's distinct splits."""
    return _fused_candidates(p) + _split_candidates(p)


def plan(p, kind="auto"):
    """``make_plan`` for problem ``p`` with contiguous tensors: the candidate of least estimated time, the
    earlier on ties; ``kind`` "fused" or "split" restricts the candidates as ``PVT_FAST_PATCH_EMBED_PLAN``
    does (the default fused plan when no split shape fits Cout)."""
    if kind not in ("auto", "fused", "split"):
        raise ValueError(f'kind must be "auto", "fused" or "split", got {kind!r}')
    fused, split = _fused_candidates(p), _split_candidates(p)
    if kind == "split" and not split:
        return fused[0]
    options = fused if kind == "fused" else split if kind == "split" else fused + split
    return min(options, key=lambda pl: estimated_seconds(p, pl))


def counts(p, blocks=None, pl=None):
    """Elements the kernels read and write for problem ``p`` with plan ``pl`` (None: :func:`plan`'s) on
    ``blocks`` persistent blocks per kernel (None: the launcher's count): ``{"x", "weight", "params", "out",
    "workspace_stored", "workspace_loaded"}``. Every tile of a streamed or split plan, and every block of a
    resident one, reads its rows of the packed weight, zero padding included; a split plan's tiles read x once
    per column block."""
    pl = plan(p) if pl is None else pl
    conv_blocks = grid(pl) if blocks is None else min(blocks, pl.tiles)
    weight_reads = conv_blocks if _resident(pl) else pl.row_tiles
    workspace = pl.splits * p.M * pl.npad if pl.partial else 0
    if pl.partial:
        param_blocks = norm_grid(p, pl) if blocks is None else min(blocks, norm_plan(p, pl).tiles)
    else:
        param_blocks = conv_blocks
    return {"x": _x_gather_elements(p) * pl.col_blocks, "weight": weight_reads * p.cout * packed_pitch(p),
            "params": param_blocks * 3 * p.cout, "out": p.M * p.cout, "workspace_stored": workspace,
            "workspace_loaded": workspace}


def forward_cost(p, pl=None):
    """The op's launches: the weight packing (PyTorch copies), the kernel, and a split plan's norm pass."""
    pl = plan(p) if pl is None else pl
    c = counts(p, pl=pl)
    e = p.elem
    we = 4 if p.weight_fp32 else e
    pe = 4 if p.params_fp32 else e
    x_bytes, w_bytes, out_bytes = p.B * p.cin * p.H * p.W * e, p.cout * p.K * we, p.M * p.cout * e
    packed = p.cout * packed_pitch(p) * e
    workspace = c["workspace_stored"] * 4
    params = Access("params", 3 * p.cout * pe, loaded=c["params"] * pe)
    launches = [pytorch_kernel("pack weight", {"weight": w_bytes}, {"packed": p.cout * p.K * e})]
    if packed > p.cout * p.K * e:
        launches.append(pytorch_kernel("zero pitch padding", {}, {"packed": packed - p.cout * p.K * e}))
    accesses = (Access("x", x_bytes, loaded=c["x"] * e,
                       reuse_set=reuse_set(pl.bm * pl.chunks_per_split * pl.bk * e, pl.col_blocks)),
                Access("packed", packed, loaded=c["weight"] * e, reuse_set=packed))
    peak = "fp32" if p.dtype == torch.float32 else "16-bit"
    flops = pl.row_tiles * pl.col_blocks * 2 * pl.bm * pl.bn * pl.chunks * pl.bk
    if pl.partial:
        launches.append(Launch("patch_embed conv tiles (CUDA)", grid(pl),
                               accesses + (Access("workspace", workspace, stored=workspace),), flops=flops, peak=peak))
        launches.append(Launch("patch_embed norm pass (CUDA)", norm_grid(p, pl), (
            Access("workspace", workspace, loaded=workspace), params, Access("out", out_bytes, stored=out_bytes))))
    else:
        launches.append(Launch("patch_embed (CUDA)", grid(pl), accesses + (
            params, Access("out", out_bytes, stored=c["out"] * e)), flops=flops, peak=peak))
    return OpCost(tuple(launches), x_bytes + w_bytes + 3 * p.cout * pe + out_bytes, 2 * p.M * p.cout * p.K)
