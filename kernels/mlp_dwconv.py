"""Depthwise 3x3 conv + bias + exact GELU on the token layout: the middle of a PVTv2 MLP.

The official ``Mlp`` views fc1's output ``(B, H*W, hidden)`` as an NCHW map, runs ``nn.Conv2d`` on it,
views the result back as tokens and applies GELU: separate kernels, at least two reads and two writes of
the hidden tensor, more where PyTorch makes the strided map contiguous for its depthwise conv.
:func:`dwconv_gelu_fwd` reads the tokens where they lie (token ``n = h*W + w``, channels contiguous) with
the one-pixel halo the 3x3 window needs and writes ``GELU(dwconv3x3(x) + bias)`` in the same layout: one
read and one write.

Tiling, shared by the three kernels: a program owns ``ROWS`` image rows x ``BLOCK_W`` columns x
``BLOCK_C`` channels of one image. Channels are the contiguous dimension, so every load is a coalesced,
vectorised read of ``BLOCK_C`` channels per token. The program walks its rows top to bottom (statically
unrolled), loads each input row once at three column shifts (``w-1, w, w+1``: the shifted loads reread
the cache lines of the unshifted one) and folds it into a rolling pair of unfinished output rows. The
vertical halo therefore costs two extra rows per ``ROWS`` rows, read from L2 (the neighbouring program
reads them too), not two extra loads per output row.

Backward, two kernels:
1. :func:`_dwconv_gelu_bwd_pre_kernel` recomputes the pre-activation ``pre = dwconv3x3(x) + bias`` with
   the forward's walk and writes ``g = dy * GELU'(pre)`` (in x's dtype, as PyTorch's GELU backward does)
   plus per-program partial sums of ``g`` over tokens (d bias).
2. :func:`_dwconv_bwd_kernel` reads ``g`` and ``x`` and writes ``dx = dconv^T(g)`` (the 3x3 taps
   flipped, times the ReLU mask with the prologue) and per-program partial sums of ``g * x`` for the nine
   taps (d weight).
Together they move ``6 * B*H*W*C * itemsize`` bytes (x and dy read, g written, g and x read, dx
written) and compute 27 MACs per element (the forward conv again, dx, d weight). The partial sums go to
``(programs, ..., hidden)`` fp32 buffers that ``torch.sum`` reduces over the
program axis: a fixed order, no atomics, so d weight and d bias are bitwise reproducible.

Precision: x, dy and g are read in their dtype (fp32, fp16, bf16) and every product and sum is fp32; the
weight and bias are read in their own dtype and converted to fp32 in registers (under autocast the conv
parameters stay fp32 while x is bf16: they are not rounded to bf16 first).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pvt_fast.kernels._aot import AotSpec
from pvt_fast.kernels._common import TRITON_TYPES, unit_last_stride
from pvt_fast.kernels._counts import Access, Launch, OpCost, pytorch_kernel

# Rows per program: the stage heights at 224 (56, 28, 14, 7) are multiples of 7, so no row block is partial.
ROWS = 7
# The tile each launch uses, by image width: narrow images (stages 3-4 at 224, W <= 8) trade columns for
# channels so a program still covers 1024 elements per row.
_WIDE_TILE = (16, 64)
_NARROW_TILE = (8, 128)
# 8 warps give each thread 4 elements of a tile row (4 channels of one token: 8-byte loads in fp16/bf16,
# 16-byte in fp32). A thread keeps 9 fp32 taps per channel it owns, the rolling output rows, its loaded
# rows (ptxas hoists the unrolled loads: they are the memory-level parallelism) and, in the dx/d weight
# kernel, 9 d-weight accumulators per element: that kernel takes tiles half as wide (2 elements a thread),
# which keeps it at <= 128 registers like the others (two programs per SM; at full width it needed 150-250,
# one program per SM). No spills (pvt_fast.kernels.report).
_NUM_WARPS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ------------------------------------------------------------------------------------------- helpers


@triton.jit
def _tile_coords(H, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's spatial index (axis 0: image, row block, column block, columns fastest), image,
    first row, columns ``[BLOCK_W]`` and channels ``[BLOCK_C]`` (axis 1), all int64."""
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(W, BLOCK_W)
    row_blocks = tl.cdiv(H, ROWS)
    rest = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    row0 = (rest % row_blocks) * ROWS
    image = rest // row_blocks
    chans = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return pid, image, row0, cols, chans


