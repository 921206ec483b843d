"""Depthwise 3x3 conv + bias + exact GELU on the token layout: the middle of a PVTv2 MLP.

The official ``Mlp`` views fc1's output ``(B, H*W, hidden)`` as an NCHW map, runs ``nn.Conv2d`` on it,
views the result back as tokens and applies GELU: separate kernels, at least two reads and two writes of
the hidden tensor, more where PyTorch makes the strided map contiguous for its depthwise conv.
:func:`dwconv_gelu_fwd` reads the tokens where they lie (token ``n = h*W + w``, channels contiguous) with
the one-pixel halo the 3x3 window needs and writes ``GELU(dwconv3x3(x) + bias)`` in the same layout: one
read and one write.

Tiling: a program owns ``ROWS`` image rows x some columns x ``BLOCK_C`` channels of one image. Channels
are the contiguous dimension, so every load is a coalesced, vectorised read of ``BLOCK_C`` channels per
token. Its tile is ``BLOCK_W`` columns wide and includes a halo of ``HALO`` columns on each side, so
neighbouring programs' tiles overlap by ``2 * HALO`` columns and a program owns the ``BLOCK_W - 2 * HALO``
columns in the middle. Each image row is loaded once, unshifted; the column neighbours ``w - 1`` and
``w + 1`` come from that tile through ``tl.gather`` (a shared-memory exchange), not from two more loads.
The program walks its rows top to bottom (the forward unrolled, the backward a loop after four unrolled
steps) and folds each input row into a rolling pair of unfinished output rows, so the vertical halo costs
``2 * HALO`` extra row loads per ``ROWS`` rows, not extra loads per output row.

Backward, one kernel (:func:`_dwconv_gelu_bwd_kernel`): the walk recomputes the pre-activation
``pre = dwconv3x3(x) + bias`` one row and one column beyond the program's own (``HALO = 2``), forms
``g = dy * GELU'(pre)`` in fp32 in registers, and folds g into a second rolling walk with the taps flipped:
``dx = dconv^T(g)`` (times the ReLU mask with the prologue). The same g rows, restricted to the program's
own pixels, give the d weight and d bias partial sums (``g * x`` at the nine tap offsets, and ``g``).
It reads x and dy and writes dx: ``3 * B*H*W*C * itemsize`` bytes plus the halos, and g never leaves the
chip. The partial sums go to ``(programs, ..., hidden)`` fp32 buffers that ``torch.sum`` reduces over the
program axis: a fixed order, no atomics, so d weight and d bias are bitwise reproducible.

Precision: x and dy are read in their dtype (fp32, fp16, bf16) and every product and sum is fp32 (g too:
it is not rounded to x's dtype, as PyTorch's separate GELU backward must); the weight and bias are read in
their own dtype and converted to fp32 in registers (under autocast the conv parameters stay fp32 while x
is bf16: they are not rounded to bf16 first).
"""
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from pvt_fast.kernels._aot import AotSpec
from pvt_fast.kernels._common import TRITON_TYPES, unit_last_stride
from pvt_fast.kernels._counts import Access, Launch, OpCost, pytorch_kernel


@dataclass(frozen=True)
class Tiling:
    """One kernel's tile: rows per program, tile columns (halo included), halo columns on each side,
    channels, warps."""

    rows: int
    block_w: int
    halo: int
    block_c: int
    warps: int

    @property
    def owned_w(self):
        return self.block_w - 2 * self.halo


# The forward: 7 rows (the stage heights at 224, 56/28/14/7, are multiples of 7) x 16 columns (14 owned)
# x 64 channels, 8 warps: each thread holds 4 channels of one token (8-byte loads in fp16/bf16, 16-byte in
# fp32), 9 fp32 taps for each, the rolling output rows and the loaded row.
FORWARD = Tiling(rows=7, block_w=16, halo=1, block_c=64, warps=8)
# The backward keeps 9 d weight accumulators, three x rows and two rolling walks per element: tiles half
# as many channels (2 elements a thread, <= 128 registers: two programs per SM; pvt_fast.kernels.report
# shows no spills). 14 rows per program halve the halo rows and the partial sums per pixel against 7; 7
# rows waste less on short images (H = 7: half a 14-row walk would be masked rows). The launcher takes the
# one the traffic model predicts faster (backward_tiling).
BACKWARD_TILINGS = (Tiling(rows=14, block_w=16, halo=2, block_c=32, warps=8),
                    Tiling(rows=7, block_w=16, halo=2, block_c=32, warps=8))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ------------------------------------------------------------------------------------------- helpers


