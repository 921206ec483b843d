"""SegFormer's all-MLP decode head with each stage's Linear folded into its slice of the 1x1 fuse conv.

The host computes, per stage i, ``P_i = W_i x_i + b_i`` (Linear C_i -> D per pixel), upsamples every P_i
bilinearly to one size, concatenates them and mixes with the 1x1 fuse conv ``F`` (D x n*D), then BN, ReLU,
dropout and the classifier. Bilinear upsampling is a per-channel convex combination of pixels, so it
commutes with per-pixel channel mixing: with F_i the columns of F that meet stage i,

    F . concat_i(up(P_i)) = sum_i up(F_i W_i x_i + F_i b_i)

Here the folded ``F_i W_i`` (D x C_i) is applied at each stage's own resolution, before the upsampling, and
the results are summed: the fuse conv's 4·D x D multiply-adds per output pixel become C_1 x D (stage 1, at
full size) plus the deeper stages at a quarter, a sixteenth, ... of the pixels. The folded weights are
computed from the live parameters at every call (so training updates W_i, b_i and F as before), and
everything after the fuse conv runs through the host's own modules (BN in train mode sees the same tensor).
"""
import torch.nn as nn
import torch.nn.functional as F

from pvt_fast.hosts.common import Binding, Signature, get, holds_only, host_forward, require

DECODE_HEAD = "decode head (folded)"


def match_decode_head(module, parts):
    holders, fuse = get(module, parts.projections), get(module, parts.fuse)
    if not isinstance(holders, nn.ModuleList) or not len(holders):
        return None
    linears = [get(h, parts.linear) for h in holders]
    # Without ``after`` the fuse conv opens a Sequential whose other modules follow it.
    conv = fuse if parts.after else (fuse[0] if isinstance(fuse, nn.Sequential) and len(fuse) else None)
    after = [get(module, path) for path in parts.after]
    if not (all(isinstance(m, nn.Linear) for m in linears) and isinstance(conv, nn.Conv2d)
            and all(isinstance(m, nn.Module) for m in after)
            and holds_only(module, [parts.projections, parts.fuse, *parts.after])
            and all(holds_only(h, [parts.linear]) for h in holders)):
        return None
    name = type(module).__name__
    D, n = conv.out_channels, len(holders)
    require(conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and conv.in_channels == n * D and all(m.out_features == D for m in linears),
            f"{name}: {parts.fuse} must be a 1x1 conv from {n} stages x D to D = {D} channels fed by Linears "
            f"to D, got {conv}")
    signature = Signature.of(module)
    require(signature.required == 1, f"{name}.forward must take the encoder's outputs alone")
    fused = [parts.fuse] + ([f"{parts.fuse}.0"] if conv is not fuse else [])
    for i in range(n):
        fused += [f"{parts.projections}.{i}", f"{parts.projections}.{i}.{parts.linear}"]
    return decode_head_forward, Binding(DECODE_HEAD, parts, signature, tuple(fused)), 0.0


def _stage_maps(inputs, features, n):
    """``[(map, slot)]`` for every stage (slot: its block of the fuse conv's input channels) and the size all
    are upsampled to, as the host's forward picks them; None where the host's forward should run."""
    if inputs == "stages":  # Hugging Face: stage order, concatenated deepest first, stage 1's size
        maps = list(features)
        if len(maps) != n or any(m.dim() != 4 for m in maps):
            return None
        return [(m, n - 1 - i) for i, m in enumerate(maps)], tuple(maps[0].shape[2:])
    # segmentation_models_pytorch: [image, (empty stride-2 map), stages...], concatenated deepest first
    size = tuple(d // 4 for d in features[0].shape[2:])
    stages = features[2:] if features[1].size(1) == 0 else features[1:]
    stages = stages[::-1]
    if len(stages) < n or any(m.dim() != 4 for m in stages[:n]):
        return None
    return [(stages[i], i) for i in range(n)], size


def decode_head_forward(self, *args, **kwargs):
    binding = self._pvt_fast
    parts = binding.parts
    values = binding.arguments(self, args, kwargs)
    holders = get(self, parts.projections)
    selected = None if values is None else _stage_maps(parts.inputs, values[binding.signature.positional[0]],
                                                       len(holders))
    if selected is None:
        return host_forward(self, args, kwargs)
    maps, size = selected
    fuse = get(self, parts.fuse)
    conv = fuse if isinstance(fuse, nn.Conv2d) else fuse[0]
    D = conv.out_channels
    mix = conv.weight.reshape(D, -1)
    total = None
    for (x, slot), holder in zip(maps, holders):
        linear = get(holder, parts.linear)
        block = mix[:, slot * D:(slot + 1) * D]
        bias = block @ linear.bias if linear.bias is not None else None
        B, _, h, w = x.shape
        # Tokens through the folded Linear, viewed as a channels-last map (bilinear upsampling and the sum
        # run fastest there on CPU).
        y = F.linear(x.flatten(2).transpose(1, 2), block @ linear.weight, bias).reshape(B, h, w, D).permute(0, 3, 1, 2)
        if (h, w) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        total = y if total is None else total.add_(y)
    if conv.bias is not None:
        total = total + conv.bias.reshape(1, D, 1, 1)
    for module in ([get(self, path) for path in parts.after] if parts.after else list(fuse)[1:]):
        total = module(total)
    return total.contiguous()
