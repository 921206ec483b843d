"""Analytic FLOP counts of PVT models, per stage and per layer kind (FLOPs = 2 x multiply-adds).

Counted, as the papers count them: every convolution (patch embeddings, the spatial-reduction conv, v2's
depthwise 3x3), every linear layer (q, kv, proj, fc1, fc2, the head) and the two attention matmuls
(Q K^T and P V, 2 x N x M x C multiply-adds together for any number of heads). Not counted: LayerNorm,
GELU, softmax, pooling, additions and biases. That is exactly what ``torch.utils.flop_counter.FlopCounterMode``
counts on the ``reference`` backend, whose attention is two plain matmuls; the count here also holds for
the ``sdpa`` and ``fused`` backends and inside compiled graphs, where FlopCounterMode sees less.

The papers' "GFLOPs" are multiply-adds: pvt_v2_b2 at 224x224 is 4.0 GMACs, ``model_flops`` gives 8.0e9.
"""
from dataclasses import dataclass, field

import torch

from pvt_fast.models.base import PyramidBase
from pvt_fast.ops.reduce_kv import POOL_SIZE


@dataclass
class StageFlops:
    """One stage's geometry and FLOPs: ``tokens`` N queries per image, ``keys`` M keys per image."""
    stage: int
    H: int
    W: int
    tokens: int
    keys: int
    flops: dict = field(default_factory=dict)  # layer kind -> FLOPs, summed over the stage's blocks

    @property
    def total(self):
        return sum(self.flops.values())


def _as_model(model):
    if isinstance(model, PyramidBase):
        return model
    if isinstance(model, str):
        from pvt_fast.models import create_model
        with torch.device("meta"):
            return create_model(model, backend="reference")
    raise TypeError(f"model must be a pvt_fast model or a model name, got {type(model).__name__}")


def _image_hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        return int(image_size[0]), int(image_size[1])
    raise TypeError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")


def _is_v1(model):
    return hasattr(model, "cls_token")


def stage_flops(model, image_size, batch=1, pyramid=False):
    """Per-stage FLOPs of one forward pass of ``model`` (a pvt_fast model or a name) on ``batch`` images of
    ``image_size`` (int or (H, W)).

    ``pyramid=False`` counts ``model(x)``: v1's last stage then carries the cls token (N + 1 tokens);
    ``pyramid=True`` counts ``forward_pyramid(x)`` (no cls token). The head is not part of any stage (see
    :func:`head_flops`). Returns a list of :class:`StageFlops`.
    """
    model = _as_model(model)
    H, W = _image_hw(image_size)
    problem = model._size_problem(min(H, W))
    if problem is not None:
        raise ValueError(f"image_size {H}x{W} is too small: {problem}")
    B = batch
    stages = []
    c_in = model.in_chans
    for i in range(model.num_stages):
        pe = getattr(model, f"patch_embed{i + 1}")
        k = pe.proj.kernel_size[0]
        H, W = pe.output_size(H, W)
        C = model.embed_dims[i]
        counts = {"patch_embed": 2 * B * H * W * C * c_in * k * k}
        N = H * W + (1 if _is_v1(model) and not pyramid and i == model.num_stages - 1 else 0)
        keys = N
        for blk in getattr(model, f"block{i + 1}"):
            attn, mlp = blk.attn, blk.mlp
            if attn.linear:
                keys = POOL_SIZE * POOL_SIZE  # v2-li pools every grid to a fixed square
                reduce = 2 * B * keys * C * C
            elif attn.sr_ratio > 1:
                sr = attn.sr_ratio
                keys = (H // sr) * (W // sr)
                reduce = 2 * B * keys * C * C * sr * sr
            else:
                keys, reduce = N, 0
            hidden = mlp.fc1.out_features
            block = {
                "q": 2 * B * N * C * C,
                "sr": reduce,
                "kv": 2 * B * keys * C * 2 * C,
                "attention": 4 * B * N * keys * C,
                "proj": 2 * B * N * C * C,
                "fc1": 2 * B * N * C * hidden,
                "dwconv": 2 * B * H * W * hidden * 9 if hasattr(mlp, "dwconv") else 0,
                "fc2": 2 * B * N * hidden * C,
            }
            for kind, n in block.items():
                counts[kind] = counts.get(kind, 0) + n
        stages.append(StageFlops(i + 1, H, W, N, keys, counts))
        c_in = C
    return stages


def head_flops(model, batch=1, pyramid=False):
    """FLOPs of the classifier head (0 for ``forward_pyramid`` or a model without classes)."""
    model = _as_model(model)
    if pyramid or model.num_classes <= 0:
        return 0
    return 2 * batch * model.embed_dims[model.num_stages - 1] * model.num_classes


def model_flops(model, image_size, batch=1, pyramid=False):
    """Total FLOPs of one forward pass: the stages plus, unless ``pyramid``, the head."""
    model = _as_model(model)
    return (sum(s.total for s in stage_flops(model, image_size, batch, pyramid))
            + head_flops(model, batch, pyramid))


__all__ = ["StageFlops", "head_flops", "model_flops", "stage_flops"]
