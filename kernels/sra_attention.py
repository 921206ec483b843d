"""Spatial-reduction attention: fused Triton forward and backward (reference: ``pvt_fast.ops.eager.attention_reference``).

For every batch ``b`` and head ``h`` (``d = C // heads`` columns wide)::

    S = scale * Q K^T            (N, M)     Q = q[b, :, h*d:(h+1)*d]
    lse = logsumexp(S, dim=-1)   (N,)       K = kv[b, :, h*d:(h+1)*d]
    O = exp(S - lse) V           (N, d)     V = kv[b, :, C + h*d : C + (h+1)*d]

Layouts, all read and written in place (last-dim stride 1, other strides passed to the kernels):
``q`` and ``o`` are ``(B, N, C)`` (the q Linear's output and the proj Linear's input), ``kv`` is
``(B, M, 2C)`` (the kv Linear's output, K in the first C columns), ``lse`` is ``(B, heads, N)`` fp32.
The gradient ``dkv`` has the layout of ``kv``; ``dq`` that of ``q``.

The forward is flash attention: each program owns ``BLOCK_N`` queries of one (b, h), keeps them in
registers and streams K/V in ``BLOCK_M``-key blocks with an online softmax in base 2 (``scale * log2 e``
folded into one multiply). Every query block reads all of its head's K/V: wider blocks (256 queries, where
M > 64) halve those reads, narrower ones (64) give idle SMs programs at batch 1; the plan takes the width
whose launch the traffic model (:mod:`pvt_fast.kernels.traffic`) predicts fastest on the device's SMs.

The backward: when every key fits one block (M <= 64, every PVT stage at 224 x 224) one kernel does it
all, five dots per query block and no recomputation: each program walks a range of queries of one (b, h),
computes delta = rowsum(dO * O), P, dP, dS, writes dQ (complete, all keys are in the block) and sums
dK, dV over its range. Otherwise flash attention's three kernels: delta, one that walks the queries for
each key block (dK, dV; 128-key blocks past 64 keys, so q and dO are read once per 128 keys) and one that
walks the keys for each query block (dQ), both recomputing ``P = exp(S - lse)``. Query ranges summed by
different programs write fp32 partial sums, which one more kernel adds in split order and rounds once into
dkv: nothing is accumulated with atomics, so results are bitwise reproducible. How many query ranges dK/dV
is split into is chosen the same way: splits fill SMs, each adds an fp32 partial-sum pass.

Head dims up to 128: the head-dim block is the next power of two >= 32, masked beyond d. The block sizes
come from one table (``_CONFIGS``) indexed by kernel, what tl.dot multiplies (fp16/bf16, tf32, or ieee
fp32) and the head-dim block, each entry free of register spills on sm_80 and sm_90 (checked by
``python -m pvt_fast.kernels.report``); M <= 16 uses 16-key blocks. Some backward tiles re-read their
loop-invariant operand from L1/L2 every iteration (``RELOAD``) where holding it would spill.

FLOPs (multiply-add = 2): the op counts what PyTorch's autograd of the reference counts, forward
``4 B heads N M d``, backward ``8 B heads N M d`` (dP, dV, dK, dQ). The kernels execute 10 (one-block:
S is recomputed) or 14 (three kernels: the dQ kernel recomputes S and dP) per ``B heads N M d``, plus the
padding of partial blocks. What every launch reads and writes is :func:`forward_cost` and
:func:`backward_cost` (checked against the bytes the interpreter moves, ``tests/test_traffic.py``).
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pvt_fast.kernels._aot import AotSpec
from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost, reuse_set
from pvt_fast.kernels._common import TRITON_TYPES, dot_inputs, input_precision, num_sms, unit_last_stride

LOG2E = math.log2(math.e)


@triton.jit
def _key_block_scores(q, k_base, v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                      BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Loads K and V rows [key_start, key_start + BLOCK_M) (zero past M when MASK_KEYS, and past the head dim)
    and returns them with their keys' indices and the log2-scaled scores ``q k^T * scale * log2(e)``."""
    keys = key_start + tl.arange(0, BLOCK_M)
    offs = keys.to(tl.int64)[:, None] * stride_kvm + cols[None, :]
    kv_mask = col_ok[None, :]
    if MASK_KEYS:
        kv_mask = kv_mask & (keys < M)[:, None]
    k = tl.load(k_base + offs, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs, mask=kv_mask, other=0.0)
    return keys, k, v, tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                   BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One online-softmax step over keys [key_start, key_start + BLOCK_M); masks keys >= M if MASK_KEYS."""
    keys, k, v, s = _key_block_scores(q, k_base, v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                                      BLOCK_M, MASK_KEYS, INPUT_PRECISION)
    if MASK_KEYS:
        s = tl.where((keys < M)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _sra_attention_fwd_kernel(
    q_ptr, kv_ptr, o_ptr, lse_ptr, qk_scale_log2, N, M, heads,
    stride_qb, stride_qn, stride_kvb, stride_kvm, stride_ob, stride_on,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """o = softmax(scale q k^T) v and lse for queries [pid0 * BLOCK_N, +BLOCK_N) of (b, h) = divmod(pid1, heads).

    q_ptr: (B, N, heads*HEAD_DIM), strides (stride_qb, stride_qn, 1); kv_ptr: (B, M, 2*heads*HEAD_DIM),
    strides (stride_kvb, stride_kvm, 1); o_ptr like q (strides stride_ob, stride_on); lse_ptr: (B, heads, N)
    fp32 contiguous, natural-log logsumexp of the scaled scores. qk_scale_log2 = scale * log2(e).
    Masked: query rows >= N (loaded as 0, not stored), keys >= M (score -inf, only in the last key
    block), head-dim columns >= HEAD_DIM up to the power-of-two BLOCK_D (loaded as 0, not stored).
    FLOPs 4 * BLOCK_N * M * HEAD_DIM per program. Bytes: q and o once (2 N C elements per batch), K/V of
    the head once per program (2 M d elements, from L2 after the first program), lse 4 N bytes per head.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < HEAD_DIM
    q_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * HEAD_DIM + rows[:, None] * stride_qn + cols[None, :], mask=q_mask,
                other=0.0)
    k_base = kv_ptr + b * stride_kvb + h * HEAD_DIM
    v_base = k_base + heads * HEAD_DIM

    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    full_end = (M // BLOCK_M) * BLOCK_M
    for key_start in range(0, full_end, BLOCK_M):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, key_start, M, stride_kvm, cols, col_ok,
                                       qk_scale_log2, BLOCK_M, False, INPUT_PRECISION)
    if full_end < M:
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, full_end, M, stride_kvm, cols, col_ok,
                                       qk_scale_log2, BLOCK_M, True, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + cols[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit
def _sra_attention_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, N, heads, stride_ob, stride_on, stride_dob, stride_don,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """delta[b, h, n] = sum_j dO[b, n, h*d + j] * O[b, n, h*d + j] in fp32, for BLOCK_N rows of one (b, h).

    o_ptr, do_ptr: (B, N, heads*HEAD_DIM) with the given strides (last 1); delta_ptr: (B, heads, N) fp32
    contiguous. Masked: rows >= N, columns >= HEAD_DIM. FLOPs 2 N C; bytes 2 N C elements read, 4 N heads written.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + cols[None, :], mask=mask,
                other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * HEAD_DIM + rows[:, None] * stride_don + cols[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=row_ok)


@triton.jit
def _sra_attention_split_sum_kernel(partial_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    """out[i] = partial[0, i] + partial[1, i] + ... + partial[splits - 1, i], added in that order in fp32 and
    rounded once to out's dtype, for BLOCK elements i. partial_ptr: (splits, numel) fp32 contiguous; out_ptr:
    numel elements, contiguous. Bytes: 4 splits numel read, numel elements written."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    ptrs = partial_ptr + offs
    total = tl.zeros((BLOCK,), tl.float32)
    for _ in range(splits):
        total += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += numel  # pointer arithmetic: no 32-bit product of split and numel
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, k_block, v_block, key_rows, key_ok, stride_kvm, q_base, do_base, lse_base,
                      delta_base, row_start, N, stride_qn, stride_don, cols, col_ok, qk_scale_log2,
                      BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, RELOAD: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    """Adds the contribution of queries [row_start, row_start + BLOCK_N) to dK (unscaled) and dV.

    Works on transposed scores (keys x queries) so both updates are plain dots. Masked rows load
    q = dO = 0 and lse = +inf, which makes their P column exactly 0. Padded keys (k = v = 0) score 0,
    and exp(0 - lse) may overflow in their rows; rows never mix in these dots and padded rows are never
    stored. With RELOAD the K/V block is read again (from L1/L2) instead of being held in registers.
    """
    if RELOAD:
        kv_offs = key_rows[:, None] * stride_kvm + cols[None, :]
        kv_mask = key_ok[:, None] & col_ok[None, :]
        k = tl.load(k_block + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_block + kv_offs, mask=kv_mask, other=0.0)
    rows = row_start + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = col_ok[None, :]
    if MASK_ROWS:
        row_ok = rows < N
        mask = mask & row_ok[:, None]
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    q = tl.load(q_base + rows[:, None] * stride_qn + cols[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_don + cols[None, :], mask=mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale_log2
    p_t = tl.exp2(s_t - (lse * 1.4426950408889634)[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _sra_attention_bwd_dkdv_kernel(
    q_ptr, kv_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr, scale, qk_scale_log2, N, M, heads, rows_per_split,
    stride_qb, stride_qn, stride_kvb, stride_kvm, stride_dob, stride_don, stride_dkvs, stride_dkvb, stride_dkvm,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    RELOAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dK = scale * dS^T Q and dV = P^T dO for keys [pid0 * BLOCK_M, +BLOCK_M) of (b, h) = divmod(pid1, heads),
    summed over the queries [pid2 * rows_per_split, +rows_per_split) (rows_per_split a multiple of BLOCK_N).

    P = exp(scale Q K^T - lse), dP = dO V^T, dS = P * (dP - delta). q_ptr, do_ptr: (B, N, heads*HEAD_DIM)
    (last stride 1); kv_ptr: (B, M, 2*heads*HEAD_DIM); lse_ptr, delta_ptr: (B, heads, N) fp32 contiguous;
    dkv_ptr: (splits, B, M, 2*heads*HEAD_DIM) with strides (stride_dkvs, stride_dkvb, stride_dkvm, 1) -- the
    kv gradient itself when there is one split (stride_dkvs unused), an fp32 partial-sum buffer otherwise;
    dK goes to the K columns of head h, dV to its V columns. Masked: keys >= M (loaded as 0, not stored),
    query rows >= N (only in the last query block of the range), columns >= HEAD_DIM.
    RELOAD re-reads K/V every query block (large head dims and fp32, where holding them spills registers).
    FLOPs 8 * BLOCK_M * rows * HEAD_DIM per program. Bytes: K/V block once (per query block with RELOAD),
    q and dO of the range once per key block (from L2 when M is small), lse and delta 8 bytes per row,
    dK/dV block written once.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2).to(tl.int64)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    first_key = pid_m.to(tl.int64) * BLOCK_M
    key_rows = tl.arange(0, BLOCK_M)
    key_ok = first_key + key_rows < M
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    k_block = kv_ptr + b * stride_kvb + h * HEAD_DIM + first_key * stride_kvm
    v_block = k_block + heads * HEAD_DIM
    kv_offs = key_rows[:, None] * stride_kvm + cols[None, :]
    kv_mask = key_ok[:, None] & col_ok[None, :]
    if RELOAD:  # _dkdv_query_block reads the block itself; these placeholders are never read
        k = tl.zeros((BLOCK_M, BLOCK_D), kv_ptr.dtype.element_ty)
        v = k
    else:
        k = tl.load(k_block + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_block + kv_offs, mask=kv_mask, other=0.0)

    q_base = q_ptr + b * stride_qb + h * HEAD_DIM
    do_base = do_ptr + b * stride_dob + h * HEAD_DIM
    lse_base = lse_ptr + pid_bh.to(tl.int64) * N
    delta_base = delta_ptr + pid_bh.to(tl.int64) * N
    dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row_begin = pid_split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)
    full_end = row_begin + (row_end - row_begin) // BLOCK_N * BLOCK_N
    for row_start in range(row_begin, full_end, BLOCK_N):
        dk, dv = _dkdv_query_block(dk, dv, k, v, k_block, v_block, key_rows, key_ok, stride_kvm, q_base, do_base,
                                   lse_base, delta_base, row_start, N, stride_qn, stride_don, cols, col_ok,
                                   qk_scale_log2, BLOCK_N, False, RELOAD, INPUT_PRECISION)
    if full_end < row_end:
        dk, dv = _dkdv_query_block(dk, dv, k, v, k_block, v_block, key_rows, key_ok, stride_kvm, q_base, do_base,
                                   lse_base, delta_base, full_end, N, stride_qn, stride_don, cols, col_ok,
                                   qk_scale_log2, BLOCK_N, True, RELOAD, INPUT_PRECISION)

    dk_block = dkv_ptr + pid_split * stride_dkvs + b * stride_dkvb + h * HEAD_DIM + first_key * stride_dkvm
    dkv_offs = key_rows[:, None] * stride_dkvm + cols[None, :]
    out_ty = dkv_ptr.dtype.element_ty
    tl.store(dk_block + dkv_offs, (dk * scale).to(out_ty), mask=kv_mask)
    tl.store(dk_block + heads * HEAD_DIM + dkv_offs, dv.to(out_ty), mask=kv_mask)


@triton.jit
def _dq_key_block(dq, ds_sum, q, do, q_block, do_block, row_idx, row_ok, stride_qn, stride_don, lse2, delta, k_base,
                  v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                  BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr, RELOAD: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Adds dS K (unscaled) over keys [key_start, key_start + BLOCK_M) to dq and the rows' sums of dS (as
    the dot saw it) to ds_sum; masks keys >= M if MASK_KEYS. With RELOAD the q and dO rows are read again
    (from L1/L2) instead of being held in registers."""
    if RELOAD:
        row_mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_block + row_idx[:, None] * stride_qn + cols[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_block + row_idx[:, None] * stride_don + cols[None, :], mask=row_mask, other=0.0)
    keys, k, v, s = _key_block_scores(q, k_base, v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                                      BLOCK_M, MASK_KEYS, INPUT_PRECISION)
    p = tl.exp2(s - lse2[:, None])
    if MASK_KEYS:
        # A padded key scores 0, whose exp can overflow when every real score is very negative.
        p = tl.where((keys < M)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds, k, input_precision=INPUT_PRECISION)
    return dq, ds_sum + tl.sum(ds.to(tl.float32), 1)


@triton.jit
def _key_offset(k_base, M, cols, col_ok):
    """The head's first key (zero without keys), in fp32: the offset taken out of dQ (see
    :func:`_sra_attention_bwd_dq_kernel`)."""
    return tl.load(k_base + cols, mask=col_ok & (M > 0), other=0.0).to(tl.float32)


@triton.jit
def _sra_attention_bwd_dq_kernel(
    q_ptr, kv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, scale, qk_scale_log2, N, M, heads,
    stride_qb, stride_qn, stride_kvb, stride_kvm, stride_dob, stride_don, stride_dqb, stride_dqn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    RELOAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for queries [pid0 * BLOCK_N, +BLOCK_N) of (b, h) = divmod(pid1, heads), over all keys.

    dS = P * (dO V^T - delta) with P = exp(scale Q K^T - lse). q_ptr, do_ptr, dq_ptr: (B, N, heads*HEAD_DIM)
    with the given strides (last 1); kv_ptr: (B, M, 2*heads*HEAD_DIM); lse_ptr, delta_ptr: (B, heads, N) fp32.
    Masked: rows >= N (lse = +inf gives P = 0; not stored), keys >= M (P forced to 0, only in the last key
    block), columns >= HEAD_DIM.

    dS sums to zero over the keys in exact arithmetic, so a shift k0 shared by all keys (a key bias) adds
    nothing to dQ; in floating point delta and the recomputed P are not exactly consistent (delta comes from
    the rounded O), and ``rowsum(dS) * k0`` would add an error that grows with |k0|. The kernel takes it out:
    dQ = dS K - rowsum(dS) k0, k0 the head's first key, rowsum over dS as rounded for the dot (16-bit inputs;
    a tf32 dot rounds inside): the same function in exact arithmetic, whose error follows the keys' spread, as
    autograd's does. (The one-block kernel keeps flash attention's delta without this term.)

    RELOAD re-reads the q and dO rows every key block (large head dims and fp32).
    FLOPs 6 * BLOCK_N * M * HEAD_DIM per program. Bytes: q, dO (per key block with RELOAD) and dQ rows once,
    K/V of the head once per program (from L2), lse and delta 8 bytes per row.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    first_row = pid_n.to(tl.int64) * BLOCK_N
    row_idx = tl.arange(0, BLOCK_N)
    rows = first_row + row_idx
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < HEAD_DIM
    mask = row_ok[:, None] & col_ok[None, :]
    q_block = q_ptr + b * stride_qb + h * HEAD_DIM + first_row * stride_qn
    do_block = do_ptr + b * stride_dob + h * HEAD_DIM + first_row * stride_don
    if RELOAD:  # _dq_key_block reads the rows itself; these placeholders are never read
        q = tl.zeros((BLOCK_N, BLOCK_D), q_ptr.dtype.element_ty)
        do = q
    else:
        q = tl.load(q_block + row_idx[:, None] * stride_qn + cols[None, :], mask=mask, other=0.0)
        do = tl.load(do_block + row_idx[:, None] * stride_don + cols[None, :], mask=mask, other=0.0)
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    k_base = kv_ptr + b * stride_kvb + h * HEAD_DIM
    v_base = k_base + heads * HEAD_DIM

    dq = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    ds_sum = tl.zeros((BLOCK_N,), tl.float32)
    full_end = (M // BLOCK_M) * BLOCK_M
    for key_start in range(0, full_end, BLOCK_M):
        dq, ds_sum = _dq_key_block(dq, ds_sum, q, do, q_block, do_block, row_idx, row_ok, stride_qn, stride_don,
                                   lse2, delta, k_base, v_base, key_start, M, stride_kvm, cols, col_ok, qk_scale_log2,
                                   BLOCK_M, False, RELOAD, INPUT_PRECISION)
    if full_end < M:
        dq, ds_sum = _dq_key_block(dq, ds_sum, q, do, q_block, do_block, row_idx, row_ok, stride_qn, stride_don,
                                   lse2, delta, k_base, v_base, full_end, M, stride_kvm, cols, col_ok, qk_scale_log2,
                                   BLOCK_M, True, RELOAD, INPUT_PRECISION)
    dq -= ds_sum[:, None] * _key_offset(k_base, M, cols, col_ok)[None, :]
    dq_ptrs = dq_ptr + b * stride_dqb + h * HEAD_DIM + rows[:, None] * stride_dqn + cols[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sra_attention_bwd_one_block_kernel(
    q_ptr, kv_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dkv_ptr, scale, qk_scale_log2, N, M, heads, rows_per_split,
    stride_qb, stride_qn, stride_kvb, stride_kvm, stride_ob, stride_on, stride_dob, stride_don,
    stride_dqb, stride_dqn, stride_dkvs, stride_dkvb, stride_dkvm,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    RELOAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The whole backward when every key fits one block (M <= BLOCK_M; PVT at 224 has M = 49): dQ of queries
    [pid1 * rows_per_split, +rows_per_split) of (b, h) = divmod(pid0, heads), and their contribution to dK, dV.

    Per query block: delta = rowsum(dO * O), S = scale Q K^T, P = exp(S - lse), dV += P^T dO, dP = dO V^T,
    dS = P * (dP - delta), dQ = scale dS K (complete: all keys are here), dK += scale dS^T Q. Five dots per
    block, no recomputation, and q, dO, O are read once. q_ptr, o_ptr, do_ptr, dq_ptr: (B, N, heads*HEAD_DIM)
    with the given strides (last 1); kv_ptr: (B, M, 2*heads*HEAD_DIM); lse_ptr: (B, heads, N) fp32;
    dkv_ptr: (splits, B, M, 2*heads*HEAD_DIM), the kv gradient itself with one split, else fp32 partial sums.
    Masked: query rows outside the range (q = dO = O = 0 and lse = +inf, so their P row is 0; not stored),
    keys >= M (P forced to 0: a padded key scores 0, whose exp can overflow), columns >= HEAD_DIM.
    RELOAD reads K and V again for every query block (from L1/L2) instead of holding them in registers.
    """
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1).to(tl.int64)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    keys = tl.arange(0, BLOCK_M)
    key_ok = keys < M
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    kv_mask = key_ok[:, None] & col_ok[None, :]
    k_base = kv_ptr + b * stride_kvb + h * HEAD_DIM
    kv_offs = keys.to(tl.int64)[:, None] * stride_kvm + cols[None, :]
    if not RELOAD:
        k = tl.load(k_base + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(k_base + heads * HEAD_DIM + kv_offs, mask=kv_mask, other=0.0)

    q_base = q_ptr + b * stride_qb + h * HEAD_DIM
    o_base = o_ptr + b * stride_ob + h * HEAD_DIM
    do_base = do_ptr + b * stride_dob + h * HEAD_DIM
    dq_base = dq_ptr + b * stride_dqb + h * HEAD_DIM
    lse_base = lse_ptr + pid_bh.to(tl.int64) * N
    dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row_begin = pid_split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)
    for row_start in range(row_begin, row_end, BLOCK_N):
        if RELOAD:
            k = tl.load(k_base + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(k_base + heads * HEAD_DIM + kv_offs, mask=kv_mask, other=0.0)
        rows = row_start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + cols[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + cols[None, :], mask=mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * stride_on + cols[None, :], mask=mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2
        p = tl.where(key_ok[None, :], tl.exp2(s - (lse * 1.4426950408889634)[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION) * scale
        tl.store(dq_base + rows[:, None] * stride_dqn + cols[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)

    dk_base = dkv_ptr + pid_split * stride_dkvs + b * stride_dkvb + h * HEAD_DIM
    dkv_offs = keys.to(tl.int64)[:, None] * stride_dkvm + cols[None, :]
    out_ty = dkv_ptr.dtype.element_ty
    tl.store(dk_base + dkv_offs, (dk * scale).to(out_ty), mask=kv_mask)
    tl.store(dk_base + heads * HEAD_DIM + dkv_offs, dv.to(out_ty), mask=kv_mask)


# Launch configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_n: int  # queries per block
    block_m: int  # keys per block
    num_warps: int
    reload: bool = False  # backward only: re-read the loop-invariant tiles instead of holding them
    num_stages: int = 2


# Every entry compiles without register spills for sm_80 and sm_90 with triton 3.6 and 3.8
# (python -m pvt_fast.kernels.report).
# On sm_80 the dots chained through the softmax put all warps along the rows of a block, 16 rows each;
# "ieee" fp32 dots run on the FMA units, whose operand layout needs 16 x 16 tiles per 4 warps: the 64-wide
# head block's forward takes 32 queries in 8 warps (206-210 registers, as 16 queries in 4 warps: the same
# work per warp and warps per SM, half the K/V reads), 16 in 4 warps where that gives idle SMs programs.
# fp32 with a 128-wide head block takes the ieee kernels even when tf32 is allowed: no tf32 tiling of it
# stays in registers.
_CONFIGS = {
    # (kernel, dot inputs, BLOCK_D): _Config(BLOCK_N, BLOCK_M, num_warps[, reload])
    ("fwd", "16-bit", 32): _Config(128, 64, 8),
    ("fwd", "16-bit", 64): _Config(128, 64, 8),
    ("fwd", "16-bit", 128): _Config(128, 64, 8),
    ("fwd", "tf32", 32): _Config(64, 64, 4),
    ("fwd", "tf32", 64): _Config(64, 64, 8),
    ("fwd", "ieee", 32): _Config(32, 16, 4),
    ("fwd", "ieee", 64): _Config(32, 16, 8),
    ("fwd", "ieee", 128): _Config(16, 16, 8),
    ("dkdv", "16-bit", 32): _Config(64, 64, 4),
    ("dkdv", "16-bit", 64): _Config(32, 64, 4),
    ("dkdv", "16-bit", 128): _Config(16, 64, 8, reload=True),
    ("dkdv", "tf32", 32): _Config(32, 64, 4),
    ("dkdv", "tf32", 64): _Config(32, 32, 2, reload=True),
    ("dkdv", "ieee", 32): _Config(16, 16, 4),
    ("dkdv", "ieee", 64): _Config(16, 16, 8),
    ("dkdv", "ieee", 128): _Config(16, 16, 4, reload=True),
    ("dq", "16-bit", 32): _Config(128, 32, 8),
    ("dq", "16-bit", 64): _Config(128, 64, 8),
    ("dq", "16-bit", 128): _Config(128, 32, 8, reload=True),
    ("dq", "tf32", 32): _Config(64, 32, 4),
    ("dq", "tf32", 64): _Config(64, 32, 4, reload=True),
    ("dq", "ieee", 32): _Config(16, 16, 4),
    ("dq", "ieee", 64): _Config(16, 16, 8),
    ("dq", "ieee", 128): _Config(16, 16, 4, reload=True),
    # Variants the plans pick by shape (16-bit dots): 256-query blocks where many key blocks make the K/V reads
    # of every query block add up ("wide"), 64-query blocks where 128 would leave SMs idle ("narrow"),
    # 128-key blocks for dK/dV over many keys (q and dO are read once per key block).
    ("fwd_wide", "16-bit", 32): _Config(256, 64, 8),
    ("fwd_wide", "16-bit", 64): _Config(256, 32, 8),
    ("fwd_narrow", "16-bit", 32): _Config(64, 64, 4),
    ("fwd_narrow", "16-bit", 64): _Config(64, 64, 4),
    ("fwd_narrow", "ieee", 64): _Config(16, 16, 4),
    ("dq_narrow", "16-bit", 32): _Config(64, 32, 4),
    ("dq_narrow", "16-bit", 64): _Config(64, 64, 4),
    ("dkdv_wide", "16-bit", 32): _Config(32, 128, 8),
    ("dkdv_wide", "16-bit", 64): _Config(32, 128, 8),
    # one-block backward (M <= 64): no ieee entry, its 16 x 16 FMA tiles hold 16 keys
    # (one pipeline stage: sm_80's mma.sync operands of five dots fill the registers)
    ("one", "16-bit", 32): _Config(32, 64, 4, num_stages=1),
    ("one", "16-bit", 64): _Config(32, 64, 4, num_stages=1),
    ("one", "16-bit", 128): _Config(16, 64, 8, num_stages=1),
    ("one", "tf32", 32): _Config(32, 64, 4, num_stages=1),
    # head dims below their block (48 in 64): the masked columns' extra registers spill at 32 queries
    ("one_masked", "16-bit", 32): _Config(16, 64, 4, num_stages=1),
    ("one_masked", "16-bit", 64): _Config(16, 64, 4, num_stages=1),
    ("one_masked", "16-bit", 128): _Config(16, 64, 8, num_stages=1),
    ("one_masked", "tf32", 32): _Config(16, 64, 4, num_stages=1),
}
_ONE_BLOCK_M = 64  # keys the one-block backward holds; past it the wide variants pay off
_SMALL_M = 16  # at most this many keys: 16-key blocks rather than blocks that are mostly padding
_DELTA_BLOCK_N = 64
_SUM_BLOCK = 1024  # elements per program of the split sum (8 per thread)
_SUM_WARPS, _SUM_STAGES = 4, 2


def _block_d(head_dim):
    """The head-dim block: a power of two >= 32 (d <= 32 shares the 32-wide kernels), masked beyond d."""
    return max(32, triton.next_power_of_2(head_dim))


def _dot_inputs(dtype, block_d):
    """:func:`~pvt_fast.kernels._common.dot_inputs`, except that a 128-wide head block has no tf32 tiling
    that stays in registers: it multiplies as ieee fp32."""
    dot = dot_inputs(dtype)
    return "ieee" if dot == "tf32" and block_d > 64 else dot


def _config(kernel, dot_inputs, block_d, M):
    cfg = _CONFIGS[(kernel, dot_inputs, block_d)]
    if M <= _SMALL_M and cfg.block_m > _SMALL_M:
        cfg = replace(cfg, block_m=_SMALL_M)
    return cfg


def _grid_bh(B, num_heads):
    if B * num_heads > 65535:
        raise ValueError(f"batch * num_heads must be <= 65535 (a grid dimension), got {B} * {num_heads}")
    return B * num_heads


@dataclass(frozen=True)
class Problem:
    """The sizes a launch is planned for: batch, queries, keys, channels, heads and the inputs' dtype."""

    B: int
    N: int
    M: int
    C: int
    heads: int
    dtype: torch.dtype

    @property
    def head_dim(self):
        return self.C // self.heads

    @property
    def block_d(self):
        return _block_d(self.head_dim)

    @property
    def dot(self):
        return _dot_inputs(self.dtype, self.block_d)

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def q_bytes(self):
        """Bytes of q (and of o, dO, dq): (B, N, C)."""
        return self.B * self.N * self.C * self.elem

    @property
    def kv_bytes(self):
        """Bytes of kv (and of dkv): (B, M, 2C)."""
        return self.B * self.M * 2 * self.C * self.elem

    @property
    def rows_f32(self):
        """Bytes of lse (and of delta): (B, heads, N) fp32."""
        return 4 * self.B * self.heads * self.N

    @property
    def head_kv(self):
        """Bytes of K and V of one (b, h): what a program walking all keys of its head reads."""
        return 2 * self.M * self.head_dim * self.elem


@dataclass(frozen=True)
class BackwardPlan:
    """The backward's kernels and grids (see :func:`backward_plan`): either ``one`` (the one-block kernel) or
    the delta, dK/dV (``dkdv``) and dQ (``dq``) kernels. ``rows_per_split`` and ``num_splits`` split the
    queries of the kernel that sums dK/dV over them."""

    rows_per_split: int
    num_splits: int
    one: _Config = None
    one_grid: tuple = None
    dkdv: _Config = None
    dkdv_grid: tuple = None
    dq: _Config = None
    dq_grid: tuple = None
    delta_grid: tuple = None


def _query_blocked(kernels, p, num_sms, launch_of):
    """(config, grid) of a kernel whose programs own query blocks: of ``kernels``' configs for these dot inputs,
    the one whose launch (``launch_of(p, config, grid)``) the traffic model predicts fastest on ``num_sms``
    SMs, the first (the widest) on ties; a wide variant only past 64 keys. Wider blocks read each head's K
    and V fewer times, narrower ones give idle SMs programs: e.g. 256-query blocks for pvt_v2_b2 stage 2 at
    1024 px batch 1 (128 programs for 132 SMs, half the K/V reads of 128-query blocks)."""
    from pvt_fast.kernels.traffic import launch_seconds

    bh = _grid_bh(p.B, p.heads)
    best = None
    for kernel in kernels:
        if (kernel, p.dot, p.block_d) not in _CONFIGS:
            continue
        if kernel.endswith("_wide") and p.M <= _ONE_BLOCK_M:
            continue
        cfg = _config(kernel, p.dot, p.block_d, p.M)
        choice = cfg, (triton.cdiv(p.N, cfg.block_n), bh)
        seconds = launch_seconds(launch_of(p, *choice), num_sms)
        if best is None or seconds < best[0]:
            best = seconds, choice
    return best[1]


@functools.lru_cache(maxsize=4096)
def forward_plan(p, num_sms):
    """(config, grid) of the forward for problem ``p`` on a GPU with ``num_sms`` SMs (see :func:`_query_blocked`);
    cached per (problem, SMs): a model calls it with a few shapes, every step."""
    return _query_blocked(("fwd_wide", "fwd", "fwd_narrow"), p, num_sms, _forward_launch)


def _split_rows(N, block_n, want):
    """(rows per split, splits): ``want`` ranges of whole query blocks, at most one per block."""
    n_blocks = triton.cdiv(N, block_n)
    rows = triton.cdiv(n_blocks, max(1, min(want, n_blocks))) * block_n
    return rows, triton.cdiv(N, rows)


@functools.lru_cache(maxsize=4096)
def backward_plan(p, num_sms, num_splits=None, grad_lse=False):
    """The backward's plan for problem ``p``.

    When every key fits one block (``M <= 64``) and the dots run on tensor cores, one kernel does everything:
    each program walks a range of queries of one (b, h), ``num_splits`` ranges per (b, h) (None: enough to
    fill ``num_sms`` SMs once). Otherwise (or with a gradient into lse) three kernels: delta, dK/dV split
    into ``num_splits`` query ranges (None: the count of :data:`_DKDV_SPLITS` whose dK/dV launch and split
    sum the traffic model predicts fastest on ``num_sms`` SMs), and dQ. Partial sums of split ranges are
    fp32, added afterwards in a fixed order.
    """
    bh = _grid_bh(p.B, p.heads)
    one = "one" if p.head_dim == p.block_d else "one_masked"
    if (one, p.dot, p.block_d) in _CONFIGS and p.M <= _ONE_BLOCK_M and not grad_lse:
        cfg = _config(one, p.dot, p.block_d, p.M)
        want = num_splits if num_splits is not None else triton.cdiv(num_sms, bh)
        rows, splits = _split_rows(p.N, cfg.block_n, want)
        return BackwardPlan(rows, splits, one=cfg, one_grid=(bh, splits))
    wide = ("dkdv_wide", p.dot, p.block_d) in _CONFIGS and p.M > _ONE_BLOCK_M
    cfg = _config("dkdv_wide" if wide else "dkdv", p.dot, p.block_d, p.M)
    n_blocks = triton.cdiv(p.N, cfg.block_n)
    m_blocks = triton.cdiv(p.M, cfg.block_m)
    if num_splits is None:
        num_splits = _dkdv_splits(p, cfg, m_blocks, num_sms)
    rows, splits = _split_rows(p.N, cfg.block_n, num_splits)
    dq_cfg, dq_grid = _query_blocked(("dq", "dq_narrow"), p, num_sms, _dq_launch)
    return BackwardPlan(rows, splits, dkdv=cfg, dkdv_grid=(m_blocks, bh, splits), dq=dq_cfg, dq_grid=dq_grid,
                        delta_grid=(triton.cdiv(p.N, _DELTA_BLOCK_N), bh))


_DKDV_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_SPLIT_MARGIN = 0.05


def _dkdv_splits(p, cfg, m_blocks, num_sms):
    """The fewest splits (at most one per query block) whose dK/dV launch and split sum are predicted within
    ``_SPLIT_MARGIN`` of the fastest: more splits give idle SMs programs, each split writes fp32 partial sums
    that are added afterwards. The margin: a split's bytes are certain, the time idle SMs cost is the model's
    estimate (it stretches an under-filled launch as if each SM could only draw its share of L2 bandwidth)."""
    from pvt_fast.kernels.traffic import launch_seconds

    n_blocks = triton.cdiv(p.N, cfg.block_n)
    options = []
    for want in _DKDV_SPLITS:
        if want > n_blocks:
            break
        rows, splits = _split_rows(p.N, cfg.block_n, want)
        options.append((sum(launch_seconds(launch, num_sms)
                            for launch in _dkdv_launches(p, cfg, m_blocks, rows, splits)), splits))
    fastest = min(seconds for seconds, _ in options)
    return min(splits for seconds, splits in options if seconds <= fastest * (1 + _SPLIT_MARGIN))


def _problem(q, kv, num_heads):
    B, N, C = q.shape
    return Problem(B, N, kv.shape[1], C, num_heads, q.dtype)


# Launchers ------------------------------------------------------------------------------------------


def sra_attention_fwd(q, kv, num_heads, scale, out=None, lse=None):
    """Launch the forward. q (B, N, C), kv (B, M, 2C) with M >= 1, same dtype and device, last-dim stride 1.

    Returns (o, lse): o (B, N, C) in q's dtype, lse (B, num_heads, N) fp32. ``out`` / ``lse`` may be given
    (contiguous, right shape and dtype) to be written instead of fresh tensors.
    """
    q, kv = unit_last_stride(q), unit_last_stride(kv)
    p = _problem(q, kv, num_heads)
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty((p.B, num_heads, p.N), dtype=torch.float32, device=q.device) if lse is None else lse
    if o.numel() == 0:
        return o, lse
    cfg, grid = forward_plan(p, num_sms(q.device))
    _sra_attention_fwd_kernel[grid](
        q, kv, o, lse, scale * LOG2E, p.N, p.M, num_heads,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), o.stride(0), o.stride(1),
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
        INPUT_PRECISION=input_precision(p.dot), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def _split_sum_into(dkv, partial):
    """dkv = the splits of ``partial`` (splits, *dkv.shape) fp32 added in split order, rounded once."""
    numel = dkv.numel()
    _sra_attention_split_sum_kernel[(triton.cdiv(numel, _SUM_BLOCK),)](
        partial, dkv, numel, partial.shape[0], BLOCK=_SUM_BLOCK, num_warps=_SUM_WARPS, num_stages=_SUM_STAGES)


def sra_attention_bwd(grad_o, q, kv, o, lse, num_heads, scale, grad_lse=None, num_splits=None, dq=None, dkv=None):
    """Launch the backward. Returns (dq, dkv) shaped like q and kv, in their dtype (written into ``dq`` /
    ``dkv`` when given: contiguous, right shape and dtype).

    grad_o, o: (B, N, C); lse: (B, num_heads, N) fp32 from the forward. ``grad_lse`` (same shape as lse, or
    None) is the gradient flowing into lse: d lse / d S = P, so it enters as ``delta - grad_lse``.
    ``num_splits`` overrides how many query ranges the dK/dV kernel splits N into (None: chosen from the
    device's SM count, see :func:`backward_plan`).
    """
    grad_o, q, kv, o = (unit_last_stride(t) for t in (grad_o, q, kv, o))
    p = _problem(q, kv, num_heads)
    lse = lse.contiguous()
    if dq is None:
        dq = torch.empty((p.B, p.N, p.C), dtype=q.dtype, device=q.device)
    if dkv is None:
        dkv = torch.empty((p.B, p.M, 2 * p.C), dtype=kv.dtype, device=kv.device)
    if dq.numel() == 0:  # no queries (or batch): nothing flows back to the keys
        return dq, dkv.zero_()
    plan = backward_plan(p, num_sms(q.device), num_splits, grad_lse is not None)
    meta = {"HEAD_DIM": p.head_dim, "BLOCK_D": p.block_d, "INPUT_PRECISION": input_precision(p.dot)}
    partial = dkv if plan.num_splits == 1 else torch.empty((plan.num_splits, p.B, p.M, 2 * p.C),
                                                           dtype=torch.float32, device=kv.device)
    partial_strides = (0 if plan.num_splits == 1 else partial.stride(0), partial.stride(-3), partial.stride(-2))
    if plan.one is not None:
        cfg = plan.one
        _sra_attention_bwd_one_block_kernel[plan.one_grid](
            q, kv, o, grad_o, lse, dq, partial, scale, scale * LOG2E, p.N, p.M, num_heads, plan.rows_per_split,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), o.stride(0), o.stride(1), grad_o.stride(0),
            grad_o.stride(1), dq.stride(0), dq.stride(1), *partial_strides,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, RELOAD=cfg.reload, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **meta,
        )
        if plan.num_splits > 1:
            _split_sum_into(dkv, partial)
        return dq, dkv

    delta = torch.empty((p.B, num_heads, p.N), dtype=torch.float32, device=q.device)
    _sra_attention_bwd_delta_kernel[plan.delta_grid](
        o, grad_o, delta, p.N, num_heads, o.stride(0), o.stride(1), grad_o.stride(0), grad_o.stride(1),
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_N=_DELTA_BLOCK_N,
    )
    if grad_lse is not None:
        delta -= grad_lse

    cfg = plan.dkdv
    _sra_attention_bwd_dkdv_kernel[plan.dkdv_grid](
        q, kv, grad_o, lse, delta, partial, scale, scale * LOG2E, p.N, p.M, num_heads, plan.rows_per_split,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), grad_o.stride(0), grad_o.stride(1), *partial_strides,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, RELOAD=cfg.reload, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **meta,
    )
    if plan.num_splits > 1:
        _split_sum_into(dkv, partial)

    cfg = plan.dq
    # With a gradient into lse, rowsum(dS) = grad_lse, not 0: the kernel's dS (K - k0) goes to an fp32 buffer
    # and grad_lse k0 is added there, so a 16-bit dQ is rounded once.
    dq_out = dq if grad_lse is None else torch.empty(dq.shape, dtype=torch.float32, device=dq.device)
    _sra_attention_bwd_dq_kernel[plan.dq_grid](
        q, kv, grad_o, lse, delta, dq_out, scale, scale * LOG2E, p.N, p.M, num_heads,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), grad_o.stride(0), grad_o.stride(1),
        dq_out.stride(0), dq_out.stride(1),
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, RELOAD=cfg.reload, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **meta,
    )
    if grad_lse is not None:  # dQ = scale (dS (K - k0) + grad_lse k0): the kernel wrote the first term
        k0 = kv[:, :1, :p.C].float().view(p.B, 1, num_heads, p.head_dim)
        lse_term = scale * grad_lse.float().transpose(1, 2)[..., None] * k0
        dq.copy_((dq_out.view(p.B, p.N, num_heads, p.head_dim) + lse_term).view(dq.shape))
    return dq, dkv


# Traffic ------------------------------------------------------------------------------------------


def _peak(dot):
    return "fp32" if dot == "ieee" else dot


def _forward_launch(p, cfg, grid):
    programs = grid[0] * grid[1]
    return Launch("sra_attention_fwd", programs, (
        Access("q", p.q_bytes, loaded=p.q_bytes),
        Access("kv", p.kv_bytes, loaded=programs * p.head_kv, reuse_set=reuse_set(p.head_kv, grid[0])),
        Access("o", p.q_bytes, stored=p.q_bytes),
        Access("lse", p.rows_f32, stored=p.rows_f32),
    ), flops=programs * triton.cdiv(p.M, cfg.block_m) * 4 * cfg.block_n * cfg.block_m * p.block_d,
        peak=_peak(p.dot))


def forward_cost(p, num_sms=SMS):
    """The forward's launches as :mod:`pvt_fast.kernels.traffic` counts them (see the module docstring)."""
    launch = _forward_launch(p, *forward_plan(p, num_sms))
    return OpCost((launch,), 2 * p.q_bytes + p.kv_bytes + p.rows_f32, 4 * p.B * p.N * p.M * p.C)


def _split_ranges(p, cfg, rows_per_split, splits):
    """(query blocks over all ranges, the dK/dV output access) of a kernel summing dK/dV over ``splits`` query
    ranges: dkv itself when unsplit, else fp32 partial sums, one (B, M, 2C) per range."""
    split_rows = [min(rows_per_split, p.N - s * rows_per_split) for s in range(splits)]
    out = p.kv_bytes if splits == 1 else splits * p.kv_bytes // p.elem * 4
    return (sum(triton.cdiv(r, cfg.block_n) for r in split_rows),
            Access("dkv" if splits == 1 else "dkv_partial", out, stored=out))


def _dkdv_launches(p, cfg, m_blocks, rows_per_split, splits):
    """The dK/dV kernel over ``splits`` query ranges of ``rows_per_split`` rows, and the split sum if any."""
    bh, row_bytes = p.B * p.heads, rows_per_split * p.head_dim * p.elem
    query_blocks, dkv_out = _split_ranges(p, cfg, rows_per_split, splits)
    kv_loads = (query_blocks if cfg.reload else splits) * bh * p.head_kv
    launches = [Launch("sra_attention_bwd_dkdv", m_blocks * bh * splits, (
        Access("kv", p.kv_bytes, loaded=kv_loads, reuse_set=p.kv_bytes if splits > 1 or cfg.reload else 0),
        Access("q", p.q_bytes, loaded=m_blocks * p.q_bytes, reuse_set=reuse_set(row_bytes, m_blocks)),
        Access("grad_o", p.q_bytes, loaded=m_blocks * p.q_bytes, reuse_set=reuse_set(row_bytes, m_blocks)),
        Access("lse", p.rows_f32, loaded=m_blocks * p.rows_f32),
        Access("delta", p.rows_f32, loaded=m_blocks * p.rows_f32),
        dkv_out,
    ), flops=m_blocks * bh * query_blocks * 8 * cfg.block_m * cfg.block_n * p.block_d, peak=_peak(p.dot))]
    if splits > 1:
        launches += _split_sum(splits, p.kv_bytes, p.elem)
    return launches


def _dq_launch(p, cfg, grid):
    key_offset = p.head_dim * p.elem  # the head's first key, read once more by each dQ program (see the dQ kernel)
    programs = grid[0] * p.B * p.heads
    key_blocks = triton.cdiv(p.M, cfg.block_m)
    row_loads = key_blocks if cfg.reload else 1
    return Launch("sra_attention_bwd_dq", programs, (
        Access("q", p.q_bytes, loaded=row_loads * p.q_bytes),
        Access("grad_o", p.q_bytes, loaded=row_loads * p.q_bytes),
        Access("lse", p.rows_f32, loaded=p.rows_f32), Access("delta", p.rows_f32, loaded=p.rows_f32),
        Access("kv", p.kv_bytes, loaded=programs * (p.head_kv + key_offset), reuse_set=reuse_set(p.head_kv, grid[0])),
        Access("dq", p.q_bytes, stored=p.q_bytes),
    ), flops=programs * key_blocks * 6 * cfg.block_n * cfg.block_m * p.block_d, peak=_peak(p.dot))


def _split_sum(splits, kv_bytes, e):
    elements = kv_bytes // e
    return [Launch("sra_attention_split_sum", triton.cdiv(elements, _SUM_BLOCK), (
        Access("dkv_partial", splits * elements * 4, loaded=splits * elements * 4),
        Access("dkv", kv_bytes, stored=kv_bytes)))]


def backward_cost(p, num_sms=SMS, num_splits=None):
    """The backward's launches (one-block kernel, or delta, dK/dV and dQ; the split sum when there is one)
    as the traffic model counts them."""
    plan = backward_plan(p, num_sms, num_splits)
    bh, q_bytes, kv_bytes, rows_f32 = p.B * p.heads, p.q_bytes, p.kv_bytes, p.rows_f32
    splits = plan.num_splits
    minimum = 3 * q_bytes + kv_bytes + rows_f32 + q_bytes + kv_bytes  # read dO, q, o, kv, lse; write dq, dkv
    useful = 8 * p.B * p.N * p.M * p.C  # the op's FLOP formula: autograd of the reference
    if plan.one is not None:
        cfg = plan.one
        query_blocks, dkv_out = _split_ranges(p, cfg, plan.rows_per_split, splits)
        launches = [Launch("sra_attention_bwd_one_block", bh * splits, (
            Access("kv", kv_bytes, loaded=(query_blocks if cfg.reload else splits) * bh * p.head_kv,
                   reuse_set=reuse_set(p.head_kv, splits)),
            Access("q", q_bytes, loaded=q_bytes),
            Access("grad_o", q_bytes, loaded=q_bytes), Access("o", q_bytes, loaded=q_bytes),
            Access("lse", rows_f32, loaded=rows_f32), Access("dq", q_bytes, stored=q_bytes), dkv_out,
        ), flops=bh * query_blocks * 10 * cfg.block_n * cfg.block_m * p.block_d, peak=_peak(p.dot))]
        if splits > 1:
            launches += _split_sum(splits, kv_bytes, p.elem)
        return OpCost(tuple(launches), minimum, useful)

    launches = [Launch("sra_attention_bwd_delta", plan.delta_grid[0] * bh, (
        Access("o", q_bytes, loaded=q_bytes), Access("grad_o", q_bytes, loaded=q_bytes),
        Access("delta", rows_f32, stored=rows_f32)))]
    launches += _dkdv_launches(p, plan.dkdv, plan.dkdv_grid[0], plan.rows_per_split, splits)
    launches.append(_dq_launch(p, plan.dq, plan.dq_grid))
    return OpCost(tuple(launches), minimum, useful)


# Ahead-of-time compile specs ------------------------------------------------------------------------

_KERNELS = {"fwd": _sra_attention_fwd_kernel, "fwd_wide": _sra_attention_fwd_kernel,
            "fwd_narrow": _sra_attention_fwd_kernel, "dkdv": _sra_attention_bwd_dkdv_kernel,
            "dkdv_wide": _sra_attention_bwd_dkdv_kernel, "dq": _sra_attention_bwd_dq_kernel,
            "dq_narrow": _sra_attention_bwd_dq_kernel, "one": _sra_attention_bwd_one_block_kernel,
            "one_masked": _sra_attention_bwd_one_block_kernel}
_FP32_ARGS = ("scale", "qk_scale_log2")


def _signature(fn, elem, constexprs, out_elem=None):
    """Triton types of fn's arguments: tensors of ``elem`` (lse/delta fp32; if ``out_elem`` is given, the dQ
    kernel's dq, else dkv, of that type: fp32 partial sums of split query ranges, fp32 dQ with grad_lse)."""
    out = "dq_ptr" if "dkv_ptr" not in fn.arg_names else "dkv_ptr"
    types = {"lse_ptr": "fp32", "delta_ptr": "fp32", out: out_elem or elem}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + types.get(name, elem)
        else:
            sig[name] = "fp32" if name in _FP32_ARGS else "i32"
    return sig


def _spec(kernel, dtype, dot_inputs, head_dim, M, out_elem=None):
    block_d = _block_d(head_dim)
    cfg = _config(kernel, dot_inputs, block_d, M)
    fn = _KERNELS[kernel]
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m,
              "INPUT_PRECISION": input_precision(dot_inputs)}
    if not kernel.startswith("fwd"):
        consts["RELOAD"] = cfg.reload
    elem = TRITON_TYPES[dtype]
    tag = elem if dot_inputs == "16-bit" else f"fp32-{dot_inputs}"
    if out_elem:
        tag += f"->{out_elem}"
    name = (f"sra_attention_{kernel} {tag} d{head_dim} N{cfg.block_n} M{cfg.block_m} w{cfg.num_warps}"
            + (" reload" if cfg.reload else ""))
    return AotSpec(name, fn, _signature(fn, elem, consts, out_elem), consts, cfg.num_warps, cfg.num_stages)


def aot_specs():
    """Every (kernel, dtype, tl.dot inputs, head-dim block, block configuration) the launchers can pick:
    head dims 32, 64, 128 (and 48 for the masked-column path), a small and a large key count, the dK/dV
    kernel also writing fp32 partial sums for 16-bit inputs (split query ranges); the split sum into each dtype."""
    variants = [(torch.float16, "16-bit"), (torch.bfloat16, "16-bit"), (torch.float32, "tf32"),
                (torch.float32, "ieee")]
    specs = {}
    for dtype, dot_inputs in variants:
        head_dims = (32, 64, 128) if dot_inputs != "tf32" else (32, 64)
        if dtype == torch.bfloat16:
            head_dims += (48,)
        for head_dim in head_dims:
            for M in (_SMALL_M, 49, 1024):
                for kernel in _KERNELS:
                    if (kernel, dot_inputs, _block_d(head_dim)) not in _CONFIGS or \
                            kernel.startswith("one") and (kernel == "one") != (head_dim == _block_d(head_dim)):
                        continue
                    spec = _spec(kernel, dtype, dot_inputs, head_dim, M)
                    specs[spec.name] = spec
                    if dot_inputs == "16-bit" and kernel.startswith(("dkdv", "one", "dq")):
                        spec = _spec(kernel, dtype, dot_inputs, head_dim, M, out_elem="fp32")
                        specs[spec.name] = spec
            if dot_inputs != "tf32":
                consts = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_N": _DELTA_BLOCK_N}
                fn = _sra_attention_bwd_delta_kernel
                name = f"sra_attention_bwd_delta {TRITON_TYPES[dtype]} d{head_dim} N{_DELTA_BLOCK_N}"
                specs[name] = AotSpec(name, fn, _signature(fn, TRITON_TYPES[dtype], consts), consts)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        fn, elem = _sra_attention_split_sum_kernel, TRITON_TYPES[dtype]
        name = f"sra_attention_split_sum fp32->{elem} B{_SUM_BLOCK} w{_SUM_WARPS}"
        specs[name] = AotSpec(name, fn, {"partial_ptr": "*fp32", "out_ptr": "*" + elem, "numel": "i32",
                                         "splits": "i32", "BLOCK": "constexpr"}, {"BLOCK": _SUM_BLOCK}, _SUM_WARPS,
                                  _SUM_STAGES)
    return list(specs.values())


__all__ = ["sra_attention_fwd", "sra_attention_bwd", "aot_specs"]