@triton.jit
def _load_taps(w_ptr, chans, C, FLIP: tl.constexpr):
    """The 3x3 taps of ``chans``: a tuple of nine fp32 ``[1, BLOCK_C]`` rows ``w[kh][kw]``, row-major, read
    from the ``(C, 1, 3, 3)`` weight at ``c*9 + 3*kh + kw``. ``FLIP`` returns ``w[2-kh][2-kw]`` instead,
    the taps of the transposed convolution (flat index ``8 - k``)."""
    ptrs = w_ptr + chans * 9
    ok = chans < C
    t0 = tl.load(ptrs + (8 if FLIP else 0), mask=ok, other=0.0).to(tl.float32)[None, :]
    t1 = tl.load(ptrs + (7 if FLIP else 1), mask=ok, other=0.0).to(tl.float32)[None, :]
    t2 = tl.load(ptrs + (6 if FLIP else 2), mask=ok, other=0.0).to(tl.float32)[None, :]
    t3 = tl.load(ptrs + (5 if FLIP else 3), mask=ok, other=0.0).to(tl.float32)[None, :]
    t4 = tl.load(ptrs + 4, mask=ok, other=0.0).to(tl.float32)[None, :]
    t5 = tl.load(ptrs + (3 if FLIP else 5), mask=ok, other=0.0).to(tl.float32)[None, :]
    t6 = tl.load(ptrs + (2 if FLIP else 6), mask=ok, other=0.0).to(tl.float32)[None, :]
    t7 = tl.load(ptrs + (1 if FLIP else 7), mask=ok, other=0.0).to(tl.float32)[None, :]
    t8 = tl.load(ptrs + (0 if FLIP else 8), mask=ok, other=0.0).to(tl.float32)[None, :]
    return (t0, t1, t2, t3, t4, t5, t6, t7, t8)


@triton.jit
def _load_row(img_ptr, stride_n, row, H, W, cols, chans, C, RELU: tl.constexpr):
    """Image row ``row`` at columns ``cols - 1``, ``cols`` and ``cols + 1`` as three fp32
    ``[BLOCK_W, BLOCK_C]`` tiles; zero outside the image (the conv's zero padding) and past ``C``.
    ``img_ptr`` points at token 0 of a ``(H*W, C)`` image with channel stride 1 and token stride
    ``stride_n``; ``RELU`` applies the prologue ReLU to the values read."""
    ok = (row >= 0) & (row < H) & (chans[None, :] < C)
    col = cols[:, None]
    ptrs = img_ptr + (row * W + col) * stride_n + chans[None, :]
    left = tl.load(ptrs - stride_n, mask=ok & (col >= 1) & (col <= W), other=0.0).to(tl.float32)
    center = tl.load(ptrs, mask=ok & (col < W), other=0.0).to(tl.float32)
    right = tl.load(ptrs + stride_n, mask=ok & (col + 1 < W), other=0.0).to(tl.float32)
    if RELU:
        left = tl.maximum(left, 0.0)
        center = tl.maximum(center, 0.0)
        right = tl.maximum(right, 0.0)
    return left, center, right


@triton.jit
def _row_offsets(row, H, W, cols, chans, C, stride_n):
    """Offsets (from the image's first token) and mask of the unshifted tile of row ``row``."""
    col = cols[:, None]
    mask = (row < H) & (col < W) & (chans[None, :] < C)
    return (row * W + col) * stride_n + chans[None, :], mask


@triton.jit
def _taps_row(left, center, right, t_left, t_center, t_right):
    return left * t_left + center * t_center + right * t_right


@triton.jit
def _walk_step(left, center, right, above, here, taps, STEP: tl.constexpr, ROWS: tl.constexpr):
    """One step of a program's walk down its rows: fold input row ``r = row0 - 1 + STEP`` (at columns
    ``w-1, w, w+1``) into the rolling output rows. Row r feeds output rows r+1 (kernel row 0), r (kernel
    row 1) and r-1 (kernel row 2); ``above`` holds output row r-1 without its kernel row 2, ``here``
    output row r with only kernel row 0. Returns output row r-1, complete (meaningful for
    ``STEP >= 2``), and the new ``above`` and ``here``; rows outside ``[row0, row0 + ROWS)`` are not
    accumulated."""
    done = above + _taps_row(left, center, right, taps[6], taps[7], taps[8])
    if STEP >= 1 and STEP <= ROWS:
        above = here + _taps_row(left, center, right, taps[3], taps[4], taps[5])
    if STEP < ROWS:
        here = _taps_row(left, center, right, taps[0], taps[1], taps[2])
    return done, above, here


