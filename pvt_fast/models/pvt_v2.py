"""PVT v2 (Wang et al., CVMJ 2022), state_dict-compatible with the official classification model."""
from functools import partial

import torch
import torch.nn as nn

from pvt_fast.models.base import PyramidBase
from pvt_fast.models.layers import (Block, PatchEmbed, drop_path_rates, official_init, run_blocks,
                                     scaled_size)


class PyramidVisionTransformerV2(PyramidBase):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1), num_stages=4, linear=False, *, backend="auto", out_indices=None):
        super().__init__()
        self._setup(backend, num_classes, depths, num_stages, embed_dims, in_chans, out_indices)
        self.linear = linear
        dpr = drop_path_rates(drop_path_rate, depths)
        cur = 0
        for i in range(num_stages):
            first = i == 0
            grid_img = img_size if first else scaled_size(img_size, 2 ** (i + 1))
            kernel, stride = (7, 4) if first else (3, 2)
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(
                grid_img, kernel, stride, kernel // 2, in_chans if first else embed_dims[i - 1], embed_dims[i],
                self._ops))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      dpr[cur + j], norm_layer, sr_ratios[i], self.backend, dwconv=True, linear=linear)
                for j in range(depths[i])]))
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
            cur += depths[i]
        self.head = nn.Linear(embed_dims[num_stages - 1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(official_init)
        self._finish_init()

    def freeze_patch_emb(self):
        """Stop training stage 1's patch embedding (the official method sets a flag that freezes nothing)."""
        self.patch_embed1.requires_grad_(False)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed1", "pos_embed2", "pos_embed3", "pos_embed4", "cls_token"}

    def _stage(self, i, x, layout, pyramid):
        x, H, W = getattr(self, f"patch_embed{i + 1}")(x, layout)
        x = run_blocks(getattr(self, f"block{i + 1}"), x, H, W, self.grad_checkpointing)
        return getattr(self, f"norm{i + 1}")(x), H, W

    def _head_features(self, x):
        return x.mean(dim=1)


PVTv2 = PyramidVisionTransformerV2

_V2 = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
           qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), sr_ratios=[8, 4, 2, 1])
V2_CONFIGS = {
    "pvt_v2_b0": dict(_V2, embed_dims=[32, 64, 160, 256], depths=[2, 2, 2, 2]),
    "pvt_v2_b1": dict(_V2, depths=[2, 2, 2, 2]),
    "pvt_v2_b2": dict(_V2, depths=[3, 4, 6, 3]),
    "pvt_v2_b2_li": dict(_V2, depths=[3, 4, 6, 3], linear=True),
    "pvt_v2_b3": dict(_V2, depths=[3, 4, 18, 3]),
    "pvt_v2_b4": dict(_V2, depths=[3, 8, 27, 3]),
    "pvt_v2_b5": dict(_V2, mlp_ratios=[4, 4, 4, 4], depths=[3, 6, 40, 3]),
}
