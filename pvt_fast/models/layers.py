"""Blocks shared by PVT v1 and v2, with the official attribute names (so state_dict keys match).

Every module keeps the official submodules (``q``, ``kv``, ``sr``, ``norm``, ``dwconv.dwconv``, ...) as
parameter holders and computes through the op table it was given (:mod:`pvt_fast.ops`).
"""
import math

import torch
import torch.nn as nn

from pvt_fast.ops import get_backend_ops


def official_init(module, conv=True):
    """The official init: trunc-normal(std .02) Linear, unit LayerNorm, and (v2 only, ``conv=True``)
    He-normal (fan-out) Conv2d; v1 leaves its convolutions at PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif conv and isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            module.bias.data.zero_()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Conv2d(kernel, stride, padding) + LayerNorm (default eps) producing (B, H*W, C) tokens.

    ``H``, ``W`` and ``num_patches`` are the official construction-time grid (v1's position embeddings
    are laid out on it); the grid of a forward call is returned by ``forward``.
    """

    def __init__(self, img_size, patch_size, stride, padding, in_chans, embed_dim, ops):
        super().__init__()
        img_size = _pair(img_size)
        self.img_size = img_size
        self.patch_size = _pair(patch_size)
        self.H, self.W = img_size[0] // stride, img_size[1] // stride
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)
        self.bind_ops(ops)

    def bind_ops(self, ops):
        """Compute through the op table ``ops`` from now on (see :meth:`PyramidBase.set_backend`)."""
        self._ops = ops

    def output_size(self, H, W):
        k, s, p = self.proj.kernel_size[0], self.proj.stride[0], self.proj.padding[0]
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def forward(self, x, layout):
        """``x``: the image (B, C, H, W) with ``layout="nchw"``, or a token grid (B, H, W, C) with "nhwc"."""
        return self._ops.patch_embed(x, self.proj.weight, self.proj.bias, self.norm.weight, self.norm.bias,
                                     self.norm.eps, self.proj.stride[0], self.proj.padding[0], layout)


class Attention(nn.Module):
    """Spatial-reduction attention: queries from every token, keys/values from a reduced token set."""

    def __init__(self, dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, sr_ratio, linear, ops):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.sr_ratio = sr_ratio
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.bind_ops(ops)

    def bind_ops(self, ops):
        """Compute through the op table ``ops`` from now on (see :meth:`PyramidBase.set_backend`)."""
        self._ops = ops
        if self.linear:
            self._reduce = ops.reduce_kv_linear
        elif self.sr_ratio > 1:
            self._reduce = ops.reduce_kv
        else:
            self._reduce = None

    def forward(self, x, H, W, shortcut=None):
        """``shortcut`` (the block's residual, only where dropout is off) is added by proj's epilogue."""
        q = self._ops.linear(x, self.q.weight, self.q.bias)
        if self._reduce is not None:
            x = self._reduce(x, H, W, self.sr.weight, self.sr.bias, self.norm.weight, self.norm.bias, self.norm.eps)
        kv = self._ops.linear(x, self.kv.weight, self.kv.bias)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = self._ops.attention(q, kv, self.num_heads, self.scale, dropout_p)
        out = self._ops.linear(x, self.proj.weight, self.proj.bias, shortcut)
        return out if shortcut is not None else self.proj_drop(out)