@triton.jit
def _gelu(v):
    return 0.5 * v * (1.0 + tl.math.erf(v * _SQRT1_2))


@triton.jit
def _gelu_grad(v):
    """d GELU(v) / dv = Phi(v) + v * phi(v) for the exact (erf) GELU."""
    return 0.5 * (1.0 + tl.math.erf(v * _SQRT1_2)) + v * tl.exp(-0.5 * v * v) * _INV_SQRT_2PI


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dwconv_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_yb, stride_yn,
    RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y = GELU(dwconv3x3(relu?(x)) + b)``, zero padding 1, exact erf GELU.

    ``y[b, h*W + w, c] = GELU(b[c] + sum_{kh, kw} w[c, 0, kh, kw] * x[b, (h+kh-1)*W + (w+kw-1), c])`` with
    ``x`` taken as 0 outside the image.

    Layouts: ``x_ptr`` (B, H*W, C) strides (stride_xb, stride_xn, 1); ``y_ptr`` (B, H*W, C) strides
    (stride_yb, stride_yn, 1); ``w_ptr`` (C, 1, 3, 3) contiguous; ``b_ptr`` (C,). Grid
    ``(B * cdiv(H, ROWS) * cdiv(W, BLOCK_W), cdiv(C, BLOCK_C))``. Masked: rows >= H, columns >= W and
    channels >= C (tails), and the halo outside the image (reads as zero).

    Per element of y: 9 MACs (18 FLOPs) + bias + GELU. Bytes: one read and one write of the hidden
    tensor, ``2 * B*H*W*C * itemsize`` from DRAM (plus 9 + 1 weights per channel); L2 serves the halo:
    ``(ROWS + 2) / ROWS`` reads per element.
    """
    pid, image, row0, cols, chans = _tile_coords(H, W, ROWS, BLOCK_W, BLOCK_C)
    x_img = x_ptr + image * stride_xb
    y_img = y_ptr + image * stride_yb
    taps = _load_taps(w_ptr, chans, C, False)
    bias = tl.load(b_ptr + chans, mask=chans < C, other=0.0).to(tl.float32)[None, :]
    above = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    here = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for step in tl.static_range(ROWS + 2):
        row = row0 - 1 + step
        left, center, right = _load_row(x_img, stride_xn, row, H, W, cols, chans, C, RELU_PROLOGUE)
        conv, above, here = _walk_step(left, center, right, above, here, taps, step, ROWS)
        if step >= 2:
            offs, mask = _row_offsets(row - 1, H, W, cols, chans, C, stride_yn)
            tl.store(y_img + offs, _gelu(conv + bias).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_gelu_bwd_pre_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, dbias_part_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_dyb, stride_dyn, stride_gb, stride_gn,
    RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``g = dy * GELU'(pre)`` with ``pre = dwconv3x3(relu?(x)) + b`` recomputed as in the forward, and
    ``dbias_part[p, c] = sum over program p's tokens of g[., c]`` (fp32, before g is rounded).

    Layouts: ``x_ptr``, ``dy_ptr``, ``g_ptr`` (B, H*W, C) with channel stride 1 and the given batch and
    token strides; ``w_ptr`` (C, 1, 3, 3) contiguous; ``b_ptr`` (C,); ``dbias_part_ptr`` (P, C) fp32
    contiguous with ``P = B * cdiv(H, ROWS) * cdiv(W, BLOCK_W)`` the grid's axis 0 (axis 1 covers C).
    Masked as the forward; g and dy are zero outside the image.

    Per element: 9 MACs (recompute) + GELU'. Bytes: reads x and dy, writes g: ``3 * B*H*W*C * itemsize``,
    plus ``4 * P * C`` of partial sums.
    """
    pid, image, row0, cols, chans = _tile_coords(H, W, ROWS, BLOCK_W, BLOCK_C)
    x_img = x_ptr + image * stride_xb
    taps = _load_taps(w_ptr, chans, C, False)
    bias = tl.load(b_ptr + chans, mask=chans < C, other=0.0).to(tl.float32)[None, :]
    above = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    here = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for step in tl.static_range(ROWS + 2):
        row = row0 - 1 + step
        left, center, right = _load_row(x_img, stride_xn, row, H, W, cols, chans, C, RELU_PROLOGUE)
        conv, above, here = _walk_step(left, center, right, above, here, taps, step, ROWS)
        if step >= 2:
            dy_offs, mask = _row_offsets(row - 1, H, W, cols, chans, C, stride_dyn)
            dy = tl.load(dy_ptr + image * stride_dyb + dy_offs, mask=mask, other=0.0).to(tl.float32)
            g = dy * _gelu_grad(conv + bias)
            dbias += g
            g_offs, mask = _row_offsets(row - 1, H, W, cols, chans, C, stride_gn)
            tl.store(g_ptr + image * stride_gb + g_offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_part_ptr + pid * C + chans, tl.sum(dbias, axis=0), mask=chans < C)


