"""``pvt_fast::reduce_kv`` and ``pvt_fast::reduce_kv_linear``: the K/V reduction of spatial-reduction attention.

- ``reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)`` -> ``(B, (H // sr) * (W // sr), C)``:
  ``LayerNorm(Conv2d(C, C, kernel = stride = sr)(x))`` (``attn.sr`` + ``attn.norm`` of PVT v1/v2).
- ``reduce_kv_linear(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)`` -> ``(B, 49, C)``:
  ``GELU(LayerNorm(Conv2d 1x1(AdaptiveAvgPool2d(7)(x))))`` (v2-li).

``x`` is ``(B, H * W, C)`` tokens in any strides; it is read in place. Forward runs the Triton kernels of
:mod:`pvt_fast.kernels.reduce_kv` on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

dtypes: the public functions cast the four parameters to ``x.dtype`` before the op (one copy, which also
makes the conv weight channels-last, the layout the kernel reads fastest; autograd sees the cast, so
fp32 master weights get fp32 gradients). The op takes the parameters in one dtype (fp32, fp16 or bf16),
the output's, and ``x`` in that dtype or fp32. Under autocast the parameters are cast to the autocast
dtype, as autocast does for ``conv2d``; ``x`` (the block's LayerNorm output, which autocast keeps in
fp32) is not copied: the kernel rounds each tile of it to the autocast dtype as it reads it, the rounding
autocast's ``conv2d`` applies, so the conv runs on tensor cores and ``x`` is read once. Unlike eager
autocast, the LayerNorm is computed in fp32 from the fp32 conv accumulator and its output is rounded to
the autocast dtype (eager autocast returns fp32 there); the following kv linear casts to that dtype anyway.

Backward is built from PyTorch ops on recomputed values (nothing but the inputs is saved): the conv output
is recomputed with ``F.conv2d`` (for ``linear``: ``F.adaptive_avg_pool2d`` + ``F.linear``), the
LayerNorm statistics with ``aten.native_layer_norm``, then ``aten.native_layer_norm_backward``,
``aten.gelu_backward`` (linear), ``aten.convolution_backward`` (conv) or two matmuls and
``aten._adaptive_avg_pool2d_backward`` (linear). It gives gradients for ``x``, ``sr_weight``, ``sr_bias``,
``norm_weight`` and ``norm_bias``; double backward is not supported.

FLOPs (``torch.utils.flop_counter``, 2 x MACs of the GEMMs): ``2 * B * M * C * C * sr * sr`` for
``reduce_kv``, ``2 * B * 49 * C * C`` for ``reduce_kv_linear`` (pool, LayerNorm and GELU not counted).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pvt_fast.ops._triton import kernel_module, on_device, register_autocast, to_autocast_dtype
from pvt_fast.ops.eager import grid_view, tokens

# The kernel module's limits, repeated so that importing the op does not import Triton.
POOL_SIZE = 7
MAX_CHANNELS = 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, linear):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got {tuple(x.shape)}")
    B, N, C = x.shape
    if N != H * W:
        raise ValueError(f"x must be (B, N, C) with N == H*W == {H * W} (H={H}, W={W}), got {tuple(x.shape)}")
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"x must have 1 <= C <= {MAX_CHANNELS} channels, got {tuple(x.shape)}")
    shape = tuple(sr_weight.shape)
    if linear and shape != (C, C, 1, 1):
        raise ValueError(f"sr_weight must be (C, C, 1, 1) with C == {C}, got {shape}")
    if len(shape) != 4 or shape[:2] != (C, C) or shape[2] != shape[3] or shape[2] < 1:
        raise ValueError(f"sr_weight must be (C, C, sr, sr) with C == {C}, got {shape}")
    for name, t in (("sr_bias", sr_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be (C,) with C == {C}, got {tuple(t.shape)}")
    sr = shape[-1]
    if H < sr or W < sr:
        raise ValueError(f"input too small: H={H}, W={W}, but the {sr}x{sr} reduction needs H >= {sr} and W >= {sr}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("sr_weight", sr_weight), ("sr_bias", sr_bias), ("norm_weight", norm_weight),
                    ("norm_bias", norm_bias)):
        if t.dtype != sr_weight.dtype or sr_weight.dtype not in (x.dtype, torch.float16, torch.bfloat16) or (
                x.dtype != sr_weight.dtype and x.dtype != torch.float32):
            raise TypeError(f"{name} must have x's dtype {x.dtype} (or, for a float32 x, float16 or bfloat16 as the "
                            f"other parameters), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


# conv SRA -----------------------------------------------------------------------------------------------


@torch.library.custom_op("pvt_fast::reduce_kv", mutates_args=())
def _reduce_kv_op(x: Tensor, H: int, W: int, sr_weight: Tensor, sr_bias: Tensor, norm_weight: Tensor,
                  norm_bias: Tensor, eps: float) -> Tensor:
    _check_inputs(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, linear=False)
    kernels = kernel_module("reduce_kv", "reduce_kv", x.device)
    with on_device(x.device):
        return kernels.reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)


@_reduce_kv_op.register_fake
def _(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    _check_inputs(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, linear=False)
    sr = sr_weight.shape[-1]
    return x.new_empty((x.shape[0], (H // sr) * (W // sr), x.shape[2]), dtype=sr_weight.dtype)


def _setup_context(ctx, inputs, output):
    x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps = inputs
    ctx.save_for_backward(x, sr_weight, sr_bias, norm_weight, norm_bias)
    ctx.grid = (H, W)
    ctx.eps = eps




def _layer_norm_backward(ctx, grad, y, mean, rstd, norm_weight, norm_bias):
    """Gradients of LayerNorm(y) (statistics ``mean``, ``rstd``) w.r.t. y, weight and bias."""
    return torch.ops.aten.native_layer_norm_backward(grad, y, [y.shape[-1]], mean, rstd, norm_weight, norm_bias,
                                                     [True, ctx.needs_input_grad[5], ctx.needs_input_grad[6]])


def _reduce_kv_backward(ctx, grad):
    x, sr_weight, sr_bias, norm_weight, norm_bias = ctx.saved_tensors
    H, W = ctx.grid
    sr = sr_weight.shape[-1]
    grid = grid_view(x.to(sr_weight.dtype), H, W)
    y = tokens(F.conv2d(grid, sr_weight, sr_bias, stride=sr))
    _, mean, rstd = torch.ops.aten.native_layer_norm(y, [y.shape[-1]], norm_weight, norm_bias, ctx.eps)
    dy, dnorm_weight, dnorm_bias = _layer_norm_backward(ctx, grad, y, mean, rstd, norm_weight, norm_bias)
    dgrid, dsr_weight, _ = torch.ops.aten.convolution_backward(
        grid_view(dy, H // sr, W // sr), grid, sr_weight, None, [sr, sr], [0, 0], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[3], False],
    )
    dx = tokens(dgrid).to(x.dtype) if dgrid is not None else None
    dsr_bias = dy.sum((0, 1)) if ctx.needs_input_grad[4] else None
    return dx, None, None, dsr_weight, dsr_bias, dnorm_weight, dnorm_bias, None


_reduce_kv_op.register_autograd(_reduce_kv_backward, setup_context=_setup_context)


def _autocast_args(dtype, x, H, W, *params_and_eps):
    """The parameters in the autocast dtype; an fp32 ``x`` stays as it is (the kernel rounds it as it reads)."""
    return (x if x.dtype == torch.float32 else x.to(dtype), H, W, *to_autocast_dtype(dtype, *params_and_eps))


register_autocast("pvt_fast::reduce_kv", _reduce_kv_op, _autocast_args)


@register_flop_formula(torch.ops.pvt_fast.reduce_kv)
def _reduce_kv_flop(x_shape, H, W, sr_weight_shape, *args, **kwargs):
    B, N, C = x_shape
    sr = sr_weight_shape[-1]
    return 2 * B * (H // sr) * (W // sr) * C * C * sr * sr


def reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    """``LayerNorm(Conv2d(k = stride = sr)(x))`` as ``(B, (H // sr) * (W // sr), C)`` tokens (see module doc).

    The parameters are cast to ``x.dtype`` and the conv weight made channels-last here (a no-op when they
    already are); ``x`` is read in place.
    """
    return _reduce_kv_op(
        x, H, W, sr_weight.to(dtype=x.dtype, memory_format=torch.channels_last), sr_bias.to(x.dtype),
        norm_weight.to(x.dtype), norm_bias.to(x.dtype), eps,
    )


# linear SRA (v2-li) ---------------------------------------------------------------------------------------


@torch.library.custom_op("pvt_fast::reduce_kv_linear", mutates_args=())
def _reduce_kv_linear_op(x: Tensor, H: int, W: int, sr_weight: Tensor, sr_bias: Tensor, norm_weight: Tensor,
                         norm_bias: Tensor, eps: float) -> Tensor:
    _check_inputs(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, linear=True)
    kernels = kernel_module("reduce_kv", "reduce_kv_linear", x.device)
    with on_device(x.device):
        return kernels.reduce_kv_linear(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)


@_reduce_kv_linear_op.register_fake
def _(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    _check_inputs(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, linear=True)
    return x.new_empty((x.shape[0], POOL_SIZE * POOL_SIZE, x.shape[2]), dtype=sr_weight.dtype)


def _reduce_kv_linear_backward(ctx, grad):
    x, sr_weight, sr_bias, norm_weight, norm_bias = ctx.saved_tensors
    H, W = ctx.grid
    grid = grid_view(x, H, W)
    pooled = tokens(F.adaptive_avg_pool2d(grid, POOL_SIZE)).to(sr_weight.dtype)
    weight = sr_weight.flatten(1)
    y = F.linear(pooled, weight, sr_bias)
    z, mean, rstd = torch.ops.aten.native_layer_norm(y, [y.shape[-1]], norm_weight, norm_bias, ctx.eps)
    dz = torch.ops.aten.gelu_backward(grad, z)
    dy, dnorm_weight, dnorm_bias = _layer_norm_backward(ctx, dz, y, mean, rstd, norm_weight, norm_bias)
    dx = dsr_weight = dsr_bias = None
    if ctx.needs_input_grad[0]:
        dpooled = grid_view((dy @ weight).to(x.dtype), POOL_SIZE, POOL_SIZE)
        dx = tokens(torch.ops.aten._adaptive_avg_pool2d_backward(dpooled, grid))
    if ctx.needs_input_grad[3]:
        dsr_weight = (dy.flatten(0, 1).t() @ pooled.flatten(0, 1)).view_as(sr_weight)
    if ctx.needs_input_grad[4]:
        dsr_bias = dy.sum((0, 1))
    return dx, None, None, dsr_weight, dsr_bias, dnorm_weight, dnorm_bias, None


_reduce_kv_linear_op.register_autograd(_reduce_kv_linear_backward, setup_context=_setup_context)


register_autocast("pvt_fast::reduce_kv_linear", _reduce_kv_linear_op, _autocast_args)


@register_flop_formula(torch.ops.pvt_fast.reduce_kv_linear)
def _reduce_kv_linear_flop(x_shape, *args, **kwargs):
    B, N, C = x_shape
    return 2 * B * POOL_SIZE * POOL_SIZE * C * C


def reduce_kv_linear(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    """``GELU(LayerNorm(Conv1x1(AdaptiveAvgPool2d(7)(x))))`` as ``(B, 49, C)`` tokens (see module doc).

    The parameters are cast to ``x.dtype`` here (a no-op when they already are); ``x`` is read in place.
    """
    return _reduce_kv_linear_op(
        x, H, W, sr_weight.to(x.dtype), sr_bias.to(x.dtype), norm_weight.to(x.dtype), norm_bias.to(x.dtype), eps,
    )
