"""The ``reference`` and ``sdpa`` implementations of every pvt_fast op, in plain PyTorch.

``reference`` repeats the official whai362/PVT forward op for op (including its layout copies), so
it is the equivalence target. ``sdpa`` computes the same math without the copies: a ``(B, N, C)``
token tensor viewed as ``(B, H, W, C)`` and permuted is already a channels-last NCHW tensor, which
PyTorch's convolutions take and return without a transpose, and attention goes through
``scaled_dot_product_attention`` on strided head views.

Signatures (shared with the fused ops):
- ``patch_embed(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, layout)`` -> ``(tokens, H, W)``;
  ``layout`` is ``"nchw"`` for an image ``(B, C, H, W)`` or ``"nhwc"`` for a token grid ``(B, H, W, C)``.
- ``reduce_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)`` -> ``(B, M, C)``: the sr x sr
  strided conv + LayerNorm of spatial-reduction attention.
- ``reduce_kv_linear(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps)`` -> ``(B, 49, C)``:
  v2-li's AdaptiveAvgPool2d(7) -> 1x1 conv -> LayerNorm -> GELU (:func:`adaptive_avg_pool2d`: exportable).
- ``attention(q, kv, num_heads, scale, dropout_p)`` -> ``(B, N, C)``: ``q`` is ``(B, N, C)``, ``kv`` is
  ``(B, M, 2C)`` with K in the first C columns, heads ``d = C // num_heads`` columns wide.
- ``dwconv_gelu(x, H, W, weight, bias, relu_prologue)`` -> ``(B, N, hidden)``: GELU(dwconv3x3(x)), with
  a ReLU applied to ``x`` first when ``relu_prologue``.
- ``linear(x, weight, bias, shortcut=None)`` -> ``[shortcut +] x @ weight^T + bias`` (the q, kv, proj, fc1 and
  fc2 Linears; proj and fc2 take the block's residual as ``shortcut`` where dropout and drop path are off).

CPU inference (``sdpa``): where nothing needs gradients, autocast is off, nothing is being compiled or exported
and the tensors are fp32 on the CPU, the Linears and the depthwise conv + GELU run as oneDNN primitives
(``torch.ops.mkldnn``, which inductor uses too) with the bias, the residual add and the GELU applied in the
primitive's epilogue: PyTorch's ``addmm`` first copies the broadcast bias into the output, and the residual
add and GELU are separate passes over the activations. Same math, summed in another order (relative
difference ~1e-7).
"""
import torch
import torch.nn.functional as F


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def grid_view(x, H, W):
    """(B, H*W, C) tokens as a channels-last (B, C, H, W) view (no copy)."""
    B, N, C = x.shape
    return x.reshape(B, H, W, C).permute(0, 3, 1, 2)


def tokens(y):
    """(B, C, H, W) map as (B, H*W, C) tokens; free when ``y`` is channels-last."""
    B, C = y.shape[:2]
    return y.permute(0, 2, 3, 1).reshape(B, -1, C)


def adaptive_avg_pool2d(x, size):
    """``F.adaptive_avg_pool2d(x, size)`` of an NCHW ``x`` (any strides), with windows that follow the traced H, W
    when exporting.

    Output row i averages input rows ``[floor(i*H/size), ceil((i+1)*H/size))``, columns likewise. Eager runs
    PyTorch's op; while exporting (torch.export, ONNX) the same windows are built from the symbolic H and W as
    two pooling matrices, ``P_h @ x @ P_w^T``, because an exporter would otherwise freeze the export size's
    windows into a fixed AveragePool (silently wrong at any other size). The two agree to fp32 rounding.
    """
    if not torch.compiler.is_exporting():
        return F.adaptive_avg_pool2d(x, size)
    H, W = x.shape[-2:]
    return pooling_matrix(H, size, x) @ x @ pooling_matrix(W, size, x).transpose(0, 1)