@triton.jit
def _tile_coords(H, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's spatial index (axis 0: image, row block, column block, columns fastest), image,
    first row, tile columns ``[BLOCK_W]`` (the owned ones plus ``HALO`` on each side; some may lie outside
    the image), the owned-column mask ``[BLOCK_W, 1]`` and channels ``[BLOCK_C]`` (axis 1); indices int64."""
    pid = tl.program_id(0).to(tl.int64)
    owned_w: tl.constexpr = BLOCK_W - 2 * HALO
    col_blocks = tl.cdiv(W, owned_w)
    row_blocks = tl.cdiv(H, ROWS)
    rest = pid // col_blocks
    lane = tl.arange(0, BLOCK_W)
    cols = (pid % col_blocks) * owned_w - HALO + lane.to(tl.int64)
    owned = ((lane >= HALO) & (lane < BLOCK_W - HALO))[:, None] & (cols < W)[:, None]
    row0 = (rest % row_blocks) * ROWS
    image = rest // row_blocks
    chans = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return pid, image, row0, cols, owned, chans


@triton.jit
def _load_taps(w_ptr, chans, C):
    """The 3x3 taps of ``chans``: a tuple of nine fp32 ``[1, BLOCK_C]`` rows ``w[kh][kw]``, row-major, read
    from the ``(C, 1, 3, 3)`` weight at ``c*9 + 3*kh + kw``."""
    ptrs = w_ptr + chans * 9
    ok = chans < C
    t0 = tl.load(ptrs + 0, mask=ok, other=0.0).to(tl.float32)[None, :]
    t1 = tl.load(ptrs + 1, mask=ok, other=0.0).to(tl.float32)[None, :]
    t2 = tl.load(ptrs + 2, mask=ok, other=0.0).to(tl.float32)[None, :]
    t3 = tl.load(ptrs + 3, mask=ok, other=0.0).to(tl.float32)[None, :]
    t4 = tl.load(ptrs + 4, mask=ok, other=0.0).to(tl.float32)[None, :]
    t5 = tl.load(ptrs + 5, mask=ok, other=0.0).to(tl.float32)[None, :]
    t6 = tl.load(ptrs + 6, mask=ok, other=0.0).to(tl.float32)[None, :]
    t7 = tl.load(ptrs + 7, mask=ok, other=0.0).to(tl.float32)[None, :]
    t8 = tl.load(ptrs + 8, mask=ok, other=0.0).to(tl.float32)[None, :]
    return (t0, t1, t2, t3, t4, t5, t6, t7, t8)


@triton.jit
def _load_row(img_ptr, stride_n, row, H, W, cols, lanes_ok, chans, C, RELU: tl.constexpr):
    """Image row ``row`` at the tile's columns as one fp32 ``[BLOCK_W, BLOCK_C]`` tile; zero outside the
    image (the conv's zero padding), past ``C`` and where ``lanes_ok`` (``[BLOCK_W, 1]``) is false.
    ``img_ptr`` points at token 0 of a ``(H*W, C)`` image with channel stride 1 and token stride
    ``stride_n``; ``RELU`` applies the prologue ReLU to the values read."""
    col = cols[:, None]
    ok = (row >= 0) & (row < H) & (col >= 0) & (col < W) & lanes_ok & (chans[None, :] < C)
    ptrs = img_ptr + (row * W + col) * stride_n + chans[None, :]
    tile = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        tile = tl.maximum(tile, 0.0)
    return tile


@triton.jit
def _neighbour_lanes(BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """``tl.gather`` indices (``[BLOCK_W, BLOCK_C]``, axis 0) of each lane's left and right neighbour column:
    ``tl.gather(tile, left, 0)[i] = tile[i - 1]``. The edge lanes repeat themselves (they are halo lanes
    whose results nobody keeps). A gather is a register / shared-memory exchange: no global loads."""
    lane = tl.arange(0, BLOCK_W)[:, None] + tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
    return tl.maximum(lane - 1, 0), tl.minimum(lane + 1, BLOCK_W - 1)


@triton.jit
def _row_offsets(row, H, W, cols, owned, chans, C, stride_n):
    """Offsets (from the image's first token) and mask of the program's own pixels of row ``row``."""
    col = cols[:, None]
    mask = (row >= 0) & (row < H) & owned & (chans[None, :] < C)
    return (row * W + col) * stride_n + chans[None, :], mask


@triton.jit
def _walk_step(center, above, here, taps, neighbours, STEP: tl.constexpr, ROWS: tl.constexpr):
    """One step of a walk down ``ROWS`` rows starting at ``row0``: fold input row ``r = row0 - 1 + STEP``
    (``center``; its column neighbours gathered with ``neighbours``, see :func:`_neighbour_lanes`) into the
    rolling output rows. Row r feeds output rows r+1 (kernel row 0), r (kernel row 1) and r-1 (kernel row
    2); ``above`` holds output row r-1 without its kernel row 2, ``here`` output row r with only kernel row
    0. Returns output row r-1, complete (meaningful for ``STEP >= 2``), and the new ``above`` and ``here``;
    with a constexpr ``STEP``, kernel rows landing outside ``[row0, row0 + ROWS)`` are not accumulated (the
    backward's loop passes a fixed STEP, does that work and discards its rows)."""
    left = tl.gather(center, neighbours[0], 0)
    right = tl.gather(center, neighbours[1], 0)
    done = above + left * taps[6] + center * taps[7] + right * taps[8]
    if STEP >= 1 and STEP <= ROWS:
        above = here + left * taps[3] + center * taps[4] + right * taps[5]
    if STEP < ROWS:
        here = left * taps[0] + center * taps[1] + right * taps[2]
    return done, above, here


@triton.jit
def _gelu(v):
    return 0.5 * v * (1.0 + tl.math.erf(v * _SQRT1_2))


@triton.jit
def _gelu_grad(v):
    """d GELU(v) / dv = Phi(v) + v * phi(v) for the exact (erf) GELU."""
    return 0.5 * (1.0 + tl.math.erf(v * _SQRT1_2)) + v * tl.exp(-0.5 * v * v) * _INV_SQRT_2PI


@triton.jit
def _bwd_step(state, step, x_img, dy_img, dx_img, taps, flipped, neighbours, lanes, bias, row0, H, W, C, cols,
              owned, chans, stride_xn, stride_dyn, stride_dxn, RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr,
              PHASE: tl.constexpr):
    """Step ``step`` of the backward walk (see :func:`_dwconv_gelu_bwd_kernel`): load x row
    ``r = row0 - 2 + step``, complete pre row r-1, form g of that row, fold it into the dx walk, store dx row
    r-2 and add the d weight / d bias products of g row r-1 when it is one of the program's rows. ``PHASE``
    is ``step`` during the first four steps (constexpr: the work they cannot do yet is left out) and 4
    after, where every part runs (the walks' rows past the program's are computed and never used) and the
    stores and sums are masked to the program's rows instead."""
    pre_above, pre_here, dx_above, dx_here, x_up, x_mid, dw, dbias = state
    row = row0 - 2 + step
    x_now = _load_row(x_img, stride_xn, row, H, W, cols, lanes[0], chans, C, RELU_PROLOGUE)
    pre, pre_above, pre_here = _walk_step(x_now, pre_above, pre_here, taps, neighbours, PHASE, ROWS + 2)
    if PHASE >= 2:
        # pre row r-1 is complete: g of that row (zero on the edge lanes, whose pre lacks a neighbour, and
        # outside the image), then the dx walk with the taps flipped.
        dy = _load_row(dy_img, stride_dyn, row - 1, H, W, cols, lanes[1], chans, C, False)
        g = dy * _gelu_grad(pre + bias)
        dx, dx_above, dx_here = _walk_step(g, dx_above, dx_here, flipped, neighbours, PHASE - 2, ROWS)
        if PHASE >= 4:  # dx row r-2 is complete; x_up is that row of x
            if RELU_PROLOGUE:
                dx = tl.where(x_up > 0.0, dx, 0.0)
            offs, mask = _row_offsets(row - 2, H, W, cols, owned, chans, C, stride_dxn)
            tl.store(dx_img + offs, dx.to(dx_img.dtype.element_ty), mask=mask & (row - 2 < row0 + ROWS))
        if PHASE >= 3:  # g row r-1 counts when it is one of the program's own rows
            mine = tl.where(owned & (row - 1 < row0 + ROWS), g, 0.0)
            dbias += mine
            from_right = tl.gather(mine, neighbours[1], 0)  # g[j + 1]: pairs with x[j] for kw = 0
            from_left = tl.gather(mine, neighbours[0], 0)  # g[j - 1]: kw = 2
            dw = (dw[0] + from_right * x_up, dw[1] + mine * x_up, dw[2] + from_left * x_up,
                  dw[3] + from_right * x_mid, dw[4] + mine * x_mid, dw[5] + from_left * x_mid,
                  dw[6] + from_right * x_now, dw[7] + mine * x_now, dw[8] + from_left * x_now)
    return pre_above, pre_here, dx_above, dx_here, x_mid, x_now, dw, dbias


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dwconv_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_yb, stride_yn,
    RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, HALO: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``y = GELU(dwconv3x3(relu?(x)) + b)``, zero padding 1, exact erf GELU.

    ``y[b, h*W + w, c] = GELU(b[c] + sum_{kh, kw} w[c, 0, kh, kw] * x[b, (h+kh-1)*W + (w+kw-1), c])`` with
    ``x`` taken as 0 outside the image.

    Layouts: ``x_ptr`` (B, H*W, C) strides (stride_xb, stride_xn, 1); ``y_ptr`` (B, H*W, C) strides
    (stride_yb, stride_yn, 1); ``w_ptr`` (C, 1, 3, 3) contiguous; ``b_ptr`` (C,). Grid
    ``(B * cdiv(H, ROWS) * cdiv(W, BLOCK_W - 2 * HALO), cdiv(C, BLOCK_C))``, ``HALO = 1``. Masked: rows
    outside ``[0, H)``, columns outside ``[0, W)`` and channels >= C (read as zero, not written).

    Per element of y: 9 MACs (18 FLOPs) + bias + GELU. Bytes: one read and one write of the hidden tensor
    from DRAM (plus 9 + 1 weights per channel); L2 serves the halos, ``(ROWS + 2) / ROWS`` row loads and
    ``BLOCK_W / (BLOCK_W - 2)`` column loads per element.
    """
    pid, image, row0, cols, owned, chans = _tile_coords(H, W, ROWS, BLOCK_W, HALO, BLOCK_C)
    x_img = x_ptr + image * stride_xb
    y_img = y_ptr + image * stride_yb
    taps = _load_taps(w_ptr, chans, C)
    neighbours = _neighbour_lanes(BLOCK_W, BLOCK_C)
    bias = tl.load(b_ptr + chans, mask=chans < C, other=0.0).to(tl.float32)[None, :]
    every_lane = tl.full([BLOCK_W, 1], 1, tl.int1)
    above = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    here = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for step in tl.static_range(ROWS + 2):
        row = row0 - 1 + step
        center = _load_row(x_img, stride_xn, row, H, W, cols, every_lane, chans, C, RELU_PROLOGUE)
        conv, above, here = _walk_step(center, above, here, taps, neighbours, step, ROWS)
        if step >= 2:
            offs, mask = _row_offsets(row - 1, H, W, cols, owned, chans, C, stride_yn)
            tl.store(y_img + offs, _gelu(conv + bias).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_gelu_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_dyb, stride_dyn, stride_dxb, stride_dxn,
    RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, HALO: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dx``, and the d weight and d bias partial sums, of ``y = GELU(dwconv3x3(relu?(x)) + b)``.

    With ``g = dy * GELU'(pre)``, ``pre = dwconv3x3(relu?(x)) + b``:
    ``dx[b, h*W + w, c] = [x > 0] * sum_{kh, kw} w[c, 0, kh, kw] * g[b, (h-kh+1)*W + (w-kw+1), c]`` (the
    ReLU mask only with the prologue; g is 0 outside the image), ``dw_part[p, 3*kh + kw, c] = sum over
    program p's own pixels (h, w) of g[h, w, c] * relu?(x)[h+kh-1, w+kw-1, c]`` and ``dbias_part[p, c] =
    sum over the same pixels of g[h, w, c]``.

    The walk loads x rows ``row0 - 2 .. row0 + ROWS + 1``; after each it completes one row of ``pre``
    (rows ``row0 - 1 .. row0 + ROWS``), loads that row of dy, forms g and folds it into the dx walk (the
    taps flipped), which completes dx rows ``row0 .. row0 + ROWS - 1``. ``HALO = 2``: g is right on tile
    lanes ``1 .. BLOCK_W - 2``, dx on the owned lanes ``2 .. BLOCK_W - 3``. The d weight sums take g of
    the owned pixels (zero elsewhere) shifted against the unshifted x rows: ``sum_w g[w] x[w + kw - 1] =
    sum_j g[j - kw + 1] x[j]``.

    Layouts: ``x_ptr``, ``dy_ptr``, ``dx_ptr`` (B, H*W, C) with channel stride 1 and the given batch and
    token strides; ``w_ptr`` (C, 1, 3, 3) contiguous; ``b_ptr`` (C,); ``dw_part_ptr`` (P, 9, C) and
    ``dbias_part_ptr`` (P, C) fp32 contiguous, P the grid's axis 0 (grid as the forward's with this
    kernel's ROWS, BLOCK_W, HALO, BLOCK_C).

    Per owned element: 9 MACs (recompute) + GELU' + 9 (dx) + 9 (d weight), more on the halos. Bytes: reads
    x and dy, writes dx: ``3 * B*H*W*C * itemsize`` from DRAM, plus ``40 * P * C`` of partial sums.
    """
    tl.static_assert(HALO == 2, "g needs a whole 3x3 window on lanes 1 .. BLOCK_W - 2, dx on 2 .. BLOCK_W - 3")
    pid, image, row0, cols, owned, chans = _tile_coords(H, W, ROWS, BLOCK_W, HALO, BLOCK_C)
    x_img = x_ptr + image * stride_xb
    dy_img = dy_ptr + image * stride_dyb
    dx_img = dx_ptr + image * stride_dxb
    taps = _load_taps(w_ptr, chans, C)
    flipped = (taps[8], taps[7], taps[6], taps[5], taps[4], taps[3], taps[2], taps[1], taps[0])
    neighbours = _neighbour_lanes(BLOCK_W, BLOCK_C)
    # Lanes x is read on (all), and lanes g has a whole 3x3 window on (dy read there; g is 0 elsewhere).
    lane = tl.arange(0, BLOCK_W)[:, None]
    lanes = (lane >= 0, (lane >= 1) & (lane < BLOCK_W - 1))
    bias = tl.load(b_ptr + chans, mask=chans < C, other=0.0).to(tl.float32)[None, :]
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    # The walks' rolling rows (pre, dx), x rows r-2 and r-1 while row r is loaded, and the d weight and d
    # bias accumulators: one tuple carried through the steps.
    state = (zero, zero, zero, zero, zero, zero, (zero, zero, zero, zero, zero, zero, zero, zero, zero), zero)
    # The first four steps fill the walks (static: their partial work is left out); then every step does
    # everything: a loop the compiler does not unroll, which keeps the registers of one step live, not all.
    for step in tl.static_range(4):
        state = _bwd_step(state, step, x_img, dy_img, dx_img, taps, flipped, neighbours, lanes, bias, row0, H, W, C,
                          cols, owned, chans, stride_xn, stride_dyn, stride_dxn, RELU_PROLOGUE, ROWS, step)
    for step in range(4, ROWS + 4):
        state = _bwd_step(state, step, x_img, dy_img, dx_img, taps, flipped, neighbours, lanes, bias, row0, H, W, C,
                          cols, owned, chans, stride_xn, stride_dyn, stride_dxn, RELU_PROLOGUE, ROWS, 4)
    dw00, dw01, dw02, dw10, dw11, dw12, dw20, dw21, dw22 = state[6]
    dbias = state[7]
    part = dw_part_ptr + pid * 9 * C + chans
    ok = chans < C
    tl.store(part, tl.sum(dw00, axis=0), mask=ok)
    tl.store(part + C, tl.sum(dw01, axis=0), mask=ok)
    tl.store(part + 2 * C, tl.sum(dw02, axis=0), mask=ok)
    tl.store(part + 3 * C, tl.sum(dw10, axis=0), mask=ok)
    tl.store(part + 4 * C, tl.sum(dw11, axis=0), mask=ok)
    tl.store(part + 5 * C, tl.sum(dw12, axis=0), mask=ok)
    tl.store(part + 6 * C, tl.sum(dw20, axis=0), mask=ok)
    tl.store(part + 7 * C, tl.sum(dw21, axis=0), mask=ok)
    tl.store(part + 8 * C, tl.sum(dw22, axis=0), mask=ok)
    tl.store(dbias_part_ptr + pid * C + chans, tl.sum(dbias, axis=0), mask=ok)


# ------------------------------------------------------------------------------------------- launchers


def _grid(B, H, W, C, tiling):
    return (B * triton.cdiv(H, tiling.rows) * triton.cdiv(W, tiling.owned_w), triton.cdiv(C, tiling.block_c))


def _constexprs(tiling, relu_prologue):
    return dict(RELU_PROLOGUE=bool(relu_prologue), ROWS=tiling.rows, BLOCK_W=tiling.block_w, HALO=tiling.halo,
                BLOCK_C=tiling.block_c)


def dwconv_gelu_fwd(x, H, W, weight, bias, relu_prologue, out=None):
    """``GELU(dwconv3x3(relu?(x)) + bias)`` for tokens ``x`` ``(B, H*W, C)``, as a new contiguous tensor
    in x's dtype or written into ``out`` (``(B, H*W, C)``, x's dtype, channel stride 1).

    ``weight`` ``(C, 1, 3, 3)`` and ``bias`` ``(C,)`` may have any float dtype (read as fp32). Shapes,
    dtypes and devices are checked by :mod:`pvt_fast.ops.mlp_dwconv`, not here.
    """
    x = unit_last_stride(x)
    B, N, C = x.shape
    if out is None:
        out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    _dwconv_gelu_fwd_kernel[_grid(B, H, W, C, FORWARD)](
        x, weight.contiguous(), bias.contiguous(), out,
        H, W, C,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        **_constexprs(FORWARD, relu_prologue), num_warps=FORWARD.warps,
    )
    return out


def dwconv_gelu_bwd(grad_out, x, H, W, weight, bias, relu_prologue, grad_x=None, tiling=None):
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`dwconv_gelu_fwd` for ``grad_out``
    ``(B, H*W, C)``; each in the dtype of its input. ``grad_x`` may be given (as ``out`` above);
    ``tiling`` (one of :data:`BACKWARD_TILINGS`) overrides the launcher's choice (tests).

    Temporaries: fp32 partial sums, ``(P, 9, C)`` for d weight and ``(P, C)`` for d bias, with P = the
    grid's axis 0 (``B * cdiv(H, rows) * cdiv(W, 12)``, rows from :func:`backward_tiling`); ``torch.sum``
    reduces them over P (deterministic).
    """
    x = unit_last_stride(x)
    dy = unit_last_stride(grad_out)
    B, N, C = x.shape
    if grad_x is None:
        grad_x = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        grad_x.zero_()
        return grad_x, weight.new_zeros(weight.shape), bias.new_zeros(bias.shape)
    tiling = tiling or backward_tiling(Problem(B, H, W, C, x.dtype))
    grid = _grid(B, H, W, C, tiling)
    dw_part = torch.empty((grid[0], 9, C), dtype=torch.float32, device=x.device)
    dbias_part = torch.empty((grid[0], C), dtype=torch.float32, device=x.device)
    _dwconv_gelu_bwd_kernel[grid](
        x, weight.contiguous(), bias.contiguous(), dy, grad_x, dw_part, dbias_part,
        H, W, C,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), grad_x.stride(0), grad_x.stride(1),
        **_constexprs(tiling, relu_prologue), num_warps=tiling.warps,
    )
    grad_weight = dw_part.sum(0).t().contiguous().view(C, 1, 3, 3).to(weight.dtype)
    grad_bias = dbias_part.sum(0).to(bias.dtype)
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Problem:
    """Batch, grid height and width, hidden channels and the tokens' dtype (parameters in the same dtype)."""

    B: int
    H: int
    W: int
    C: int
    dtype: torch.dtype

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()


def _inside(start, stop, size):
    return max(0, min(stop, size) - max(start, 0))


def _tile_loads(p, tiling, row_reach, lane_trim):
    """Elements the programs load from one token tensor, summed over every program: rows ``row0 -
    row_reach .. row0 + rows - 1 + row_reach`` and tile lanes ``lane_trim .. block_w - 1 - lane_trim``,
    only those inside the image."""
    rows = sum(_inside(r0 - row_reach, r0 + tiling.rows + row_reach, p.H) for r0 in range(0, p.H, tiling.rows))
    cols = sum(_inside(c0 - tiling.halo + lane_trim, c0 - tiling.halo + tiling.block_w - lane_trim, p.W)
               for c0 in range(0, p.W, tiling.owned_w))
    return p.B * p.C * rows * cols


def _programs(p, tiling):
    grid = _grid(p.B, p.H, p.W, p.C, tiling)
    return grid[0], grid[0] * grid[1]


def _tile_flops(tiling, fmas_per_lane, programs):
    return programs * tiling.block_w * tiling.block_c * 2 * fmas_per_lane


def _walk_fmas(rows):
    """FMAs per tile element of a walk down ``rows`` rows: kernel row 2 at each of its rows + 2 steps,
    kernel rows 1 and 0 at ``rows`` steps each, three taps each."""
    return 3 * (3 * rows + 2)


def forward_cost(p):
    """The forward launch as :mod:`pvt_fast.kernels.traffic` counts it (parameters in the tokens' dtype)."""
    spatial, programs = _programs(p, FORWARD)
    e, t = p.elem, p.B * p.H * p.W * p.C * p.elem
    launch = Launch("dwconv_gelu_fwd", programs, (
        Access("x", t, loaded=_tile_loads(p, FORWARD, 1, 0) * e),
        Access("weight", 9 * p.C * e, loaded=spatial * 9 * p.C * e),
        Access("bias", p.C * e, loaded=spatial * p.C * e), Access("y", t, stored=t),
    ), flops=_tile_flops(FORWARD, _walk_fmas(FORWARD.rows), programs))
    return OpCost((launch,), 2 * t + 10 * p.C * e, 18 * p.B * p.H * p.W * p.C)


@lru_cache(maxsize=256)
def backward_tiling(p):
    """The backward tiling for problem ``p``: of :data:`BACKWARD_TILINGS`, the one with the least predicted
    time (:mod:`pvt_fast.kernels.traffic`), on a tie the one with fewer FLOPs."""
    from pvt_fast.kernels import traffic

    def cost(tiling):
        summary = traffic.summarize(backward_cost(p, tiling))
        return summary.predicted, summary.flops

    return min(BACKWARD_TILINGS, key=cost)


def backward_cost(p, tiling=None):
    """The backward launch (pre recomputed over rows + 2, dx walk, nine d weight products per row) and the
    sums of its partial results, with ``tiling`` or the launcher's choice."""
    tiling = tiling or backward_tiling(p)
    spatial, programs = _programs(p, tiling)
    e, t = p.elem, p.B * p.H * p.W * p.C * p.elem
    # Per tile element, three taps per kernel row: the pre walk folds kernel rows 2 and 0 at step 0 and all
    # three at every later step (rows + 3); the dx walk two at step 2 and three from step 3 on (rows + 1);
    # nine d weight products from step 3 on (rows + 1). FMAs only: GELU' (an erf and an exp per element and
    # step) is not counted, which flatters the rows where this kernel is compute-bound (7x7 images).
    rows = tiling.rows
    fmas = (6 + 9 * (rows + 3)) + (6 + 9 * (rows + 1)) + 9 * (rows + 1)
    launches = (
        Launch("dwconv_gelu_bwd", programs, (
            Access("x", t, loaded=_tile_loads(p, tiling, 2, 0) * e),
            Access("grad_out", t, loaded=_tile_loads(p, tiling, 1, 1) * e),
            Access("weight", 9 * p.C * e, loaded=spatial * 9 * p.C * e),
            Access("bias", p.C * e, loaded=spatial * p.C * e),
            Access("dx", t, stored=t),
            Access("dw_part", 36 * spatial * p.C, stored=36 * spatial * p.C),
            Access("dbias_part", 4 * spatial * p.C, stored=4 * spatial * p.C),
        ), flops=_tile_flops(tiling, fmas, programs)),
        pytorch_kernel("dw_part.sum(0)", {"dw_part": 36 * spatial * p.C}, {"grad_weight": 36 * p.C}),
        pytorch_kernel("dbias_part.sum(0)", {"dbias_part": 4 * spatial * p.C}, {"grad_bias": 4 * p.C}),
    )
    return OpCost(launches, 3 * t + 10 * p.C * e + 10 * p.C * e, 36 * p.B * p.H * p.W * p.C)


# ------------------------------------------------------------------------------------ ahead of time


def aot_specs():
    """Every (kernel, x dtype, parameter dtype, tiling, ReLU prologue) the launchers can pick.

    Parameters come in x's dtype (a model cast to half) or fp32 (autocast). Integer arguments are typed
    i32; the JIT switches a stride to i64 by itself when a tensor is larger than 2**31 elements.
    """
    specs = []
    kernels = [
        ("dwconv_gelu_fwd", _dwconv_gelu_fwd_kernel, FORWARD,
         ("x_ptr", "y_ptr"), ("w_ptr", "b_ptr"), (), ("stride_xb", "stride_xn", "stride_yb", "stride_yn")),
    ]
    kernels += [
        ("dwconv_gelu_bwd", _dwconv_gelu_bwd_kernel, tiling,
         ("x_ptr", "dy_ptr", "dx_ptr"), ("w_ptr", "b_ptr"), ("dw_part_ptr", "dbias_part_ptr"),
         ("stride_xb", "stride_xn", "stride_dyb", "stride_dyn", "stride_dxb", "stride_dxn"))
        for tiling in BACKWARD_TILINGS
    ]
    for x_dtype in _DTYPES:
        for param_dtype in dict.fromkeys((x_dtype, torch.float32)):
            for relu in (False, True):
                for label, fn, tiling, act_ptrs, param_ptrs, fp32_ptrs, strides in kernels:
                    constexprs = _constexprs(tiling, relu)
                    types = dict.fromkeys(("H", "W", "C") + strides, "i32")
                    types.update(dict.fromkeys(act_ptrs, "*" + TRITON_TYPES[x_dtype]))
                    types.update(dict.fromkeys(param_ptrs, "*" + TRITON_TYPES[param_dtype]))
                    types.update(dict.fromkeys(fp32_ptrs, "*fp32"))
                    types.update(dict.fromkeys(constexprs, "constexpr"))
                    signature = {name: types[name] for name in fn.arg_names}
                    specs.append(AotSpec(
                        name=f"{label} x={TRITON_TYPES[x_dtype]} w={TRITON_TYPES[param_dtype]} "
                             f"R{tiling.rows} W{tiling.block_w} C{tiling.block_c} relu={int(relu)}",
                        fn=fn, signature=signature, constexprs=constexprs, num_warps=tiling.warps,
                    ))
    return specs
