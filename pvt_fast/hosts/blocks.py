"""PVT blocks of host libraries recognized by structure and computed through pvt_fast's op table.

Each ``match_*`` takes a module and its family's parts (:mod:`pvt_fast.hosts.layouts`) and returns None when
the module does not hold those parts (another family or kind may), a ``(forward, Binding, attn_dropout)``
when it can be accelerated, or raises :class:`~pvt_fast.hosts.common.Unsupported` saying why not. The
``*_forward`` functions become the module's ``forward`` (for that instance only); they call the host's
Linear, dropout and output modules as the host does, and hand the call to the host's own forward when
an argument, a host option or a hook asks for what the op table does not compute.
"""
import torch
import torch.nn as nn

from pvt_fast.hosts.common import (Binding, Signature, Unsupported, check_conv, check_layer_norm, computes_gelu,
                                   get, has_hooks, holds_only, host_forward, present, require)
from pvt_fast.models.layers import cpu_inference_slice

SR_CONV, SR_NONE, SR_POOL = "attention (sr conv)", "attention (sr 1)", "attention (linear, pool 7)"
MLP = "mlp (dwconv)"
PATCH_EMBED = "patch embed"


def _roles(parts, names):
    """The attribute paths of ``parts``'s roles ``names`` (tuples flattened, unused roles dropped)."""
    paths = []
    for name in names:
        value = getattr(parts, name)
        if isinstance(value, tuple):
            paths.extend(value)
        elif value is not None:
            paths.append(value)
    return paths


def _linear(module, path, ops, x):
    """The host's Linear at ``path`` applied to ``x``: through the op table's ``linear`` (on CPU inference a
    oneDNN primitive with the bias in its epilogue) when it is a plain ``nn.Linear`` without hooks, otherwise
    called as the host calls it (a subclass keeps its own forward, hooks fire)."""
    linear = get(module, path)
    if type(linear) is nn.Linear and not has_hooks(linear):
        return ops.linear(x, linear.weight, linear.bias)
    return linear(x)


# --- spatial-reduction attention ------------------------------------------------------------------------


def match_attention(module, parts):
    q = get(module, parts.q)
    kv = [get(module, name) for name in parts.kv]
    proj = get(module, parts.proj) if parts.proj else None
    if not (isinstance(q, nn.Linear) and all(isinstance(m, nn.Linear) for m in kv)
            and (parts.proj is None or isinstance(proj, nn.Linear))):
        return None
    roles = ("q", "kv", "proj", "proj_drop", "attn_drop", "sr", "norm", "pool", "act")
    if not holds_only(module, _roles(parts, roles)):
        return None
    name = type(module).__name__
    C = q.in_features
    width = C * 2 // len(kv)
    require(q.out_features == C and all(m.in_features == C and m.out_features == width for m in kv),
            f"{name}: q must map C -> C and k/v C -> C each (kv C -> 2C), got q {q} and {kv}")
    require(proj is None or (proj.in_features == C and proj.out_features == C), f"{name}: proj must map C -> C")
    heads = getattr(module, parts.num_heads, None)
    require(isinstance(heads, int) and heads > 0 and C % heads == 0,
            f"{name}: {parts.num_heads} must be a positive int dividing C = {C}, got {heads!r}")
    if parts.scale is not None:
        require(isinstance(getattr(module, parts.scale, None), float), f"{name}: {parts.scale} must be a float")
    drop = getattr(module, parts.attn_drop, None)
    require(isinstance(drop, nn.Dropout) or isinstance(drop, (int, float)),
            f"{name}: {parts.attn_drop} must be a Dropout or a probability, got {type(drop).__name__}")
    kind, fused = _reduction(module, parts, C)
    return attention_forward, Binding(kind, parts, _grid_signature(module), fused), _probability(drop)


def _grid_signature(module):
    signature = Signature.of(module)
    require(signature.required in (2, 3), f"{type(module).__name__}.forward must take (x, H, W) or (x, (H, W))")
    return signature


def _reduction(module, parts, C):
    """The K/V reduction's kind and the paths of the modules it uses."""
    sr, norm = get(module, parts.sr), get(module, parts.norm)
    pool = get(module, parts.pool) if parts.pool else None
    act = get(module, parts.act) if parts.act else None
    name = type(module).__name__
    if present(pool):
        require(isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (7, (7, 7)),
                f"{name}: {parts.pool} must be AdaptiveAvgPool2d(7), got {pool}")
        check_conv(sr, f"{name}.{parts.sr}")
        require(sr.kernel_size == (1, 1) and sr.stride == (1, 1) and sr.in_channels == sr.out_channels == C,
                f"{name}: {parts.sr} after the pool must be a 1x1 conv C -> C, got {sr}")
        check_layer_norm(norm, C, f"{name}.{parts.norm}")
        require(computes_gelu(act), f"{name}: {parts.act} does not compute the exact GELU")
        return SR_POOL, (parts.pool, parts.sr, parts.norm, parts.act)
    if present(sr):
        check_conv(sr, f"{name}.{parts.sr}")
        require(sr.kernel_size == sr.stride and sr.padding == (0, 0) and sr.in_channels == sr.out_channels == C,
                f"{name}: {parts.sr} must be a Conv2d C -> C with kernel == stride and no padding, got {sr}")
        check_layer_norm(norm, C, f"{name}.{parts.norm}")
        require(not present(act), f"{name}: a strided reduction followed by {parts.act} is not PVT's")
        return SR_CONV, (parts.sr, parts.norm)
    require(not present(norm) and not present(act), f"{name}: {parts.norm} without a reduction conv")
    return SR_NONE, ()