def pooling_matrix(n, size, like):
    """(size, n) matrix averaging the adaptive-pool windows of an n-long axis, in ``like``'s dtype and device."""
    i = torch.arange(size, device=like.device)
    start = (i * n) // size
    end = ((i + 1) * n + size - 1) // size
    j = torch.arange(n, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


# reference: the official op order and copies ------------------------------------------------------


def patch_embed_reference(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, layout):
    if layout == "nhwc":
        x = x.permute(0, 3, 1, 2).contiguous()
    y = F.conv2d(x, weight, bias, stride, padding)
    H, W = y.shape[-2:]
    return _layer_norm(y.flatten(2).transpose(1, 2), norm_weight, norm_bias, eps), H, W


def reduce_kv_reference(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    B, N, C = x.shape
    x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
    x_ = F.conv2d(x_, sr_weight, sr_bias, stride=sr_weight.shape[-1]).reshape(B, C, -1).permute(0, 2, 1)
    return _layer_norm(x_, norm_weight, norm_bias, eps)


def reduce_kv_linear_reference(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    B, N, C = x.shape
    x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
    x_ = F.conv2d(adaptive_avg_pool2d(x_, 7), sr_weight, sr_bias).reshape(B, C, -1).permute(0, 2, 1)
    return F.gelu(_layer_norm(x_, norm_weight, norm_bias, eps))


def attention_reference(q, kv, num_heads, scale, dropout_p=0.0):
    B, N, C = q.shape
    q = q.reshape(B, N, num_heads, C // num_heads).permute(0, 2, 1, 3)
    kv = kv.reshape(B, -1, 2, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, training=True)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def dwconv_gelu_reference(x, H, W, weight, bias, relu_prologue):
    if relu_prologue:
        x = F.relu(x)
    B, N, C = x.shape
    y = F.conv2d(x.transpose(1, 2).view(B, C, H, W), weight, bias, padding=1, groups=C)
    return F.gelu(y.flatten(2).transpose(1, 2))


# sdpa: the same math on views ----------------------------------------------------------------------


def patch_embed_sdpa(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, layout):
    if layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias, stride, padding)
    H, W = y.shape[-2:]
    return _layer_norm(tokens(y), norm_weight, norm_bias, eps), H, W


def reduce_kv_sdpa(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    y = F.conv2d(grid_view(x, H, W), sr_weight, sr_bias, stride=sr_weight.shape[-1])
    return _layer_norm(tokens(y), norm_weight, norm_bias, eps)


def reduce_kv_linear_sdpa(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, eps):
    pooled = tokens(adaptive_avg_pool2d(grid_view(x, H, W), 7))
    y = F.linear(pooled, sr_weight.flatten(1), sr_bias)
    return F.gelu(_layer_norm(y, norm_weight, norm_bias, eps))


def attention_sdpa(q, kv, num_heads, scale, dropout_p=0.0):
    B, N, C = q.shape
    d = C // num_heads
    q = q.reshape(B, N, num_heads, d).transpose(1, 2)
    kv = kv.reshape(B, -1, 2, num_heads, d)
    k = kv[:, :, 0].transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(B, N, C)


def dwconv_gelu_sdpa(x, H, W, weight, bias, relu_prologue):
    if relu_prologue:
        x = F.relu(x)
    C = x.shape[-1]
    if _onednn_inference(x, weight, bias):
        return tokens(torch.ops.mkldnn._convolution_pointwise(grid_view(x, H, W), weight, bias, [1, 1], [1, 1],
                                                               [1, 1], C, "gelu", [], "none"))
    y = F.conv2d(grid_view(x, H, W), weight, bias, padding=1, groups=C)
    return F.gelu(tokens(y))


def linear_reference(x, weight, bias, shortcut=None):
    y = F.linear(x, weight, bias)
    return y if shortcut is None else shortcut + y


def linear_sdpa(x, weight, bias, shortcut=None):
    if not _onednn_inference(x, weight, bias, shortcut):
        return linear_reference(x, weight, bias, shortcut)
    if shortcut is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, shortcut, weight, bias, "add")


def _onednn_inference(*tensors):
    """Whether the oneDNN inference primitives may compute an op on ``tensors`` (see the module docstring):
    they have no autograd, no autocast rule and no export or compile path."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.is_autocast_enabled("cpu"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad))
               for t in tensors)
