"""What PVT v1 and v2 share: input checks, the stage walk, gradient checkpointing, dense features."""
from collections.abc import Sequence

import torch
import torch.nn as nn

from pvt_fast._backend import resolve_backend
from pvt_fast.models.layers import bind_backend
from pvt_fast.ops import get_backend_ops

DEFAULT_CFG = {
    "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
}


def _stage_indices(out_indices, num_stages):
    """``out_indices`` as non-negative stage indices; negative ones count from the last stage, as in Python
    and timm (``-1`` is the last stage)."""
    expected = (f"out_indices must be a non-empty sequence of stage indices in [-{num_stages}, {num_stages}) "
                f"(negative ones count from the last stage), such as (0, 1, 2, 3) or (-1,)")
    if not isinstance(out_indices, Sequence):
        raise TypeError(f"{expected}, got {out_indices!r}")
    given = tuple(out_indices)
    if not given or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        raise ValueError(f"{expected}, got {given}")
    bad = [i for i in given if not -num_stages <= i < num_stages]
    if bad:
        raise ValueError(f"{expected}, got {given}: {bad} out of range")
    return tuple(i % num_stages for i in given)


class PyramidBase(nn.Module):
    """Subclasses build ``patch_embed{i}``, ``block{i}`` and the head, then call :meth:`_finish_init`.

    They implement ``_stage(i, x, layout, pyramid)`` -> ``(x, H, W)``, running stage ``i`` (0-based) on
    the image (``layout="nchw"``) or on the previous stage's token grid (``"nhwc"``, (B, H, W, C)), and
    ``_head_features(x)``, which turns the last stage's tokens into the pooled feature.
    """

    def _setup(self, backend, num_classes, depths, num_stages, embed_dims, in_chans, out_indices):
        self.backend = resolve_backend(backend)
        self._ops = get_backend_ops(self.backend)
        self.num_classes = num_classes
        self.depths = depths
        self.num_stages = num_stages
        self.embed_dims = list(embed_dims)
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.out_indices = None if out_indices is None else _stage_indices(out_indices, num_stages)
        self.default_cfg = dict(DEFAULT_CFG, num_classes=num_classes)

    def _finish_init(self):
        self.min_input_size = self._smallest_input()

    # --- geometry -------------------------------------------------------------------------------

    def _size_problem(self, n):
        """Why an input side of ``n`` pixels fails, or None when every stage can run on it."""
        for i in range(self.num_stages):
            pe = getattr(self, f"patch_embed{i + 1}")
            k, p = pe.proj.kernel_size[0], pe.proj.padding[0]
            if n + 2 * p < k:
                return f"stage {i + 1}'s patch embedding (kernel {k}) gets {n} pixels"
            n = pe.output_size(n, n)[0]
            attn = getattr(self, f"block{i + 1}")[0].attn
            if not attn.linear and attn.sr_ratio > 1 and n < attn.sr_ratio:
                return f"stage {i + 1}'s spatial reduction (sr_ratio {attn.sr_ratio}) gets a {n}-token side"
        return None

    def _smallest_input(self):
        n = 1
        while self._size_problem(n) is not None:
            n += 1
        return n

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4 and isinstance(x.shape[1], torch.SymInt):
            raise ValueError(f"x's channel dimension (dim 1) cannot be dynamic: the patch embedding's weights fix it "
                             f"to {self.in_chans}; export with only the batch, H and W dimensions dynamic")
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[0] == 0:
            raise ValueError(f"x must be (B, {self.in_chans}, H, W) with B >= 1, got {tuple(x.shape)}")
        weight = self.patch_embed1.proj.weight
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: "
                            "cast one of them or run under torch.autocast")
        for side in x.shape[-2:]:
            problem = self._size_problem(side)
            if problem is not None:
                m = self.min_input_size
                raise ValueError(f"x of size {tuple(x.shape[-2:])} is too small: {problem}; "
                                 f"the smallest input is {m}x{m}")

    # --- forward --------------------------------------------------------------------------------

    def _walk(self, x, pyramid):
        self._check_input(x)
        x = x.contiguous()
        B = x.shape[0]
        layout, maps = "nchw", []
        for i in range(self.num_stages):
            x, H, W = self._stage(i, x, layout, pyramid)
            if pyramid:
                maps.append(x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous())
            if i != self.num_stages - 1:
                x, layout = x.reshape(B, H, W, -1), "nhwc"
        return maps if pyramid else x

    def forward_features(self, x):
        """The pooled feature before the head, as the official ``forward_features``."""
        return self._head_features(self._walk(x, pyramid=False))

    def forward_pyramid(self, x):
        """The four stage outputs as NCHW maps (B, C_i, H_i, W_i), as the official detection and
        segmentation backbones return them (no classification head, no cls token)."""
        return self._walk(x, pyramid=True)

    def forward(self, x):
        if self.out_indices is not None:
            maps = self.forward_pyramid(x)
            return [maps[i] for i in self.out_indices]
        return self.head(self.forward_features(x))

    # --- backend ----------------------------------------------------------------------------------

    def set_backend(self, backend):
        """Compute through ``backend``'s ops from now on, with the same parameters: e.g. a model built with
        ``fused`` switched to ``sdpa`` for CPU use or export, and back. Returns the model."""
        self.backend = resolve_backend(backend)
        self._ops = get_backend_ops(self.backend)
        bind_backend(self, self.backend)
        return self

    # --- official API -----------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block in backward instead of storing its activations (same outputs, same grads)."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=""):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dims[self.num_stages - 1], num_classes) if num_classes > 0 else nn.Identity()