@triton.jit
def _dwconv_bwd_kernel(
    x_ptr, w_ptr, g_ptr, dx_ptr, dw_part_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_gb, stride_gn, stride_dxb, stride_dxn,
    RELU_PROLOGUE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx`` and the d weight partial sums of the depthwise conv, from ``g = dL/d pre``.

    ``dx[b, h*W + w, c] = [x > 0] * sum_{kh, kw} w[c, 0, kh, kw] * g[b, (h-kh+1)*W + (w-kw+1), c]`` (the
    ReLU mask only with the prologue; g is 0 outside the image), i.e. the forward's walk with the taps
    flipped. ``dw_part[p, 3*kh + kw, c] = sum over program p's output tokens (h, w) of
    g[h, w, c] * relu?(x)[h+kh-1, w+kw-1, c]``.

    Layouts: ``x_ptr``, ``g_ptr``, ``dx_ptr`` (B, H*W, C) with channel stride 1 and the given batch and
    token strides; ``w_ptr`` (C, 1, 3, 3) contiguous; ``dw_part_ptr`` (P, 9, C) fp32 contiguous with P the
    grid's axis 0 as in the other kernels. Masked as the forward.

    Per element: 18 MACs (9 for dx, 9 for d weight). Bytes: reads g and x, writes dx:
    ``3 * B*H*W*C * itemsize``, plus ``36 * P * C`` of partial sums.
    """
    pid, image, row0, cols, chans = _tile_coords(H, W, ROWS, BLOCK_W, BLOCK_C)
    x_img = x_ptr + image * stride_xb
    g_img = g_ptr + image * stride_gb
    flipped = _load_taps(w_ptr, chans, C, True)
    above = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    here = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    # The d weight accumulators dw{kh}{kw}, and row r-1 of x (three shifts) and of g (unshifted).
    dw00 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw01 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw02 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw10 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw11 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw12 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw20 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw21 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw22 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    x_left = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    x_center = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    x_right = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g_above = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for step in tl.static_range(ROWS + 2):
        row = row0 - 1 + step
        g_left, g_center, g_right = _load_row(g_img, stride_gn, row, H, W, cols, chans, C, False)
        dx, above, here = _walk_step(g_left, g_center, g_right, above, here, flipped, step, ROWS)
        if step >= 2:
            if RELU_PROLOGUE:
                dx = tl.where(x_center > 0.0, dx, 0.0)
            offs, mask = _row_offsets(row - 1, H, W, cols, chans, C, stride_dxn)
            tl.store(dx_ptr + image * stride_dxb + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # g rows of this program (steps 1..ROWS) pair with x rows r-1 (kh = 0), r (kh = 1) and, one step
        # later, r+1 (kh = 2); the halo rows of g at steps 0 and ROWS+1 only feed dx.
        if step >= 1 and step <= ROWS:
            dw00 += g_center * x_left
            dw01 += g_center * x_center
            dw02 += g_center * x_right
        x_left, x_center, x_right = _load_row(x_img, stride_xn, row, H, W, cols, chans, C, RELU_PROLOGUE)
        if step >= 1 and step <= ROWS:
            dw10 += g_center * x_left
            dw11 += g_center * x_center
            dw12 += g_center * x_right
        if step >= 2:
            dw20 += g_above * x_left
            dw21 += g_above * x_center
            dw22 += g_above * x_right
        g_above = g_center
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


# ------------------------------------------------------------------------------------------- launchers


def _tile(W, dx_dw=False):
    """(BLOCK_W, BLOCK_C) for an image ``W`` columns wide; the dx/d weight kernel's is half as wide."""
    block_w, block_c = _NARROW_TILE if W <= _NARROW_TILE[0] else _WIDE_TILE
    return (block_w // 2 if dx_dw else block_w), block_c


def _grid(B, H, W, C, tile):
    block_w, block_c = tile
    return (B * triton.cdiv(H, ROWS) * triton.cdiv(W, block_w), triton.cdiv(C, block_c))


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
    tile = _tile(W)
    _dwconv_gelu_fwd_kernel[_grid(B, H, W, C, tile)](
        x, weight.contiguous(), bias.contiguous(), out,
        H, W, C,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        RELU_PROLOGUE=bool(relu_prologue), ROWS=ROWS, BLOCK_W=tile[0], BLOCK_C=tile[1],
        num_warps=_NUM_WARPS,
    )
    return out


def dwconv_gelu_bwd(grad_out, x, H, W, weight, bias, relu_prologue, grad_x=None):
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`dwconv_gelu_fwd` for ``grad_out``
    ``(B, H*W, C)``; each in the dtype of its input. ``grad_x`` may be given (as ``out`` above).

    Temporaries: g ``(B, H*W, C)`` in x's dtype and fp32 partial sums, ``(P, 9, C)`` for d weight and
    ``(P, C)`` for d bias, with P = the grids' axis 0 (``B * cdiv(H, ROWS) * cdiv(W, BLOCK_W)``); ``torch.sum``
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
    weight = weight.contiguous()
    tile, dx_tile = _tile(W), _tile(W, dx_dw=True)
    grid, dx_grid = _grid(B, H, W, C, tile), _grid(B, H, W, C, dx_tile)
    g = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    dbias_part = torch.empty((grid[0], C), dtype=torch.float32, device=x.device)
    dw_part = torch.empty((dx_grid[0], 9, C), dtype=torch.float32, device=x.device)
    _dwconv_gelu_bwd_pre_kernel[grid](
        x, weight, bias.contiguous(), dy, g, dbias_part,
        H, W, C,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), g.stride(0), g.stride(1),
        RELU_PROLOGUE=bool(relu_prologue), ROWS=ROWS, BLOCK_W=tile[0], BLOCK_C=tile[1], num_warps=_NUM_WARPS,
    )
    _dwconv_bwd_kernel[dx_grid](
        x, weight, g, grad_x, dw_part,
        H, W, C,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), grad_x.stride(0), grad_x.stride(1),
        RELU_PROLOGUE=bool(relu_prologue), ROWS=ROWS, BLOCK_W=dx_tile[0], BLOCK_C=dx_tile[1], num_warps=_NUM_WARPS,
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


def _walk_loads(p, tile):
    """Elements one walk over the image (9 input rows per program, each at three column shifts) loads, summed
    over every program: only rows inside the image and columns whose shifted index is inside it."""
    block_w, _ = tile
    col_blocks = triton.cdiv(p.W, block_w)
    per_row = min(p.W, col_blocks * block_w - 1) + p.W + (p.W - 1)  # left, center, right shifts
    rows = sum(min(p.H, r0 + ROWS + 1) - max(0, r0 - 1) for r0 in range(0, p.H, ROWS))
    return p.B * p.C * per_row * rows


def _programs(p, tile):
    grid = _grid(p.B, p.H, p.W, p.C, tile)
    return grid[0], grid[0] * grid[1]


def forward_cost(p):
    """The forward launch as :mod:`pvt_fast.kernels.traffic` counts it (parameters in the tokens' dtype)."""
    tile = _tile(p.W)
    spatial, programs = _programs(p, tile)
    e, t = p.elem, p.B * p.H * p.W * p.C * p.elem
    # Per tile position: 69 FMAs over the walk's 9 steps (kernel rows 0, 1, 2 of the rolling output rows).
    launch = Launch("dwconv_gelu_fwd", programs, (
        Access("x", t, loaded=_walk_loads(p, tile) * e), Access("weight", 9 * p.C * e, loaded=spatial * 9 * p.C * e),
        Access("bias", p.C * e, loaded=spatial * p.C * e), Access("y", t, stored=t),
    ), flops=programs * tile[0] * tile[1] * 2 * 69)
    return OpCost((launch,), 2 * t + 10 * p.C * e, 18 * p.B * p.H * p.W * p.C)


def backward_cost(p):
    """The two backward launches and the sums of their partial results."""
    tile, dx_tile = _tile(p.W), _tile(p.W, dx_dw=True)
    spatial, programs = _programs(p, tile)
    dx_spatial, dx_programs = _programs(p, dx_tile)
    e, t, walk = p.elem, p.B * p.H * p.W * p.C * p.elem, _walk_loads(p, tile) * p.elem
    dx_walk = _walk_loads(p, dx_tile) * e
    launches = (
        Launch("dwconv_gelu_bwd_pre", programs, (
            Access("x", t, loaded=walk), Access("weight", 9 * p.C * e, loaded=spatial * 9 * p.C * e),
            Access("bias", p.C * e, loaded=spatial * p.C * e),
            Access("grad_out", t, loaded=t), Access("g", t, stored=t),
            Access("dbias_part", 4 * spatial * p.C, stored=4 * spatial * p.C),
        ), flops=programs * tile[0] * tile[1] * 2 * 69),
        Launch("dwconv_bwd", dx_programs, (
            Access("g", t, loaded=dx_walk), Access("x", t, loaded=dx_walk),
            Access("weight", 9 * p.C * e, loaded=dx_spatial * 9 * p.C * e), Access("dx", t, stored=t),
            Access("dw_part", 36 * dx_spatial * p.C, stored=36 * dx_spatial * p.C),
        ), flops=dx_programs * dx_tile[0] * dx_tile[1] * 2 * (69 + 63)),
        pytorch_kernel("dw_part.sum(0)", {"dw_part": 36 * dx_spatial * p.C}, {"grad_weight": 36 * p.C}),
        pytorch_kernel("dbias_part.sum(0)", {"dbias_part": 4 * spatial * p.C}, {"grad_bias": 4 * p.C}),
    )
    return OpCost(launches, 3 * t + 10 * p.C * e + 10 * p.C * e, 36 * p.B * p.H * p.W * p.C)


# ------------------------------------------------------------------------------------ ahead of time


def aot_specs():
    """Every (kernel, x dtype, parameter dtype, tile, ReLU prologue) the launchers can pick.

    Parameters come in x's dtype (a model cast to half) or fp32 (autocast). Integer arguments are typed
    i32; the JIT switches a stride to i64 by itself when a tensor is larger than 2**31 elements.
    """
    specs = []
    kernels = (
        ("dwconv_gelu_fwd", _dwconv_gelu_fwd_kernel,
         ("x_ptr", "y_ptr"), ("w_ptr", "b_ptr"), (), ("stride_xb", "stride_xn", "stride_yb", "stride_yn")),
        ("dwconv_gelu_bwd_pre", _dwconv_gelu_bwd_pre_kernel,
         ("x_ptr", "dy_ptr", "g_ptr"), ("w_ptr", "b_ptr"), ("dbias_part_ptr",),
         ("stride_xb", "stride_xn", "stride_dyb", "stride_dyn", "stride_gb", "stride_gn")),
        ("dwconv_bwd", _dwconv_bwd_kernel,
         ("x_ptr", "g_ptr", "dx_ptr"), ("w_ptr",), ("dw_part_ptr",),
         ("stride_xb", "stride_xn", "stride_gb", "stride_gn", "stride_dxb", "stride_dxn")),
    )
    for x_dtype in _DTYPES:
        for param_dtype in dict.fromkeys((x_dtype, torch.float32)):
            for width in (_WIDE_TILE[0] + 1, _NARROW_TILE[0]):  # an image width that picks each tile
                for relu in (False, True):
                    for label, fn, act_ptrs, param_ptrs, fp32_ptrs, strides in kernels:
                        tile = _tile(width, dx_dw=fn is _dwconv_bwd_kernel)
                        constexprs = dict(RELU_PROLOGUE=relu, ROWS=ROWS, BLOCK_W=tile[0], BLOCK_C=tile[1])
                        types = dict.fromkeys(("H", "W", "C") + strides, "i32")
                        types.update(dict.fromkeys(act_ptrs, "*" + TRITON_TYPES[x_dtype]))
                        types.update(dict.fromkeys(param_ptrs, "*" + TRITON_TYPES[param_dtype]))
                        types.update(dict.fromkeys(fp32_ptrs, "*fp32"))
                        types.update(dict.fromkeys(constexprs, "constexpr"))
                        signature = {name: types[name] for name in fn.arg_names}
                        specs.append(AotSpec(
                            name=f"{label} x={TRITON_TYPES[x_dtype]} w={TRITON_TYPES[param_dtype]} "
                                 f"W{tile[0]} C{tile[1]} relu={int(relu)}",
                            fn=fn, signature=signature, constexprs=constexprs, num_warps=_NUM_WARPS,
                        ))
    return specs