class DWConv(nn.Module):
    """Holds the depthwise 3x3 conv under the official key ``dwconv.dwconv``."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)


class Mlp(nn.Module):
    """v1: fc1 -> GELU -> fc2. v2 (``dwconv=True``): fc1 -> [ReLU] -> DWConv3x3 -> GELU -> fc2."""

    def __init__(self, in_features, hidden_features, drop, dwconv, linear, ops):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        if dwconv:
            self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)
        self.linear = linear
        if linear:
            self.relu = nn.ReLU(inplace=True)
        self._has_dwconv = dwconv
        self.bind_ops(ops)

    def bind_ops(self, ops):
        """Compute through the op table ``ops`` from now on (see :meth:`PyramidBase.set_backend`)."""
        self._ops = ops

    def forward(self, x, H, W, shortcut=None):
        """``shortcut`` (the block's residual, only where dropout is off) is added by fc2's epilogue."""
        x = self._ops.linear(x, self.fc1.weight, self.fc1.bias)
        if self._has_dwconv:
            conv = self.dwconv.dwconv
            x = self._ops.dwconv_gelu(x, H, W, conv.weight, conv.bias, self.linear)
        else:
            x = self.act(x)
        x = self.drop(x)
        out = self._ops.linear(x, self.fc2.weight, self.fc2.bias, shortcut)
        return out if shortcut is not None else self.drop(out)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, norm_layer,
                 sr_ratio, backend, dwconv=False, linear=False):
        super().__init__()
        ops = get_backend_ops(backend, attn_dropout=attn_drop)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio, linear, ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, dwconv, linear, ops)
        self._stochastic = drop > 0.0 or drop_path > 0.0

    def forward(self, x, H, W):
        if self.training and self._stochastic:
            x = x + self.drop_path(self.attn(self.norm1(x), H, W))
            return x + self.drop_path(self.mlp(self.norm2(x), H, W))
        # Dropout and drop path are identities here: each residual add is done by proj's / fc2's op.
        x = self.attn(self.norm1(x), H, W, shortcut=x)
        return self.mlp(self.norm2(x), H, W, shortcut=x)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def drop_path_rates(drop_path_rate, depths):
    """Stochastic-depth rate of every block, rising linearly to ``drop_path_rate`` (computed on the CPU,
    so models can be built under ``torch.device("meta")``)."""
    return torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()


def scaled_size(img_size, divisor):
    """The official ``img_size // divisor`` for an int or an (H, W) pair."""
    return tuple(s // divisor for s in _pair(img_size))


def bind_backend(module, backend):
    """Point every pvt_fast layer inside ``module`` at ``backend``'s op table (same parameters); an attention
    layer with dropout gets the table its dropout needs, as at construction."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.bind_ops(get_backend_ops(backend, attn_dropout=m.attn_drop.p))
        elif isinstance(m, (Mlp, PatchEmbed)):
            m.bind_ops(get_backend_ops(backend))


# CPU inference runs a stage's blocks on batch slices whose MLP hidden tensor stays under this size. A larger
# activation comes from glibc's mmap (above its threshold, at most 32 MiB) and is page-faulted in again on
# every call; slices also keep a block's working set in cache. Each sample's tokens go through the same ops.
CPU_SLICE_BYTES = 8 << 20


def cpu_inference_slice(x, hidden, training):
    """Samples per slice for running an MLP of ``hidden`` channels (or blocks holding one) on tokens ``x``
    (B, N, C), or ``None`` to run the batch whole: only for CPU inference (no autograd, not ``training``) and
    never while compiling, exporting or tracing, so a graph never holds a batch-sized split."""
    if (x.device.type != "cpu" or x.dim() != 3 or x.shape[0] < 2 or torch.is_grad_enabled() or training
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return None
    per_sample = x.shape[1] * hidden * x.element_size()
    slice_size = max(1, CPU_SLICE_BYTES // max(per_sample, 1))
    return slice_size if slice_size < x.shape[0] else None


def run_blocks(blocks, x, H, W, checkpointing):
    """Run a stage's blocks, recomputing each in backward when ``checkpointing`` (same numbers); in CPU
    inference, on batch slices (see :func:`cpu_inference_slice`)."""
    slice_size = None if len(blocks) == 0 else cpu_inference_slice(x, blocks[0].mlp.fc1.out_features,
                                                                   blocks[0].training)
    if slice_size is not None:
        return torch.cat([run_blocks(blocks, part, H, W, False) for part in x.split(slice_size)])
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, H, W, use_reentrant=False)
        else:
            x = blk(x, H, W)
    return x


__all__ = ["Attention", "Block", "DWConv", "DropPath", "Mlp", "PatchEmbed", "bind_backend", "drop_path_rates",
           "run_blocks", "official_init", "scaled_size"]
