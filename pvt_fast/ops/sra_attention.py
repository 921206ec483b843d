"""``pvt_fast::sra_attention``: spatial-reduction attention as one fused Triton kernel (forward and backward).

``attention(q, kv, num_heads, scale)`` is what the models call: ``q`` is the q Linear's output
``(B, N, C)``, ``kv`` the kv Linear's output ``(B, M, 2C)`` (K in the first C columns, heads ``C // num_heads``
columns wide), and the result is ``softmax(scale q k^T) v`` per head, laid out ``(B, N, C)`` for proj.

Ops:
- ``pvt_fast::sra_attention(q, kv, num_heads, scale) -> (o, lse)``; ``lse`` is ``(B, num_heads, N)`` fp32,
  the logsumexp of the scaled scores, kept for the backward (and differentiable: d lse / d S = softmax).
- ``pvt_fast::sra_attention_backward(grad_o, q, kv, o, lse, grad_lse, num_heads, scale) -> (dq, dkv)``, a
  custom op of its own so that torch.compile's traced backward calls the Triton kernels too.

Autocast: when autocast is enabled for the inputs' device, both ``q`` and ``kv`` are cast to the autocast
dtype before the op runs (as autocast does for matmul), so a mixed pair -- e.g. a bf16 ``q`` from the q
Linear and an fp32 ``kv`` -- is computed in the autocast dtype and the output has that dtype. The casts
are ordinary ``Tensor.to`` calls, so gradients flow back in each input's own dtype.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pvt_fast.ops._triton import kernel_module, on_device, register_autocast

MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q, kv, num_heads):
    if q.dim() != 3:
        raise ValueError(f"q must be (B, N, C), got {tuple(q.shape)}")
    if kv.dim() != 3 or kv.shape[0] != q.shape[0] or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(
            f"kv must be (B, M, 2C) with B == {q.shape[0]} and 2C == {2 * q.shape[-1]}, got {tuple(kv.shape)}"
        )
    if kv.shape[1] == 0:
        raise ValueError(f"kv must have at least one key (M >= 1), got {tuple(kv.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise ValueError(f"kv must have q's dtype {q.dtype}, got {kv.dtype}")
    if kv.device != q.device:
        raise ValueError(f"kv must be on q's device {q.device}, got {kv.device}")
    C = q.shape[-1]
    if num_heads < 1 or C % num_heads != 0:
        raise ValueError(f"num_heads must divide C = {C}, got {num_heads}")
    head_dim = C // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim C // num_heads must be <= {MAX_HEAD_DIM}, got {C} // {num_heads} = {head_dim}")


@torch.library.custom_op(
    "pvt_fast::sra_attention", mutates_args=(),
    schema="(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor, Tensor)",
)
def sra_attention(q: Tensor, kv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    _check_inputs(q, kv, num_heads)
    kernels = kernel_module("sra_attention", "sra_attention", q.device)
    with on_device(q.device):
        return kernels.sra_attention_fwd(q, kv, num_heads, scale)


@sra_attention.register_fake
def _(q, kv, num_heads, scale):
    _check_inputs(q, kv, num_heads)
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op(
    "pvt_fast::sra_attention_backward", mutates_args=(),
    schema="(Tensor grad_o, Tensor q, Tensor kv, Tensor o, Tensor lse, Tensor? grad_lse, int num_heads, float scale)"
           " -> (Tensor, Tensor)",
)
def sra_attention_backward(
    grad_o: Tensor, q: Tensor, kv: Tensor, o: Tensor, lse: Tensor, grad_lse: Optional[Tensor], num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    kernels = kernel_module("sra_attention", "sra_attention", q.device)
    with on_device(q.device):
        return kernels.sra_attention_bwd(
            grad_o, q, kv, o, lse, num_heads, scale,
            grad_lse=grad_lse,
        )


@sra_attention_backward.register_fake
def _(grad_o, q, kv, o, lse, grad_lse, num_heads, scale):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _setup_context(ctx, inputs, output):
    q, kv, num_heads, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, kv, o, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale
    # An unused output then arrives as None instead of a materialized zero tensor (lse usually is unused).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_o, grad_lse):
    q, kv, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dkv = torch.ops.pvt_fast.sra_attention_backward(grad_o, q, kv, o, lse, grad_lse, ctx.num_heads, ctx.scale)
    return dq, dkv, None, None


sra_attention.register_autograd(_backward, setup_context=_setup_context)


register_autocast("pvt_fast::sra_attention", sra_attention)


@register_flop_formula(torch.ops.pvt_fast.sra_attention)
def _sra_attention_flop(q_shape, kv_shape, num_heads, scale, *args, out_shape=None, **kwargs):
    """Two matmuls of B * heads * N * M * d multiply-adds each: 4 B N M C."""
    B, N, C = q_shape
    return 4 * B * N * kv_shape[1] * C


@register_flop_formula(torch.ops.pvt_fast.sra_attention_backward)
def _sra_attention_backward_flop(grad_o_shape, q_shape, kv_shape, *args, out_shape=None, **kwargs):
    """What autograd of the reference counts: the two matmuls' gradients (dP, dV, dK, dQ), twice the forward.
    The kernels also recompute S (and, past 64 keys, dP): not counted, as in the other backends."""
    B, N, C = q_shape
    return 8 * B * N * kv_shape[1] * C


def attention(q, kv, num_heads, scale, dropout_p=0.0):
    """``softmax(scale q k^T) v`` for every head: ``q`` (B, N, C), ``kv`` (B, M, 2C) -> (B, N, C).

    The kernel has no attention dropout: ``dropout_p`` must be 0 (models with attention dropout use SDPA).
    """
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0 for the fused attention (use backend='sdpa'), got {dropout_p}")
    return sra_attention(q, kv, num_heads, scale)[0]