def _probability(drop):
    return drop.p if isinstance(drop, nn.Dropout) else float(drop)


def attention_forward(self, *args, **kwargs):
    binding = self._pvt_fast
    parts = binding.parts
    values = binding.arguments(self, args, kwargs, parts.host_options)
    if values is None:
        return host_forward(self, args, kwargs)
    x, H, W = binding.grid(values)
    ops = binding.ops
    q = _linear(self, parts.q, ops, x)
    if binding.kind != SR_NONE:
        sr, norm = get(self, parts.sr), get(self, parts.norm)
        reduce = ops.reduce_kv_linear if binding.kind == SR_POOL else ops.reduce_kv
        x = reduce(x, H, W, sr.weight, sr.bias, norm.weight, norm.bias, norm.eps)
    if len(parts.kv) == 1:
        kv = _linear(self, parts.kv[0], ops, x)
    else:  # separate key / value Linears, each on its own weights (never copied into one)
        kv = torch.cat([_linear(self, name, ops, x) for name in parts.kv], dim=-1)
    heads = getattr(self, parts.num_heads)
    scale = getattr(self, parts.scale) if parts.scale else (q.shape[-1] // heads) ** -0.5
    dropout_p = _probability(getattr(self, parts.attn_drop)) if self.training else 0.0
    out = ops.attention(q, kv, heads, scale, dropout_p)
    if parts.proj:
        out = _linear(self, parts.proj, ops, out)
    if parts.proj_drop:
        out = get(self, parts.proj_drop)(out)
    if parts.returns == "tuple":
        return (out,)
    if parts.returns == "pair":
        return out, None
    return out


# --- v2 / Mix-FFN MLP -----------------------------------------------------------------------------------


def match_mlp(module, parts):
    fc1, fc2 = get(module, parts.fc1), get(module, parts.fc2)
    dwconv = next((path for path in parts.dwconv if isinstance(get(module, path), nn.Conv2d)), None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and dwconv is not None):
        return None
    roles = [parts.fc1, dwconv, parts.act, parts.relu, parts.drop, parts.fc2]
    if not holds_only(module, [r for r in roles if r]):
        return None
    name = type(module).__name__
    hidden = fc1.out_features
    conv = get(module, dwconv)
    check_conv(conv, f"{name}.{dwconv}", groups=hidden)
    require(conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.in_channels == conv.out_channels == hidden == fc2.in_features,
            f"{name}: {dwconv} must be a 3x3 depthwise conv over fc1's {hidden} channels, got {conv}")
    require(computes_gelu(get(module, parts.act)), f"{name}: {parts.act} does not compute the exact GELU")
    relu = get(module, parts.relu) if parts.relu else None
    require(not present(relu) or isinstance(relu, nn.ReLU), f"{name}: {parts.relu} must be a ReLU or absent")
    require(isinstance(get(module, parts.drop), (nn.Dropout, nn.Identity)), f"{name}: {parts.drop} must be a Dropout")
    # The depthwise conv comes first: mlp_forward reads it from there.
    fused = (dwconv, parts.act) + ((parts.relu,) if present(relu) else ())
    if "." in dwconv:
        fused += (dwconv.rsplit(".", 1)[0],)
    return mlp_forward, Binding(MLP, parts, _grid_signature(module), fused, "relu" if present(relu) else ""), 0.0


def mlp_forward(self, *args, **kwargs):
    binding = self._pvt_fast
    values = binding.arguments(self, args, kwargs)
    if values is None:
        return host_forward(self, args, kwargs)
    x, H, W = binding.grid(values)
    parts = binding.parts
    fc1, fc2, drop = get(self, parts.fc1), get(self, parts.fc2), get(self, parts.drop)
    # CPU inference on batch slices (as pvt_fast's own stages; see cpu_inference_slice), unless a hook on
    # fc1, fc2 or the dropout would then see slices of the batch, or that dropout is training.
    hooked = has_hooks(fc1) or has_hooks(fc2) or has_hooks(drop)
    slice_size = None if hooked else cpu_inference_slice(x, fc1.out_features, self.training or drop.training)
    if slice_size is not None:
        return torch.cat([_mlp(self, binding, drop, part, H, W) for part in x.split(slice_size)])
    return _mlp(self, binding, drop, x, H, W)


def _mlp(self, binding, drop, x, H, W):
    """fc1 -> [ReLU] -> depthwise 3x3 + bias -> GELU -> ``drop`` -> fc2 -> ``drop``, through the op table."""
    parts = binding.parts
    conv = get(self, binding.fused[0])
    ops = binding.ops
    x = _linear(self, parts.fc1, ops, x)
    x = drop(ops.dwconv_gelu(x, H, W, conv.weight, conv.bias, binding.detail == "relu"))
    return drop(_linear(self, parts.fc2, ops, x))


# --- patch embeddings -----------------------------------------------------------------------------------

# What the hosts' patch embeddings return, read from a probe call.
NHWC, NCHW, TOKENS_H_W, TOKENS_HW = "(B, H, W, C)", "(B, C, H, W)", "(tokens, H, W)", "(tokens, (H, W))"
_PROBE_GRID = (2, 3)


def match_patch_embed(module, parts):
    proj, norm = get(module, parts.proj), get(module, parts.norm)
    if not (isinstance(proj, nn.Conv2d) and isinstance(norm, nn.LayerNorm)):
        return None
    roles = [parts.proj, parts.norm]
    position = parts.position
    if position:
        roles += [position.position, position.cls_token, position.drop]
        if not callable(getattr(module, position.resize, None)):
            return None
    if not holds_only(module, roles):
        return None
    name = type(module).__name__
    check_conv(proj, f"{name}.{parts.proj}")
    check_layer_norm(norm, proj.out_channels, f"{name}.{parts.norm}")
    signature = Signature.of(module)
    require(signature.required == 1, f"{name}.forward must take the image alone")
    layout = TOKENS_H_W if parts.position else _probe_output(module, proj)
    forward = patch_embed_position_forward if parts.position else patch_embed_forward
    return forward, Binding(PATCH_EMBED, parts, signature, (parts.proj, parts.norm), layout), 0.0


def _probe_output(module, proj):
    """Run the host's forward once on a tiny zero image whose conv grid is 2 x 3 and name its output layout."""
    (kh, kw), (sh, sw), (ph, pw) = proj.kernel_size, proj.stride, proj.padding
    h, w = (_PROBE_GRID[0] - 1) * sh + kh - 2 * ph, (_PROBE_GRID[1] - 1) * sw + kw - 2 * pw
    require(h > 0 and w > 0, f"{type(module).__name__}: padding {proj.padding} exceeds the kernel")
    weight = proj.weight
    x = torch.zeros(1, proj.in_channels, h, w, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out = host_forward(module, (x,), {})
    C, grid = proj.out_channels, _PROBE_GRID
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        if tuple(out.shape[1:]) == (*grid, C):
            return NHWC
        if tuple(out.shape[1:]) == (C, *grid):
            return NCHW
    tokens = grid[0] * grid[1]
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].shape[1:] == (tokens, C):
        if len(out) == 3 and tuple(out[1:]) == grid:
            return TOKENS_H_W
        if len(out) == 2 and tuple(out[1]) == grid:
            return TOKENS_HW
    raise Unsupported(f"{type(module).__name__}: its forward returns neither a (B, H, W, C) or (B, C, H, W) map "
                      "nor tokens with their grid")


def _embed(self, binding, x):
    proj, norm = get(self, binding.parts.proj), get(self, binding.parts.norm)
    return binding.ops.patch_embed(x, proj.weight, proj.bias, norm.weight, norm.bias, norm.eps, proj.stride[0],
                                   proj.padding[0], "nchw")


def patch_embed_forward(self, *args, **kwargs):
    binding = self._pvt_fast
    values = binding.arguments(self, args, kwargs)
    if values is None:
        return host_forward(self, args, kwargs)
    tokens, H, W = _embed(self, binding, values[binding.signature.positional[0]])
    layout = binding.detail
    if layout == TOKENS_H_W:
        return tokens, H, W
    if layout == TOKENS_HW:
        return tokens, (H, W)
    grid = tokens.reshape(tokens.shape[0], H, W, tokens.shape[-1])
    return grid if layout == NHWC else grid.permute(0, 3, 1, 2)


def patch_embed_position_forward(self, *args, **kwargs):
    """Hugging Face PVT v1: the embedding, then the host's cls token, position embeddings and dropout."""
    binding = self._pvt_fast
    values = binding.arguments(self, args, kwargs)
    if values is None:
        return host_forward(self, args, kwargs)
    tokens, H, W = _embed(self, binding, values[binding.signature.positional[0]])
    parts = binding.parts.position
    position, cls_token = getattr(self, parts.position), getattr(self, parts.cls_token)
    resize = getattr(self, parts.resize)
    if cls_token is not None:
        tokens = torch.cat((cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        position = torch.cat((position[:, :1], resize(position[:, 1:], H, W)), dim=1)
    else:
        position = resize(position, H, W)
    return getattr(self, parts.drop)(tokens + position), H, W

