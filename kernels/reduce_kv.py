"""Triton kernels for the key/value reduction of spatial-reduction attention (SRA).

PVT attends from every token to a reduced set of ``M`` keys/values. Two reductions exist:

- conv SRA (v1, v2): ``Conv2d(C, C, kernel=stride=sr)`` over the token grid, then ``LayerNorm(C)``;
- linear SRA (v2-li): ``AdaptiveAvgPool2d(7)`` -> 1x1 ``Conv2d`` -> ``LayerNorm(C)`` -> exact GELU.

Both read the tokens ``x`` ``(B, N, C)``, ``N = H * W``, token ``n = h * W + w``, in place through their
strides, and write ``(B, M, C)`` tokens, ``m = ho * Wo + wo``. The kv projection that follows stays a
cuBLAS ``F.linear`` in the model: its GEMM is ``2 * B * M * C * 2C`` FLOPs on a ``(B, M, C)`` input that is
``sr * sr`` times smaller than ``x``, so fusing it here could save at most one write and one read of
``(B, M, C)``, while the LayerNorm would have to finish before the second GEMM could start in the same
program (all ``C`` channels of a row resident, then a ``(C, 2C)`` weight streamed past them). That is a
second kernel's worth of registers and tuning for a few percent of the bytes; not done.

Kernels
-------
``_conv_layer_norm_kernel`` is the conv + LayerNorm (+ GELU) of both paths, written as an implicit GEMM:
``out[r, :] = LN(sum_k A[r, k] * Wt[k, :] + bias)`` with ``r = b * M + m`` over all ``B * M`` output
tokens and ``k = (i * sr + j) * C + ci`` over the ``sr x sr x C`` patch (a ``K = sr * sr * C`` reduction).
One program owns ``BLOCK_M`` output tokens and **all** ``C`` output channels (``BLOCK_C =
next_pow2(C)``, ``C <= 1024``), so the LayerNorm (and GELU) run in the epilogue on the fp32 accumulator:
one pass, no second kernel, no rounding of the conv output before it is normalised. The price is a
``BLOCK_C x BLOCK_M`` fp32 accumulator per program, so ``BLOCK_M`` shrinks as ``C`` grows (16 tokens at
``C > 256``). ``linear`` SRA runs the same kernel with ``sr = 1`` on the pooled grid.

Bytes and FLOPs, bf16 at 224x224, batch 64: stage 1 (C 64, sr 8) reads 25.7 MB of ``x`` for 1.6 GFLOP,
stage 2 (128, 4) 12.8 MB for 1.6 GFLOP, stage 3 (320, 2) 8.0 MB for 2.6 GFLOP. The arithmetic intensity
is ``C`` FLOP per byte of ``x`` (2-byte types), so every PVT stage is bound by the read of ``x`` on an
H100 (ridge ~300 FLOP/B) except C = 320 near the ridge. The block choices below compile without spills
but are not yet tuned on hardware.

``_adaptive_avg_pool7_kernel`` is PyTorch's ``adaptive_avg_pool2d(., 7)`` on the token layout, with
PyTorch's bins (row bin ``i`` covers ``[floor(i * H / 7), ceil((i + 1) * H / 7))``; bins overlap or repeat
when ``H`` is not a multiple of 7 or is smaller than 7). It is a separate launch rather than a prologue of
the GEMM because each pooled row reduces ``H * W / 49`` tokens: as a prologue only ``B * 49 / BLOCK_M``
programs would share the whole read of ``x``, while this kernel spreads it over ``B * 49 * C / 64``
programs. The pooled ``(B, 49, C)`` tensor is rounded to ``x.dtype``, as PyTorch's pool would.

Weights are read through their four strides. The fast layout for the conv weight is channels-last
(``(C_out, sr, sr, C_in)`` in memory) so that a ``BLOCK_K`` slice of input channels is contiguous; the
op converts it (with the dtype cast) once per call, a ``C * C * sr * sr`` copy.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pvt_fast.kernels._aot import AotSpec
from pvt_fast.kernels._counts import SMS, Access, Launch, OpCost

POOL_SIZE = 7
_POOL = tl.constexpr(POOL_SIZE)
MAX_CHANNELS = 1024


@triton.jit(do_not_specialize=["SR", "APPLY_GELU"])
def _conv_layer_norm_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr,
    rows, M, Wo, W, C, SR, eps, APPLY_GELU,
    stride_xb, stride_xn, stride_xc,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ob, stride_om, stride_oc,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Strided ``SR x SR`` conv + bias + LayerNorm (+ exact GELU) of a token grid, one output row per token.

    Math, for output token ``r = b * M + m``, ``m = ho * Wo + wo`` and channel ``co``::

        y[r, co]  = bias[co] + sum_{i, j < SR} sum_{ci < C} w[co, ci, i, j] * x[b, (ho*SR + i) * W + wo*SR + j, ci]
        out[r, :] = (y[r, :] - mean_C y[r, :]) * rsqrt(var_C y[r, :] + eps) * gamma + beta   (biased variance)
        out       = 0.5 * out * (1 + erf(out / sqrt(2)))                                      if APPLY_GELU != 0

    Pointers, all through the strides given: ``x`` ``(B, N, C)`` tokens of an ``H x W`` grid (``H`` is
    implied by ``M``); ``w`` ``(C, C, SR, SR)`` in any layout (channels-last makes each ``BLOCK_K`` slice of
    input channels contiguous); ``bias``, ``gamma``, ``beta`` ``(C,)`` contiguous; ``out`` ``(B, M, C)``.
    Row indices are int32 (``B * M < 2**31``); offsets into ``x`` and ``out`` are int64, into ``w`` int32
    (``C * C * SR * SR < 2**31``). Grid rows past ``Ho * SR`` and columns past ``Wo * SR`` are never read
    (PyTorch's floor).

    Blocking: program ``p`` owns output tokens ``[p * BLOCK_M, (p + 1) * BLOCK_M)`` of all ``rows = B * M``
    (tokens of different images may share a program) and all channels, ``BLOCK_C >= C``. The tile is
    computed transposed, ``acc[co, r] = w_tile @ x_tile``, so the wide channel dimension is the MMA's M and
    the few tokens its N (the swap-AB arrangement: smaller register fragments per warp, and a 16-token
    block still fills the MMA). The ``K = SR * SR * C`` reduction is one flat loop over
    ``(i, j, channel block)``, ``BLOCK_K`` input channels a step, ``tl.dot`` accumulating in fp32
    (``INPUT_PRECISION`` is "ieee" or "tf32", used for fp32 only).

    Masking: tokens ``>= rows`` and input channels ``>= C`` load 0 from ``x``. Weight rows ``co >= C`` are
    clamped to row ``C - 1`` instead of masked (a mask-free, in-bounds load; it saves the registers of a
    2-D predicate): those accumulator rows hold finite garbage and are zeroed before the LayerNorm, whose
    sums run over ``C``; they are never stored. Input channels ``>= C`` are masked to 0 on the weight too.

    Cost: FLOPs ``2 * B * M * C * C * SR * SR`` (+ ``O(B * M * C)`` epilogue). Bytes (``s`` = element size):
    the read of ``x``, ``B * M * SR * SR * C * s`` (every input token in the floor(H/SR)*SR x floor(W/SR)*SR
    window, once); the weight, ``C * C * SR * SR * s`` per program (from L2 after the first);
    ``3 * C * s`` parameters; the write of ``B * M * C * s``.
    """
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    b = r // M
    m = r - b * M
    ho = m // Wo
    wo = m - ho * Wo
    x_row = b.to(tl.int64) * stride_xb + (ho * SR * W + wo * SR).to(tl.int64) * stride_xn

    k = tl.arange(0, BLOCK_K)
    co = tl.arange(0, BLOCK_C)
    co_ok = co < C
    x_ptrs = x_ptr + x_row[None, :] + k[:, None].to(tl.int64) * stride_xc
    w_offs = tl.minimum(co, C - 1)[:, None] * stride_wo + k[None, :] * stride_wi

    blocks_per_tap = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for step in range(SR * SR * blocks_per_tap):
        tap = step // blocks_per_tap
        c0 = (step - tap * blocks_per_tap) * BLOCK_K
        i = tap // SR
        j = tap - i * SR
        k_ok = k < C - c0
        x_shift = (i * W + j).to(tl.int64) * stride_xn + c0.to(tl.int64) * stride_xc
        w_shift = i * stride_wh + j * stride_ww + c0 * stride_wi
        xt = tl.load(x_ptrs + x_shift, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + w_shift + w_offs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)

    acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.where(co_ok[:, None], acc, 0.0)
    mean = tl.sum(acc, axis=0) / C
    diff = tl.where(co_ok[:, None], acc - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    gamma = tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    y = diff * rstd[None, :] * gamma[:, None] + beta[:, None]
    if APPLY_GELU != 0:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))

    out_row = b.to(tl.int64) * stride_ob + m.to(tl.int64) * stride_om
    out_ptrs = out_ptr + out_row[None, :] + co[:, None].to(tl.int64) * stride_oc
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=co_ok[:, None] & row_ok[None, :])


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
    """Blocking of ``_conv_layer_norm_kernel`` (see :func:`gemm_config`)."""

    block_m: int
    block_c: int
    block_k: int
    num_warps: int
    num_stages: int


