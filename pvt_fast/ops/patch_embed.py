"""Fused patch embedding: Conv2d(k, stride, padding) + bias -> LayerNorm over channels -> tokens.

``pvt_fast::patch_embed(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout)`` returns
the tokens ``(B, Ho*Wo, Cout)`` with ``Ho = (H + 2*padding - k) // stride + 1`` (PyTorch's conv size;
likewise ``Wo``):

    y[b, ho*Wo + wo, :] = LayerNorm(bias + sum_{ci,kh,kw} x[b, ci, ho*s - p + kh, wo*s - p + kw]
                                           * weight[:, ci, kh, kw])

``layout="nchw"``: ``x`` is an image ``(B, Cin, H, W)``; ``"nhwc"``: a token grid ``(B, H, W, Cin)``. Any
strides. The weight is rounded to x's dtype (as autocast does for a conv); products, sums and the
LayerNorm run in fp32; the output has x's dtype. ``weight`` may be x's dtype or float32; ``bias``,
``norm_weight`` and ``norm_bias`` share one dtype, x's or float32.

Implementations: the CUDA kernel of the extension ``pvt_fast._C`` (csrc/patch_embed_op.cpp + patch_embed.cu, registered
for the CUDA dispatch key; Cout <= 1024) and, everywhere else, the PyTorch composite below. On CUDA
tensors without the extension the composite runs after one warning. Under autocast, x (and a
non-fp32 weight) is cast to the autocast dtype first, so the fused kernel reads half the bytes.

Bytes the CUDA kernel moves (bf16, v1 stage 1: 224x224, batch 64, k = s = 4, Cout 64): x 19.3 MB read
once + tokens 25.7 MB written once = 45.0 MB, the minimum (the weights, 6 KB, come from L2). PyTorch's
conv -> flatten/transpose -> LayerNorm moves about 154 MB (conv output written and read back twice).
FLOPs counted: 2 * B * Ho * Wo * Cout * Cin * k * k (the conv; the LayerNorm is not counted).
"""
import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pvt_fast.ops._triton import register_autocast

LAYOUTS = ("nchw", "nhwc")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_extension():
    """Import pvt_fast._C (its import registers the CUDA kernels); the reason when it cannot."""
    try:
        import pvt_fast._C  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def output_size(H, W, k, stride, padding):
    """The token grid (Ho, Wo) of a k x k conv on an H x W input."""
    return (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1


def _spatial(x, layout):
    return (x.shape[2], x.shape[3]) if layout == "nchw" else (x.shape[1], x.shape[2])


def _check_args(x, weight, bias, norm_weight, norm_bias, stride, padding, layout):
    """The op's contract, checked on every device (the CUDA kernel repeats it in C++)."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be "nchw" or "nhwc", got {layout!r}')
    x_shape = "(B, Cin, H, W)" if layout == "nchw" else "(B, H, W, Cin)"
    for name, t in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f'x must be {x_shape} for layout "{layout}", got {tuple(x.shape)}')
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.numel() == 0:
        raise ValueError("weight must be (Cout, Cin, k, k) with a square kernel and no empty dimension, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32, got {weight.dtype}")
    cout, cin, k = weight.shape[:3]
    if (x.shape[1] if layout == "nchw" else x.shape[3]) != cin:
        raise ValueError(f'x must be {x_shape} with Cin == weight.shape[1] == {cin} for layout "{layout}", '
                         f"got {tuple(x.shape)}")
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (cout,):
            raise ValueError(f"{name} must be (Cout,) == ({cout},), got {tuple(t.shape)}")
    param_dtypes = (bias.dtype, norm_weight.dtype, norm_bias.dtype)
    if len(set(param_dtypes)) != 1 or bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"bias, norm_weight and norm_bias must share one dtype, x's ({x.dtype}) or float32, "
                        f"got {', '.join(str(d) for d in param_dtypes)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    H, W = _spatial(x, layout)
    if H + 2 * padding < k or W + 2 * padding < k:
        raise ValueError(f"x's padded size ({H + 2 * padding}, {W + 2 * padding}) must be at least the "
                         f"kernel size {k}")


def _no_autocast(device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def patch_embed_composite(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    """The op's math in PyTorch ops: fp32 conv of x and the x-rounded weight, fp32 LayerNorm."""
    with _no_autocast(x.device):
        image = x.permute(0, 3, 1, 2) if layout == "nhwc" else x
        w = weight.to(x.dtype).float()
        y = F.conv2d(image.float(), w, bias.float(), stride, padding)
        tokens = y.flatten(2).transpose(1, 2)
        out = F.layer_norm(tokens, (w.shape[0],), norm_weight.float(), norm_bias.float(), eps)
        return out.to(x.dtype)


_warned_fallback = False


def _warn_fallback_once():
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "pvt_fast::patch_embed has no CUDA kernel in this process (the extension pvt_fast._C is not "
            f"available: {_EXTENSION_ERROR}); running the PyTorch composite instead. Build it with "
            "`pip install --no-build-isolation -e .` and nvcc present.",
            RuntimeWarning,
        )


