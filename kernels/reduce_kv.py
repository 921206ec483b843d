"""Triton kernels for the key/value reduction of spatial-reduction attention (SRA).

PVT attends from every token to a reduced set of ``M`` keys/values. Two reductions exist:

- conv SRA (v1, v2): ``Conv2d(C, C, kernel=stride=sr)`` over the token grid, then ``LayerNorm(C)``;
- linear SRA (v2-li): ``AdaptiveAvgPool2d(7)`` -> 1x1 ``Conv2d`` -> ``LayerNorm(C)`` -> exact GELU.

Both read the tokens ``x`` ``(B, N, C)``, ``N = H * W``, token ``n = h * W + w``, in place through their
strides, and write ``(B, M, C)`` tokens, ``m = ho * Wo + wo``. Their plain-PyTorch references are
``pvt_fast.ops.eager.reduce_kv_reference`` and ``reduce_kv_linear_reference`` (the official op order).
The kv projection that follows stays a cuBLAS ``F.linear`` in the model: fusing it here would save one
write and one read of the ``sr * sr`` times smaller ``(B, M, C)`` for a second GEMM's worth of registers.

``x`` may be fp32 while the parameters are fp16/bf16 (autocast: ``x`` is the block's fp32 LayerNorm
output): the kernel rounds each ``x`` tile to the parameters' dtype in registers, as autocast's ``conv2d``
rounds its input, so ``x`` is read once, in place, with no cast copy. The output has the parameters' dtype.

Kernels
-------
``_conv_gemm_kernel`` is the conv as an implicit GEMM, ``y[r, :] = sum_k A[r, k] * Wt[k, :] + bias`` over
the ``rows = B * M`` output tokens ``r = b * M + m`` and ``k = (i * sr + j) * C + ci`` over the
``sr x sr x C`` patch (``K = sr * sr * C``). A program owns ``BLOCK_M`` tokens and every channel: the
channels are split into a power-of-two main block and a power-of-two tail (``C_MAIN + C_TAIL >= C``, e.g.
320 = 256 + 64), so no channel count is padded to the next power of two. The weight tiles of a step are
read once per program and multiplied with ``BLOCK_M`` tokens: ``ceil(rows / BLOCK_M)`` reads of the
weight in all. When that leaves too few programs to fill the GPU, the ``K`` steps are split over
``SPLITS`` programs per row block (split-K) that write fp32 partial sums; ``_split_layer_norm_kernel``
adds them in a fixed order (no atomics: deterministic) and applies the bias, LayerNorm (and GELU).
Unsplit, the bias, LayerNorm (and GELU) run in the GEMM's epilogue on the fp32 accumulator.

``_adaptive_avg_pool7_kernel`` is PyTorch's ``adaptive_avg_pool2d(., 7)`` on the token layout (see its
docstring); v2-li then runs the GEMM with ``sr = 1`` on the pooled grid.

What each launch moves is written down in :func:`forward_cost` (checked against the bytes the interpreter
moves in ``tests/test_traffic.py``); ``python -m pvt_fast.kernels.report --traffic`` prints it at the
benchmark shapes.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pvt_fast.kernels._aot import AotSpec
from pvt_fast.kernels._common import TRITON_TYPES, dot_inputs, input_precision, num_sms
from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost, reuse_set

POOL_SIZE = 7
_POOL = tl.constexpr(POOL_SIZE)
MAX_CHANNELS = 1024


@triton.jit
def _layer_norm_rows(y, co, C, mean, rstd, gamma_ptr, beta_ptr, APPLY_GELU):
    """``(y - mean) * rstd * gamma + beta`` (then exact GELU if APPLY_GELU != 0) for channel rows ``co`` of
    the transposed tile ``y[co, r]``."""
    co_ok = co < C
    gamma = tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    z = (y - mean[None, :]) * rstd[None, :] * gamma[:, None] + beta[:, None]
    if APPLY_GELU != 0:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit(do_not_specialize=["SR", "SPLIT", "APPLY_GELU"])
def _conv_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr, part_ptr,
    rows, M, Wo, W, C, SR, steps_per_split, SPLIT, eps, APPLY_GELU,
    stride_xb, stride_xn, stride_xc,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ob, stride_om, stride_oc,
    stride_ps, stride_pr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, C_MAIN: tl.constexpr, C_TAIL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Strided ``SR x SR`` conv + bias (+ LayerNorm, + exact GELU) of a token grid, one output row per token.

    Math, for output token ``r = b * M + m``, ``m = ho * Wo + wo`` and channel ``co``::

        y[r, co]  = bias[co] + sum_{i, j < SR} sum_{ci < C} w[co, ci, i, j] * x[b, (ho*SR + i) * W + wo*SR + j, ci]
        out[r, :] = (y[r, :] - mean_C y[r, :]) * rsqrt(var_C y[r, :] + eps) * gamma + beta   (biased variance)
        out       = 0.5 * out * (1 + erf(out / sqrt(2)))                                      if APPLY_GELU != 0

    Pointers, all through the strides given: ``x`` ``(B, N, C)`` tokens of an ``H x W`` grid (``H`` is implied
    by ``M``), any float dtype; ``w`` ``(C, C, SR, SR)`` in any layout (channels-last makes each ``BLOCK_K``
    slice of input channels contiguous), fp16/bf16/fp32: the dot runs in its dtype, ``x`` tiles are rounded
    to it; ``bias``, ``gamma``, ``beta`` ``(C,)`` contiguous; ``out`` ``(B, M, C)`` in w's dtype; ``part``
    ``(SPLITS, rows, C)`` fp32 with strides ``(stride_ps, stride_pr, 1)``. Offsets into ``x``, ``out`` and
    ``part`` are int64, into ``w`` int32 (``C * C * SR * SR < 2**31``). Grid rows past ``Ho * SR`` and
    columns past ``Wo * SR`` are never read (PyTorch's floor).

    Program ``(p, s, t)`` owns tokens ``[p * BLOCK_M, (p + 1) * BLOCK_M)`` of all ``rows = B * M`` (tokens of
    different images may share a program), steps ``[s * steps_per_split, (s + 1) * steps_per_split)`` of the
    flat ``(i, j, channel block)`` loop, ``BLOCK_K`` input channels a step, and output channels from
    ``t * C_MAIN``. The tile is computed transposed, ``acc[co, r] = w_tile @ x_tile`` (channels are the MMA's
    M, the few tokens its N), in two parts: channels ``[0, C_MAIN)`` and ``[C_MAIN, C_MAIN + C_TAIL)``
    (``C_TAIL`` may be 0) from the tile's first. With ``SPLIT != 0`` the fp32 sums go to ``part[s]``
    (channels ``< C``, tokens ``< rows``); otherwise (one channel tile holding every channel) the epilogue
    adds the bias, normalizes over ``C`` and stores ``out``.

    Masking: tokens ``>= rows`` and input channels ``>= C`` load 0 from ``x``. Weight rows ``co >= C`` (in a
    tail, or a main block above ``C < 16``) are clamped to row ``C - 1``: in-bounds loads without a 2-D
    predicate; their accumulator rows are never stored and are zeroed before the LayerNorm sums.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    b = r // M
    m = r - b * M
    ho = m // Wo
    wo = m - ho * Wo
    x_row = b.to(tl.int64) * stride_xb + (ho * SR * W + wo * SR).to(tl.int64) * stride_xn

    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_row[None, :] + k[:, None].to(tl.int64) * stride_xc
    co = tl.program_id(2) * C_MAIN + tl.arange(0, C_MAIN)
    w_main = tl.minimum(co, C - 1)[:, None] * stride_wo + k[None, :] * stride_wi
    acc = tl.zeros((C_MAIN, BLOCK_M), dtype=tl.float32)
    if C_TAIL > 0:
        co_tail = C_MAIN + tl.arange(0, C_TAIL)
        w_tail = tl.minimum(co_tail, C - 1)[:, None] * stride_wo + k[None, :] * stride_wi
        acc_tail = tl.zeros((C_TAIL, BLOCK_M), dtype=tl.float32)

    blocks_per_tap = tl.cdiv(C, BLOCK_K)
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, SR * SR * blocks_per_tap)
    for step in range(first, last):
        tap = step // blocks_per_tap
        c0 = (step - tap * blocks_per_tap) * BLOCK_K
        i = tap // SR
        j = tap - i * SR
        k_ok = k < C - c0
        x_shift = (i * W + j).to(tl.int64) * stride_xn + c0.to(tl.int64) * stride_xc
        w_shift = i * stride_wh + j * stride_ww + c0 * stride_wi
        xt = tl.load(x_ptrs + x_shift, mask=k_ok[:, None] & row_ok[None, :], other=0.0).to(w_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + w_shift + w_main, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)
        if C_TAIL > 0:
            wt = tl.load(w_ptr + w_shift + w_tail, mask=k_ok[None, :], other=0.0)
            acc_tail = tl.dot(wt, xt, acc_tail, input_precision=INPUT_PRECISION)

    if SPLIT != 0:
        part = part_ptr + split.to(tl.int64) * stride_ps + r.to(tl.int64)[None, :] * stride_pr
        tl.store(part + co[:, None], acc, mask=(co < C)[:, None] & row_ok[None, :])
        if C_TAIL > 0:
            tl.store(part + co_tail[:, None], acc_tail, mask=(co_tail < C)[:, None] & row_ok[None, :])
    else:
        acc = tl.where((co < C)[:, None], acc + tl.load(bias_ptr + co, mask=co < C, other=0.0).to(tl.float32)[:, None],
                       0.0)
        total = tl.sum(acc, axis=0)
        if C_TAIL > 0:
            bias_tail = tl.load(bias_ptr + co_tail, mask=co_tail < C, other=0.0).to(tl.float32)
            acc_tail = tl.where((co_tail < C)[:, None], acc_tail + bias_tail[:, None], 0.0)
            total += tl.sum(acc_tail, axis=0)
        mean = total / C
        diff = tl.where((co < C)[:, None], acc - mean[None, :], 0.0)
        sq = tl.sum(diff * diff, axis=0)
        if C_TAIL > 0:
            diff_tail = tl.where((co_tail < C)[:, None], acc_tail - mean[None, :], 0.0)
            sq += tl.sum(diff_tail * diff_tail, axis=0)
        rstd = 1.0 / tl.sqrt(sq / C + eps)
        out_row = out_ptr + b.to(tl.int64)[None, :] * stride_ob + m.to(tl.int64)[None, :] * stride_om
        out_ty = out_ptr.dtype.element_ty
        y = _layer_norm_rows(acc, co, C, mean, rstd, gamma_ptr, beta_ptr, APPLY_GELU)
        tl.store(out_row + co.to(tl.int64)[:, None] * stride_oc, y.to(out_ty), mask=(co < C)[:, None] & row_ok[None, :])
        if C_TAIL > 0:
            y = _layer_norm_rows(acc_tail, co_tail, C, mean, rstd, gamma_ptr, beta_ptr, APPLY_GELU)
            tl.store(out_row + co_tail.to(tl.int64)[:, None] * stride_oc, y.to(out_ty),
                     mask=(co_tail < C)[:, None] & row_ok[None, :])


@triton.jit(do_not_specialize=["APPLY_GELU"])
def _split_layer_norm_kernel(
    part_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr,
    rows, M, C, splits, eps, APPLY_GELU,
    stride_ps, stride_pr, stride_ob, stride_om, stride_oc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[r] = LayerNorm(sum_s part[s, r] + bias)`` (+ exact GELU) for ``BLOCK_R`` tokens of the split-K GEMM.

    ``part`` ``(splits, rows, C)`` fp32 with strides ``(stride_ps, stride_pr, 1)``, summed in split order (a
    fixed order: the result does not depend on scheduling); ``out`` ``(B, M, C)``, ``r = b * M + m``;
    ``bias``, ``gamma``, ``beta`` ``(C,)``. ``BLOCK_C >= C``; tokens ``>= rows`` and channels ``>= C``
    masked. Bytes: ``4 * splits * rows * C`` read, ``rows * C`` elements written.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    row_ok = r < rows
    c_ok = c < C
    mask = row_ok[:, None] & c_ok[None, :]
    ptrs = part_ptr + r.to(tl.int64)[:, None] * stride_pr + c[None, :]
    y = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(splits):
        y += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    y = tl.where(c_ok[None, :], y + tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    mean = tl.sum(y, axis=1) / C
    diff = tl.where(c_ok[None, :], y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    z = diff * rstd[:, None] * gamma[None, :] + beta[None, :]
    if APPLY_GELU != 0:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    b = r // M
    out = out_ptr + b.to(tl.int64)[:, None] * stride_ob + (r - b * M).to(tl.int64)[:, None] * stride_om
    tl.store(out + c.to(tl.int64)[None, :] * stride_oc, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_avg_pool7_kernel(
    x_ptr, out_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_xc,
    stride_ob, stride_om, stride_oc,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``adaptive_avg_pool2d(grid, 7)`` of a token grid, written as tokens.

    Math: for image ``b``, bin ``(bi, bj)`` (output token ``m = bi * 7 + bj``) and channel ``c``::

        rows [h0, h1) = [floor(bi * H / 7), ceil((bi + 1) * H / 7)),  columns [w0, w1) likewise with W
        out[b, m, c] = sum_{h0 <= h < h1, w0 <= w < w1} x[b, h * W + w, c] / ((h1 - h0) * (w1 - w0))

    Pointers: ``x`` ``(B, H * W, C)`` and ``out`` ``(B, 49, C)``, both through their strides (int64
    offsets). Program ``(b * 49 + m, cb)`` sums its window ``BLOCK_T`` tokens x ``BLOCK_C`` channels at a
    time into an fp32 tile, reduced once at the end; window positions ``>= (h1 - h0) * (w1 - w0)`` and
    channels ``>= C`` are masked. The mean is rounded to ``out``'s dtype.

    Cost: ``B * C * sum(bin areas)`` adds (``= B * N * C`` when 7 divides H and W); bytes: the read of
    ``x`` (each token once when 7 divides H and W, up to ~4x for the tokens on shared bin edges otherwise,
    e.g. H < 7) and the ``B * 49 * C`` write.
    """
    pid = tl.program_id(0)
    b = pid // (_POOL * _POOL)
    bin_m = pid - b * (_POOL * _POOL)
    bi = bin_m // _POOL
    bj = bin_m - bi * _POOL
    h0 = (bi * H) // _POOL
    h1 = ((bi + 1) * H + _POOL - 1) // _POOL
    w0 = (bj * W) // _POOL
    w1 = ((bj + 1) * W + _POOL - 1) // _POOL
    width = w1 - w0
    count = (h1 - h0) * width

    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    t = tl.arange(0, BLOCK_T)
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + c[None, :].to(tl.int64) * stride_xc
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, count, BLOCK_T):
        pos = t0 + t
        token = (h0 + pos // width) * W + w0 + pos % width
        tile = tl.load(x_ptrs + token[:, None].to(tl.int64) * stride_xn,
                       mask=(pos < count)[:, None] & c_ok[None, :], other=0.0)
        acc += tile.to(tl.float32)
    mean = tl.sum(acc, axis=0) / count
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + bin_m * stride_om + c.to(tl.int64) * stride_oc
    tl.store(out_ptrs, mean.to(out_ptr.dtype.element_ty), mask=c_ok)



# Block configurations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Blocking of ``_conv_gemm_kernel`` (see :func:`gemm_config`); ``splits`` programs share each row block."""

    block_m: int
    c_main: int
    c_tail: int
    block_k: int
    splits: int
    num_warps: int
    num_stages: int
    c_tiles: int = 1  # > 1: channel tiles of C_MAIN (no tail), each its own program; always split


_ACC_BUDGET = 16384  # fp32 accumulator elements per program: 64 registers a thread at 8 warps
_W_TILE_BYTES = 16 * 1024  # the weight tiles of one step
_PIPELINE_BYTES = 110 * 1024  # operand tiles of all pipeline stages; sm_80 has 163 KB per block
_MAX_BLOCK_M = 64  # the traffic model's best at PVT's shapes: larger blocks leave SMs idle or need more splits


def channel_blocks(C):
    """``(C_MAIN, C_TAIL)``: the power of two >= C (at least 64, the wgmma M of a warpgroup), or, where that
    would pad by more than a quarter, the power of two below C plus an eighth of the padded size (80 = 64 + 16,
    160 = 128 + 32, 320 = 256 + 64, 640 = 512 + 128)."""
    main = max(64, triton.next_power_of_2(C))
    if main >= 128 and C <= main // 2 + main // 8:
        return main // 2, main // 8
    return main, 0


_TILE_C = 128  # channels per program when the channels are tiled
_TILE_M = 128


def _elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _block_k(channels, block_m, dtype, x_dtype):
    """Input channels per step: 64, 32 or 16, the most whose weight tile and x tile fit 16 KB each; 16 for
    exact fp32 dots (FMA operand tiles live in registers)."""
    if dot_inputs(dtype) == "ieee":
        return 16
    block_k = 64
    while block_k > 16 and max(channels * _elem(dtype), block_m * _elem(x_dtype)) * block_k > _W_TILE_BYTES:
        block_k //= 2
    return block_k


def _finish(block_m, c_main, c_tail, dtype, x_dtype, c_tiles=1):
    channels = c_main + c_tail
    block_k = _block_k(channels, block_m, dtype, x_dtype)
    stages = 3 if 3 * (channels * _elem(dtype) + block_m * _elem(x_dtype)) * block_k <= _PIPELINE_BYTES else 2
    acc = channels * block_m
    num_warps = 8 if acc >= 8192 else 4
    return GemmConfig(block_m, c_main, c_tail, block_k, 1, num_warps, stages, c_tiles)


def _whole_rows(C, dtype, x_dtype=None):
    """Every channel in one program: the blocking whose epilogue can normalize (splits set to 1). None for
    1024 channels: their operand tiles spill (the channel tiles serve them)."""
    c_main, c_tail = channel_blocks(C)
    if c_main + c_tail >= 1024:
        return None
    block_m = 16
    while block_m * 2 <= min(_MAX_BLOCK_M, _ACC_BUDGET // (c_main + c_tail)):
        block_m *= 2
    return _finish(block_m, c_main, c_tail, dtype, x_dtype or dtype)


def _tiled(C, dtype, x_dtype=None):
    """128-channel tiles of 128 tokens (the split sum normalizes); for C above 128 only."""
    return _finish(_TILE_M, _TILE_C, 0, dtype, x_dtype or dtype, triton.cdiv(C, _TILE_C))


def _blockings(C, dtype, x_dtype):
    whole = _whole_rows(C, dtype, x_dtype)
    return ([whole] if whole is not None else []) + ([_tiled(C, dtype, x_dtype)] if C > _TILE_C else [])


def gemm_config(rows, C, sr, dtype, num_sms, x_dtype=None):
    """How ``_conv_gemm_kernel`` is launched for ``rows`` output tokens of ``C`` channels and an ``sr x sr``
    reduction, parameters in ``dtype`` and ``x`` in ``x_dtype`` (None: the same), on a device with
    ``num_sms`` SMs.

    Two blockings: every channel in one program (the split-free case normalizes in the epilogue), with
    ``BLOCK_M`` the most tokens (a power of two, 16 to 64) whose accumulator fits 16K fp32 elements; or,
    for ``C > 128``, 128 x 128 tiles of (tokens, channels), which read the weight once per 128 tokens instead
    of once per 16-64 but read ``x`` once per channel tile, and always finish in the split sum. ``BLOCK_K``:
    see :func:`_block_k`. Warps: 8 from 8K accumulator elements, else 4. Pipeline
    stages: 3 where the operand tiles fit ``_PIPELINE_BYTES``.
    Which blocking, and how many splits (1 to 32, at most one per step), is what the traffic model
    (:mod:`pvt_fast.kernels.traffic`, with this device's SM count) predicts fastest: more splits fill idle
    SMs, each costs an fp32 partial sum written and read back.

    Every blocking compiles without register spills for sm_80 and sm_90 (``aot_specs``); none is tuned on
    hardware yet.
    """
    if C > MAX_CHANNELS:
        raise ValueError(f"C must be <= {MAX_CHANNELS} (one program holds a whole row), got {C}")
    return _gemm_config(rows, C, sr, dtype, num_sms, x_dtype or dtype, dot_inputs(dtype))


@functools.lru_cache(maxsize=1024)
def _gemm_config(rows, C, sr, dtype, num_sms, x_dtype, dot):
    """:func:`gemm_config`, cached per fp32 dot precision (``dot``: the blocking depends on it)."""
    from pvt_fast.kernels.traffic import launch_seconds

    problem = Problem(1, 1, 1, C, sr, x_dtype, dtype)
    x_bytes = rows * sr * sr * C * _elem(x_dtype)
    candidates = []
    for base in _blockings(C, dtype, x_dtype):
        steps = sr * sr * triton.cdiv(C, base.block_k)
        candidates += [dataclasses.replace(base, splits=s) for s in range(1, min(32, steps) + 1)]
    return min(candidates, key=lambda c: sum(
        launch_seconds(launch, num_sms) for launch in _gemm_launches(rows, c, problem, x_bytes, "x")[0]))


def steps_per_split(C, sr, config):
    steps = sr * sr * triton.cdiv(C, config.block_k)
    return triton.cdiv(steps, config.splits)


def _split_warps(block_c):
    return 8 if block_c >= 1024 else 4


def _split_blocks(C):
    """(BLOCK_R, BLOCK_C) of ``_split_layer_norm_kernel``: every channel, 512 elements a program (small
    programs: the split sum reads a few MB at most, and needs many programs to read it fast)."""
    block_c = max(64, triton.next_power_of_2(C))
    return max(1, 512 // block_c), block_c


_POOL_BLOCK_C = 64
_POOL_TILE = 4096  # BLOCK_T * BLOCK_C elements summed per step


def _largest_bin(size):
    return max(((i + 1) * size + POOL_SIZE - 1) // POOL_SIZE - i * size // POOL_SIZE for i in range(POOL_SIZE))


def pool_block_t(H, W):
    """Window positions the pool kernel sums per step: 16 for windows of at most 16 tokens, else 64."""
    largest = _largest_bin(H) * _largest_bin(W)
    return 16 if largest <= 16 else _POOL_TILE // _POOL_BLOCK_C


# Launchers ---------------------------------------------------------------------------------------------


def _conv_layer_norm(x, H, W, sr, weight, bias, gamma, beta, eps, apply_gelu, out, config):
    B, N, C = x.shape
    Ho, Wo = H // sr, W // sr
    rows = B * Ho * Wo
    if out is None:
        out = torch.empty((B, Ho * Wo, C), device=x.device, dtype=weight.dtype)
    if rows == 0:
        return out
    if config is None:
        config = gemm_config(rows, C, sr, weight.dtype, num_sms(x.device), x.dtype)
    bias, gamma, beta = bias.contiguous(), gamma.contiguous(), beta.contiguous()
    split = config.splits > 1 or config.c_tiles > 1
    part = torch.empty((config.splits if split else 0, rows, C), device=x.device, dtype=torch.float32)
    row_blocks = triton.cdiv(rows, config.block_m)
    _conv_gemm_kernel[(row_blocks, config.splits, config.c_tiles)](
        x, weight, bias, gamma, beta, out, part,
        rows, Ho * Wo, Wo, W, C, sr, steps_per_split(C, sr, config), int(split), eps, int(apply_gelu),
        *x.stride(), *weight.stride(), *out.stride(), part.stride(0), part.stride(1),
        INPUT_PRECISION=input_precision(dot_inputs(weight.dtype)), BLOCK_M=config.block_m, C_MAIN=config.c_main,
        C_TAIL=config.c_tail, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        block_r, block_c = _split_blocks(C)
        _split_layer_norm_kernel[(triton.cdiv(rows, block_r),)](
            part, bias, gamma, beta, out, rows, Ho * Wo, C, config.splits, eps, int(apply_gelu),
            part.stride(0), part.stride(1), *out.stride(), BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_split_warps(block_c),
        )
    return out


def reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps, out=None, config=None):
    """``LayerNorm(Conv2d(k = stride = sr)(x on its H x W grid))`` as ``(B, Ho * Wo, C)`` tokens.

    ``x`` ``(B, H * W, C)`` any strides, fp32, fp16 or bf16; ``sr_weight`` ``(C, C, sr, sr)`` any strides
    (channels-last is the fast one) and the ``(C,)`` parameters in one dtype, the output's (``x`` is rounded
    to it tile by tile). ``out``: an optional ``(B, Ho * Wo, C)`` tensor to write into; ``config``: a
    :class:`GemmConfig` instead of :func:`gemm_config`'s choice. No argument checks here:
    ``pvt_fast.ops.reduce_kv`` does them.
    """
    return _conv_layer_norm(x, H, W, sr_weight.shape[-1], sr_weight, sr_bias, norm_weight, norm_bias, eps,
                            False, out, config)


def reduce_kv_linear(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps, out=None, config=None):
    """``GELU(LayerNorm(Conv1x1(AdaptiveAvgPool2d(7)(x on its H x W grid))))`` as ``(B, 49, C)`` tokens.

    Two launches: the pool into a ``(B, 49, C)`` tensor of ``x.dtype``, then the conv/LayerNorm kernel
    with ``sr = 1`` and GELU. Arguments as :func:`reduce_kv` with ``sr_weight`` ``(C, C, 1, 1)``.
    """
    B, N, C = x.shape
    pooled = torch.empty((B, POOL_SIZE * POOL_SIZE, C), device=x.device, dtype=x.dtype)
    if B > 0:
        _adaptive_avg_pool7_kernel[(B * POOL_SIZE * POOL_SIZE, triton.cdiv(C, _POOL_BLOCK_C))](
            x, pooled, H, W, C, *x.stride(), *pooled.stride(),
            BLOCK_T=pool_block_t(H, W), BLOCK_C=_POOL_BLOCK_C, num_warps=4,
        )
    return _conv_layer_norm(pooled, POOL_SIZE, POOL_SIZE, 1, sr_weight, sr_bias, norm_weight, norm_bias, eps,
                            True, out, config)


# Traffic ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Batch, token grid height and width, channels, reduction ratio, x's dtype and the parameters' dtype
    (None: x's; bf16 parameters with an fp32 x is what autocast runs)."""

    B: int
    H: int
    W: int
    C: int
    sr: int
    dtype: torch.dtype
    param_dtype: torch.dtype = None

    @property
    def weight_dtype(self):
        return self.param_dtype or self.dtype


def _peak(dtype):
    dot = dot_inputs(dtype)
    return "fp32" if dot == "ieee" else dot


def _gemm_launches(rows, cfg, p, x_bytes, x_name):
    """The GEMM (and split sum) launches of ``cfg`` for ``rows`` tokens reading ``x_bytes`` of ``x_name``,
    and the bytes of everything else the op must read or write once."""
    C, sr = p.C, p.sr
    e = _elem(p.weight_dtype)
    row_blocks = triton.cdiv(rows, cfg.block_m)
    w_bytes = C * C * sr * sr * e
    channels = (cfg.c_main + cfg.c_tail) * cfg.c_tiles
    steps = sr * sr * triton.cdiv(C, cfg.block_k)
    out_bytes = rows * C * e
    split = cfg.splits > 1 or cfg.c_tiles > 1
    part = cfg.splits * rows * C * 4
    accesses = [
        # every channel tile reads its tokens' x once
        Access(x_name, x_bytes, loaded=cfg.c_tiles * x_bytes,
               reuse_set=reuse_set(cfg.block_m * sr * sr * C * _elem(p.dtype), cfg.c_tiles)),
        # each program reads every weight row (rows past C clamped, not masked) of each of its steps once
        Access("weight", w_bytes, loaded=row_blocks * channels * sr * sr * C * e, reuse_set=w_bytes),
    ]
    if not split:
        accesses += [Access("params", 3 * C * e, loaded=row_blocks * 3 * C * e),
                     Access("out", out_bytes, stored=out_bytes)]
    else:
        accesses.append(Access("partial", part, stored=part))
    launches = [Launch("reduce_kv conv_gemm", row_blocks * cfg.splits * cfg.c_tiles, tuple(accesses),
                       flops=row_blocks * steps * 2 * channels * cfg.block_k * cfg.block_m,
                       peak=_peak(p.weight_dtype))]
    if split:
        block_r, _ = _split_blocks(C)
        programs = triton.cdiv(rows, block_r)
        launches.append(Launch("reduce_kv split_layer_norm", programs, (
            Access("partial", part, loaded=part), Access("params", 3 * C * e, loaded=programs * 3 * C * e),
            Access("out", out_bytes, stored=out_bytes))))
    return launches, w_bytes + 3 * C * e + out_bytes


def forward_cost(p, num_sms=SMS):
    """The forward's launches as :mod:`pvt_fast.kernels.traffic` counts them: conv SRA for ``p.sr >= 1``."""
    xe = _elem(p.dtype)
    rows = p.B * (p.H // p.sr) * (p.W // p.sr)
    x_bytes = rows * p.sr * p.sr * p.C * xe
    cfg = gemm_config(rows, p.C, p.sr, p.weight_dtype, num_sms, p.dtype)
    launches, other = _gemm_launches(rows, cfg, p, x_bytes, "x")
    return OpCost(tuple(launches), x_bytes + other, 2 * rows * p.C * p.C * p.sr * p.sr)


def linear_forward_cost(p, num_sms=SMS):
    """The v2-li forward (pool, then the 1x1 conv on the pooled grid)."""
    xe = _elem(p.dtype)
    bins = [((i + 1) * p.H + POOL_SIZE - 1) // POOL_SIZE - i * p.H // POOL_SIZE for i in range(POOL_SIZE)]
    cols = [((j + 1) * p.W + POOL_SIZE - 1) // POOL_SIZE - j * p.W // POOL_SIZE for j in range(POOL_SIZE)]
    pooled = p.B * POOL_SIZE * POOL_SIZE * p.C * xe
    x_bytes = p.B * p.H * p.W * p.C * xe
    pool = Launch("reduce_kv adaptive_avg_pool7", p.B * POOL_SIZE * POOL_SIZE * triton.cdiv(p.C, _POOL_BLOCK_C), (
        Access("x", x_bytes, loaded=p.B * p.C * sum(bins) * sum(cols) * xe), Access("pooled", pooled, stored=pooled)),
        flops=p.B * p.C * sum(bins) * sum(cols))
    rows = p.B * POOL_SIZE * POOL_SIZE
    cfg = gemm_config(rows, p.C, 1, p.weight_dtype, num_sms, p.dtype)
    launches, other = _gemm_launches(rows, cfg, dataclasses.replace(p, sr=1), pooled, "pooled")
    return OpCost((pool, *launches), x_bytes + other, 2 * rows * p.C * p.C)


# Ahead-of-time compile coverage ------------------------------------------------------------------------


def _variants():
    """(x dtype, parameter dtype, fp32 dot precision): a model in one dtype, and autocast's fp32 ``x`` with
    16-bit parameters."""
    yield torch.float32, torch.float32, "ieee"
    yield torch.float32, torch.float32, "tf32"
    for half in (torch.float16, torch.bfloat16):
        yield half, half, "ieee"
        yield torch.float32, half, "ieee"


def _gemm_configs(dtype, x_dtype):
    """Every :class:`GemmConfig` blocking (splits aside: a runtime argument) :func:`gemm_config` can pick."""
    configs = {}
    for C in range(1, MAX_CHANNELS + 1):
        for config in _blockings(C, dtype, x_dtype):
            configs[(config.block_m, config.c_main, config.c_tail)] = dataclasses.replace(config, c_tiles=1)
    return [configs[key] for key in sorted(configs)]


def _signature(fn, types):
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(eps="fp32", **types)
    return signature


def aot_specs():
    """Every (dtypes, fp32 precision, block configuration) the launchers can compile.

    Strides of 1 are constexprs, as Triton's JIT specializes them; the other integers are i32. The report
    (``kernels/report.py``) compiles them with the alignment hints the JIT derives for PVT's tensors
    (16-byte pointers, strides divisible by 16); unaligned channel counts compile a variant it does not see.
    """
    specs = []
    for x_dtype, dtype, precision in _variants():
        tx, ty = TRITON_TYPES[x_dtype], TRITON_TYPES[dtype]
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
        try:
            configs = _gemm_configs(dtype, x_dtype)
        finally:
            torch.set_float32_matmul_precision(saved)
        for config in configs:
            constexprs = dict(stride_xc=1, stride_oc=1, INPUT_PRECISION=precision, BLOCK_M=config.block_m,
                              C_MAIN=config.c_main, C_TAIL=config.c_tail, BLOCK_K=config.block_k)
            types = {f"{p}_ptr": f"*{ty}" for p in ("w", "bias", "gamma", "beta", "out")}
            types.update(x_ptr=f"*{tx}", part_ptr="*fp32", **dict.fromkeys(constexprs, "constexpr"))
            specs.append(AotSpec(
                name=f"reduce_kv conv_gemm x={tx} w={ty} {precision} M{config.block_m} "
                     f"C{config.c_main}+{config.c_tail} K{config.block_k}",
                fn=_conv_gemm_kernel, signature=_signature(_conv_gemm_kernel, types), constexprs=constexprs,
                num_warps=config.num_warps, num_stages=config.num_stages,
            ))
    for dtype, ty in TRITON_TYPES.items():
        for block_c in sorted({_split_blocks(C)[1] for C in range(1, MAX_CHANNELS + 1)}):
            block_r = _split_blocks(block_c)[0]
            constexprs = dict(stride_oc=1, BLOCK_R=block_r, BLOCK_C=block_c)
            types = {f"{p}_ptr": f"*{ty}" for p in ("bias", "gamma", "beta", "out")}
            types.update(part_ptr="*fp32", **dict.fromkeys(constexprs, "constexpr"))
            specs.append(AotSpec(
                name=f"reduce_kv split_layer_norm {ty} R{block_r} C{block_c}", fn=_split_layer_norm_kernel,
                signature=_signature(_split_layer_norm_kernel, types), constexprs=constexprs,
                num_warps=_split_warps(block_c)))
        for block_t in (16, _POOL_TILE // _POOL_BLOCK_C):
            constexprs = dict(stride_xc=1, stride_oc=1, BLOCK_T=block_t, BLOCK_C=_POOL_BLOCK_C)
            types = dict(x_ptr=f"*{ty}", out_ptr=f"*{ty}", **dict.fromkeys(constexprs, "constexpr"))
            specs.append(AotSpec(
                name=f"reduce_kv adaptive_avg_pool7 {ty} T{block_t} C{_POOL_BLOCK_C}", fn=_adaptive_avg_pool7_kernel,
                signature={name: types.get(name, "i32") for name in _adaptive_avg_pool7_kernel.arg_names},
                constexprs=constexprs, num_warps=4))
    return specs