# The accumulator is BLOCK_C x BLOCK_M fp32 registers; at most 8K of them (32 per thread) below 16 warps.
_ACC_BUDGET = 8192
_MIN_BLOCK_M = 16  # tl.dot's N; also the smallest token block worth a program
_W_TILE_BYTES = 16 * 1024  # weight tile of one pipeline stage
_PIPELINE_BYTES = 110 * 1024  # all stages together; sm_80 has 163 KB per block


def gemm_config(rows, C, dtype, num_sms):
    """The block configuration ``_conv_layer_norm_kernel`` uses for ``rows`` output tokens of ``C`` channels.

    ``BLOCK_C = next_pow2(C)``, at least 64 (the wgmma M of one warpgroup), so that a program holds whole
    rows for the LayerNorm. ``BLOCK_M``: 8192 accumulator elements / ``BLOCK_C``, between 16 and 64,
    dropped to 16 when it would leave fewer programs than ``num_sms`` (a 224x224 image has only 49 keys).
    ``BLOCK_K``: input channels per step, the largest of 32, 16, 8 whose weight tile fits 16 KB (at least
    16 for 16-bit types, the MMA's K). Warps: one per 1024 elements of the accumulator or of the weight
    tile, whichever is larger, 4 to 16. Pipeline stages: 3 where the operand tiles fit
    ``_PIPELINE_BYTES``, else 2.

    Every configuration compiles without register spills for sm_80 and sm_90 (``aot_specs``); none is
    tuned on hardware yet.
    """
    if C > MAX_CHANNELS:
        raise ValueError(f"C must be <= {MAX_CHANNELS} (one program holds a whole row), got {C}")
    block_c = max(64, triton.next_power_of_2(C))
    block_m = max(_MIN_BLOCK_M, min(64, _ACC_BUDGET // block_c))
    if triton.cdiv(rows, block_m) < num_sms:
        block_m = _MIN_BLOCK_M
    elem = torch.empty((), dtype=dtype).element_size()
    block_k = 32
    while block_k > (8 if elem == 4 else 16) and block_c * block_k * elem > _W_TILE_BYTES:
        block_k //= 2
    stage_bytes = (block_c + block_m) * block_k * elem
    num_stages = 3 if 3 * stage_bytes <= _PIPELINE_BYTES else 2
    num_warps = min(16, max(4, block_c * max(block_m, block_k) // 1024))
    return GemmConfig(block_m, block_c, block_k, num_warps, num_stages)


_POOL_BLOCK_C = 64
_POOL_TILE = 4096  # BLOCK_T * BLOCK_C elements summed per step


def _largest_bin(size):
    return max(((i + 1) * size + POOL_SIZE - 1) // POOL_SIZE - i * size // POOL_SIZE for i in range(POOL_SIZE))


def pool_block_t(H, W):
    """Window positions the pool kernel sums per step: 16 for windows of at most 16 tokens, else 64."""
    largest = _largest_bin(H) * _largest_bin(W)
    return 16 if largest <= 16 else _POOL_TILE // _POOL_BLOCK_C


def input_precision(dtype):
    """``tl.dot``'s input_precision: tf32 for fp32 only when PyTorch's matmul precision allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device):
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Launchers ---------------------------------------------------------------------------------------------


def _conv_layer_norm(x, H, W, sr, weight, bias, gamma, beta, eps, apply_gelu, out, config):
    B, N, C = x.shape
    Ho, Wo = H // sr, W // sr
    rows = B * Ho * Wo
    if out is None:
        out = torch.empty((B, Ho * Wo, C), device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    if config is None:
        config = gemm_config(rows, C, x.dtype, _num_sms(x.device))
    _conv_layer_norm_kernel[(triton.cdiv(rows, config.block_m),)](
        x, weight, bias.contiguous(), gamma.contiguous(), beta.contiguous(), out,
        rows, Ho * Wo, Wo, W, C, sr, eps, int(apply_gelu),
        *x.stride(), *weight.stride(), *out.stride(),
        INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=config.block_m, BLOCK_C=config.block_c, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps, out=None, config=None):
    """``LayerNorm(Conv2d(k = stride = sr)(x on its H x W grid))`` as ``(B, Ho * Wo, C)`` tokens.

    ``x`` ``(B, H * W, C)`` any strides; ``sr_weight`` ``(C, C, sr, sr)`` any strides (channels-last is the
    fast one), same dtype as ``x`` (fp32, fp16 or bf16), as are the ``(C,)`` parameters. ``out``: an
    optional ``(B, Ho * Wo, C)`` tensor to write into; ``config``: a :class:`GemmConfig` instead of
    :func:`gemm_config`'s choice. No argument checks here: ``pvt_fast.ops.reduce_kv`` does them.
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
    """Batch, token grid height and width, channels, reduction ratio (0: the v2-li pool to 7 x 7) and dtype."""

    B: int
    H: int
    W: int
    C: int
    sr: int
    dtype: torch.dtype

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()


def forward_cost(p, num_sms=SMS):
    """The conv SRA forward as :mod:`pvt_fast.kernels.traffic` counts it."""
    e, sr = p.elem, p.sr
    rows = p.B * (p.H // sr) * (p.W // sr)
    cfg = gemm_config(rows, p.C, p.dtype, num_sms)
    programs = triton.cdiv(rows, cfg.block_m)
    x_bytes = rows * sr * sr * p.C * e
    w_bytes = p.C * p.C * sr * sr * e
    steps = sr * sr * triton.cdiv(p.C, cfg.block_k)
    launch = Launch("reduce_kv conv_layer_norm", programs, (
        Access("x", x_bytes, loaded=x_bytes),
        # every program reads BLOCK_C weight rows (rows past C are clamped, not masked) of every step
        Access("weight", w_bytes, loaded=programs * cfg.block_c * sr * sr * p.C * e, reuse_set=w_bytes),
        Access("params", 3 * p.C * e, loaded=programs * 3 * p.C * e),
        Access("out", rows * p.C * e, stored=rows * p.C * e),
    ), flops=programs * steps * 2 * cfg.block_c * cfg.block_k * cfg.block_m,
        peak="fp32" if input_precision(p.dtype) == "ieee" and p.dtype == torch.float32 else
        ("tf32" if p.dtype == torch.float32 else "16-bit"))
    return OpCost((launch,), x_bytes + w_bytes + 3 * p.C * e + rows * p.C * e, 2 * rows * p.C * p.C * sr * sr)


# References --------------------------------------------------------------------------------------------


def _grid(x, H, W):
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, H, W)


def _tokens(y):
    return y.flatten(2).transpose(1, 2)


def reduce_kv_ref(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    """Plain PyTorch :func:`reduce_kv` (the official ``attn.sr`` + ``attn.norm``)."""
    y = F.conv2d(_grid(x, H, W), sr_weight, sr_bias, stride=sr_weight.shape[-1])
    return F.layer_norm(_tokens(y), (x.shape[-1],), norm_weight, norm_bias, eps)


def reduce_kv_linear_ref(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    """Plain PyTorch :func:`reduce_kv_linear` (the official v2-li ``pool``, ``sr``, ``norm``, ``act``)."""
    y = F.conv2d(F.adaptive_avg_pool2d(_grid(x, H, W), POOL_SIZE), sr_weight, sr_bias)
    return F.gelu(F.layer_norm(_tokens(y), (x.shape[-1],), norm_weight, norm_bias, eps))


# Ahead-of-time compile coverage ------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gemm_configs(dtype):
    """Every :class:`GemmConfig` :func:`gemm_config` can return for ``dtype``."""
    configs = set()
    for block_c in (64, 128, 256, 512, 1024):
        for num_sms in (1, 1 << 30):  # BLOCK_M at its largest, and dropped to 16
            configs.add(gemm_config(1, block_c, dtype, num_sms))
    return sorted(configs, key=lambda c: (c.block_c, c.block_m))


def aot_specs():
    """Every (dtype, fp32 precision, block configuration) the launchers can compile.

    Strides of 1 are constexprs, as Triton's JIT specializes them; the other integers are i32. The report
    (``kernels/report.py``) compiles them with the alignment hints the JIT derives for PVT's tensors
    (16-byte pointers, strides divisible by 16); unaligned channel counts compile a variant it does not see.
    """
    specs = []
    for dtype, ty in _TRITON_DTYPES.items():
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for config in _gemm_configs(dtype):
            for precision in precisions:
                signature = {name: "i32" for name in _conv_layer_norm_kernel.arg_names}
                signature.update({f"{p}_ptr": f"*{ty}" for p in ("x", "w", "bias", "gamma", "beta", "out")})
                signature.update(eps="fp32", stride_xc="constexpr", stride_oc="constexpr",
                                 INPUT_PRECISION="constexpr",
                                 BLOCK_M="constexpr", BLOCK_C="constexpr", BLOCK_K="constexpr")
                specs.append(AotSpec(
                    name=f"reduce_kv conv_layer_norm {ty} {precision} "
                         f"M{config.block_m} C{config.block_c} K{config.block_k}",
                    fn=_conv_layer_norm_kernel,
                    signature=signature,
                    constexprs=dict(stride_xc=1, stride_oc=1, INPUT_PRECISION=precision,
                                    BLOCK_M=config.block_m, BLOCK_C=config.block_c, BLOCK_K=config.block_k),
                    num_warps=config.num_warps, num_stages=config.num_stages,
                ))
        for block_t in (16, _POOL_TILE // _POOL_BLOCK_C):
            signature = {name: "i32" for name in _adaptive_avg_pool7_kernel.arg_names}
            signature.update(x_ptr=f"*{ty}", out_ptr=f"*{ty}", stride_xc="constexpr", stride_oc="constexpr",
                             BLOCK_T="constexpr", BLOCK_C="constexpr")
            specs.append(AotSpec(
                name=f"reduce_kv adaptive_avg_pool7 {ty} T{block_t} C{_POOL_BLOCK_C}",
                fn=_adaptive_avg_pool7_kernel,
                signature=signature,
                constexprs=dict(stride_xc=1, stride_oc=1, BLOCK_T=block_t, BLOCK_C=_POOL_BLOCK_C),
                num_warps=4, num_stages=2,
            ))
    return specs