@torch.library.custom_op("pvt_fast::patch_embed", mutates_args=())
def patch_embed_op(x: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, stride: int,
                   padding: int, eps: float, layout: str) -> Tensor:
    # Reached for every device except CUDA with the extension loaded (its C++ kernel takes that key).
    _check_args(x, weight, bias, norm_weight, norm_bias, stride, padding, layout)
    if x.device.type == "cuda":
        _warn_fallback_once()
    return patch_embed_composite(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout)


@patch_embed_op.register_fake
def _patch_embed_fake(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    _check_args(x, weight, bias, norm_weight, norm_bias, stride, padding, layout)
    Ho, Wo = output_size(*_spatial(x, layout), weight.shape[2], stride, padding)
    return x.new_empty((x.shape[0], Ho * Wo, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
    ctx.config = (stride, padding, eps, layout)


def _backward(ctx, grad):
    """Recomputes the composite and differentiates it (PyTorch's conv and LayerNorm backward)."""
    needs = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
        out = patch_embed_composite(*leaves, *ctx.config)
        grads = iter(torch.autograd.grad(out, [t for t, n in zip(leaves, needs) if n], grad))
    return (*(next(grads) if n else None for n in needs), None, None, None, None)


patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pvt_fast::_patch_embed_out", mutates_args=("out",))
def _patch_embed_out(x: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, stride: int,
                     padding: int, eps: float, layout: str, out: Tensor) -> None:
    """patch_embed written into ``out``; for tests that poison the output before the kernel runs."""
    tokens = patch_embed_op(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout)
    if out.shape != tokens.shape or out.dtype != tokens.dtype or out.device != tokens.device:
        raise ValueError(f"out must be a (B, Ho*Wo, Cout) == {tuple(tokens.shape)} tensor of x's dtype and device, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    out.copy_(tokens)


def _autocast_args(dtype, x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    """Under autocast x is cast to the autocast dtype (like a conv's input); the kernel rounds an fp32 weight
    itself and reads fp32 LayerNorm parameters, so those stay as they are (mixed ones become fp32)."""
    if x.dtype in _DTYPES:
        x = x.to(dtype)
        if weight.dtype != torch.float32:
            weight = weight.to(dtype)
        if {bias.dtype, norm_weight.dtype, norm_bias.dtype} not in ({torch.float32}, {dtype}):
            bias, norm_weight, norm_bias = bias.float(), norm_weight.float(), norm_bias.float()
    return x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout


register_autocast("pvt_fast::patch_embed", patch_embed_op, _autocast_args)


@register_flop_formula(torch.ops.pvt_fast.patch_embed)
def _patch_embed_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs):
    cout, cin, k = weight_shape[:3]
    return 2 * out_shape[0] * out_shape[1] * cout * cin * k * k


_EXTENSION_ERROR = _load_extension()  # after the schemas: the library's kernels attach to them


def extension_loaded():
    """Whether the CUDA kernel is registered in this process."""
    return _EXTENSION_ERROR is None


def patch_embed(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, layout):
    """Conv2d(k, stride, padding) + bias + LayerNorm(eps) as tokens: returns ``(tokens, Ho, Wo)``.

    ``x`` is the image ``(B, Cin, H, W)`` with ``layout="nchw"`` or a token grid ``(B, H, W, Cin)`` with
    ``"nhwc"``; ``weight`` is the conv's ``(Cout, Cin, k, k)``; ``tokens`` is ``(B, Ho*Wo, Cout)`` in x's
    dtype (see the module docstring for dtypes and autocast).
    """
    tokens = torch.ops.pvt_fast.patch_embed(x, weight, bias, norm_weight, norm_bias, stride, padding, float(eps),
                                            layout)
    Ho, Wo = output_size(*_spatial(x, layout), weight.shape[2], stride, padding)
    return tokens, Ho, Wo


__all__ = ["LAYOUTS", "extension_loaded", "output_size", "patch_embed", "patch_embed_composite"]
