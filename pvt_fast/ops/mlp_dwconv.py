"""``pvt_fast::dwconv_gelu``: the middle of a PVTv2 MLP, ``GELU(dwconv3x3(relu?(x)) + bias)`` on tokens.

A ``torch.library`` custom op (fake impl, autograd through the ``pvt_fast::dwconv_gelu_backward`` op,
FLOP formulas) around the Triton kernels of :mod:`pvt_fast.kernels.mlp_dwconv`. They run on CUDA tensors,
and on CPU tensors when ``TRITON_INTERPRET=1`` (read at call time).

Dtypes: x is fp32, fp16 or bf16 and the output has x's dtype. weight and bias may have another float
dtype: under autocast fc1 hands over bf16 tokens while the conv parameters stay fp32. The kernels read
the parameters in their own dtype and compute in fp32 (autocast's conv2d would round them to bf16 first);
each gradient comes back in the dtype of its input.
"""

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pvt_fast.ops._triton import kernel_module, on_device

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, H, W, weight, bias):
    if x.dim() != 3 or x.shape[1] != H * W:
        raise ValueError(f"x must be (B, N, hidden) with N == H*W == {H}*{W}, got {tuple(x.shape)}")
    if H < 1 or W < 1:
        raise ValueError(f"H and W must be >= 1, got H={H}, W={W}")
    hidden = x.shape[2]
    if tuple(weight.shape) != (hidden, 1, 3, 3):
        raise ValueError(f"weight must be (hidden, 1, 3, 3) == ({hidden}, 1, 3, 3), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (hidden,):
        raise ValueError(f"bias must be (hidden,) == ({hidden},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


@torch.library.custom_op("pvt_fast::dwconv_gelu", mutates_args=())
def _dwconv_gelu(x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor, relu_prologue: bool) -> Tensor:
    _check_inputs(x, H, W, weight, bias)
    kernels = kernel_module("mlp_dwconv", "dwconv_gelu", x.device)
    with on_device(x.device):
        return kernels.dwconv_gelu_fwd(x, H, W, weight, bias, relu_prologue)


@_dwconv_gelu.register_fake
def _(x, H, W, weight, bias, relu_prologue):
    _check_inputs(x, H, W, weight, bias)
    return x.new_empty(x.shape)


@torch.library.custom_op("pvt_fast::dwconv_gelu_backward", mutates_args=())
def _dwconv_gelu_backward(
    grad_out: Tensor, x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor, relu_prologue: bool
) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(x, H, W, weight, bias)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    kernels = kernel_module("mlp_dwconv", "dwconv_gelu", x.device)
    with on_device(x.device):
        return kernels.dwconv_gelu_bwd(grad_out, x, H, W, weight, bias, relu_prologue)


@_dwconv_gelu_backward.register_fake
def _(grad_out, x, H, W, weight, bias, relu_prologue):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, H, W, weight, bias, relu_prologue = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.grid = (H, W)
    ctx.relu_prologue = relu_prologue


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    H, W = ctx.grid
    grad_x, grad_weight, grad_bias = torch.ops.pvt_fast.dwconv_gelu_backward(
        grad_out, x, H, W, weight, bias, ctx.relu_prologue
    )
    return grad_x, None, None, grad_weight, grad_bias, None


_dwconv_gelu.register_autograd(_backward, setup_context=_setup_context)


# FLOPs = 2 x MACs of the convolutions (bias, ReLU and GELU not counted), the convention of PyTorch's conv
# formulas, so the fused and eager backends count the same model: 9 MACs per output element forward; dx and
# d weight 9 each backward. The backward kernels also recompute the forward conv (9 more MACs per element),
# which is not counted.


@register_flop_formula(torch.ops.pvt_fast.dwconv_gelu)
def _dwconv_gelu_flop(x_shape, H, W, weight_shape, bias_shape, relu_prologue, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    return 2 * 9 * B * N * C


@register_flop_formula(torch.ops.pvt_fast.dwconv_gelu_backward)
def _dwconv_gelu_backward_flop(grad_shape, x_shape, H, W, weight_shape, bias_shape, relu_prologue,
                               out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    return 2 * 2 * 9 * B * N * C


def dwconv_gelu(x, H, W, weight, bias, relu_prologue):
    """``GELU(dwconv3x3(relu?(x)) + bias)`` for fc1's output ``x`` ``(B, H*W, hidden)``, token ``n = h*W + w``.

    ``weight`` ``(hidden, 1, 3, 3)`` and ``bias`` ``(hidden,)`` are ``mlp.dwconv.dwconv``'s parameters;
    ``relu_prologue`` applies b2_li's ReLU to x first. Exact (erf) GELU, zero padding 1. Returns a
    contiguous ``(B, H*W, hidden)`` tensor in x's dtype.
    """
    return torch.ops.pvt_fast.dwconv_gelu(x, H, W, weight, bias, bool(relu_prologue))


__all__ = ["dwconv_gelu"]
