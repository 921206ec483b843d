"""PVT v1 (Wang et al., ICCV 2021), state_dict-compatible with the official classification model.

Difference from the official code, on purpose: the official ``_get_pos_embed`` decides whether to resize
a position embedding by comparing every stage's token count with stage 1's. That crashes where a later
stage has stage 1's count (e.g. a 448x448 input) and, where stage 1 itself has that count on another grid
(112x448), adds the embedding laid out for the wrong grid. Here each stage resizes its embedding
(bilinear, from its construction grid) to its own grid, which is what the official code computes in every
case it gets right (at the construction grid the resize returns the embedding bit for bit).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from pvt_fast.models.base import PyramidBase
from pvt_fast.models.layers import (Block, PatchEmbed, drop_path_rates, official_init, run_blocks,
                                     scaled_size)


class PyramidVisionTransformer(PyramidBase):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1), num_stages=4, *, backend="auto", out_indices=None):
        super().__init__()
        self._setup(backend, num_classes, depths, num_stages, embed_dims, in_chans, out_indices)
        dpr = drop_path_rates(drop_path_rate, depths)
        cur = 0
        for i in range(num_stages):
            first = i == 0
            grid_img = img_size if first else scaled_size(img_size, 2 ** (i + 1))
            patch = patch_size if first else 2
            patch_embed = PatchEmbed(grid_img, patch, patch, 0, in_chans if first else embed_dims[i - 1],
                                     embed_dims[i], self._ops)
            num_patches = patch_embed.num_patches + (1 if i == num_stages - 1 else 0)
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, num_patches, embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(p=drop_rate))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      dpr[cur + j], norm_layer, sr_ratios[i], self.backend)
                for j in range(depths[i])]))
            cur += depths[i]
        self.norm = norm_layer(embed_dims[num_stages - 1])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[num_stages - 1]))
        self.head = nn.Linear(embed_dims[num_stages - 1], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(official_init, conv=False))
        self._finish_init()

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}

    def _pos_embed(self, pos, patch_embed, H, W):
        """``pos`` (1, H0*W0, C) on the construction grid, resized bilinearly to (H, W)."""
        return resize_pos_embed(pos, (patch_embed.H, patch_embed.W), (H, W))

    def _stage(self, i, x, layout, pyramid):
        patch_embed = getattr(self, f"patch_embed{i + 1}")
        pos = getattr(self, f"pos_embed{i + 1}")
        x, H, W = patch_embed(x, layout)
        if i == self.num_stages - 1:
            pos_grid = self._pos_embed(pos[:, 1:], patch_embed, H, W)
            if pyramid:
                pos = pos_grid
            else:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
                pos = torch.cat((pos[:, :1], pos_grid), dim=1)
        else:
            pos = self._pos_embed(pos, patch_embed, H, W)
        x = getattr(self, f"pos_drop{i + 1}")(x + pos)
        return run_blocks(getattr(self, f"block{i + 1}"), x, H, W, self.grad_checkpointing), H, W

    def _head_features(self, x):
        return self.norm(x)[:, 0]


def resize_pos_embed(pos, src, dst):
    """A (1, h*w, C) position embedding laid out on the grid ``src`` = (h, w), resized to ``dst`` = (H, W)
    bilinearly (align_corners False, as the official code).

    There is no branch for ``dst == src``: bilinear resampling to the same size takes every output from
    its own input with weight 1 and its neighbour with weight 0, so it returns ``pos`` exactly (finite
    values), and the same code traces to one graph for every input size (torch.export, ONNX).
    """
    grid = pos.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=tuple(dst), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


PVT = PyramidVisionTransformer

_V1 = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
           qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), sr_ratios=[8, 4, 2, 1])
V1_CONFIGS = {
    "pvt_tiny": dict(_V1, depths=[2, 2, 2, 2]),
    "pvt_small": dict(_V1, depths=[3, 4, 6, 3]),
    "pvt_medium": dict(_V1, depths=[3, 4, 18, 3]),
    "pvt_large": dict(_V1, depths=[3, 8, 27, 3]),
    "pvt_huge_v2": dict(_V1, embed_dims=[128, 256, 512, 768], num_heads=[2, 4, 8, 12], depths=[3, 10, 60, 3]),
}
