"""Host models by name, with random weights (nothing is downloaded), for the profiler and the benchmarks:

- ``timm:<name>``: ``timm.create_model(name)``, e.g. ``timm:pvt_v2_b2``;
- ``hf-segformer-b0`` ... ``hf-segformer-b5``: Hugging Face ``SegformerForSemanticSegmentation`` with the MiT
  encoder of that size, decoder 256 (b0, b1) or 768 (b2-b5), 150 labels (ADE20k);
- ``smp-segformer-b0`` ... ``smp-segformer-b5``: segmentation_models_pytorch ``Segformer`` on ``mit_b<i>``,
  150 classes.

:func:`host_pair` returns the model accelerated for a backend and an untouched copy with the same weights.
"""
import copy

import torch

from pvt_fast.hosts.walk import accelerate

# MiT encoders (SegFormer): hidden sizes and depths; heads [1, 2, 5, 8], sr [8, 4, 2, 1], MLP ratio 4.
MIT = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2]), "b1": ([64, 128, 320, 512], [2, 2, 2, 2]),
       "b2": ([64, 128, 320, 512], [3, 4, 6, 3]), "b3": ([64, 128, 320, 512], [3, 4, 18, 3]),
       "b4": ([64, 128, 320, 512], [3, 8, 27, 3]), "b5": ([64, 128, 320, 512], [3, 6, 40, 3])}
LABELS = 150
HF_SEGFORMER, SMP_SEGFORMER = "hf-segformer-", "smp-segformer-"
NAMES = ("timm:<pvt_v2 name>", *(HF_SEGFORMER + b for b in MIT), *(SMP_SEGFORMER + b for b in MIT))


def is_host_name(name):
    return name.startswith(("timm:", HF_SEGFORMER, SMP_SEGFORMER))


def build_host(name):
    """The host model ``name`` (see the module docstring), in eval mode, random weights."""
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name.removeprefix("timm:")):
            raise ValueError(f"model {name!r}: timm has no model {name.removeprefix('timm:')!r}")
        return timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
    size = name.removeprefix(HF_SEGFORMER).removeprefix(SMP_SEGFORMER)
    if size not in MIT or not name.startswith((HF_SEGFORMER, SMP_SEGFORMER)):
        raise ValueError(f"model must be one of {', '.join(NAMES)}, got {name!r}")
    if name.startswith(SMP_SEGFORMER):
        import segmentation_models_pytorch as smp

        return smp.Segformer(f"mit_{size}", encoder_weights=None, classes=LABELS).eval()
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    widths, depths = MIT[size]
    decoder = 256 if size in ("b0", "b1") else 768
    config = SegformerConfig(hidden_sizes=widths, depths=depths, decoder_hidden_size=decoder, num_labels=LABELS)
    return SegformerForSemanticSegmentation(config).eval()


def host_pair(name, backend="auto", seed=0):
    """``(accelerated, plain)``: ``name`` built once (``seed`` for its random weights), copied, and the copy
    accelerated for ``backend``."""
    torch.manual_seed(seed)
    plain = build_host(name)
    return accelerate(copy.deepcopy(plain), backend=backend), plain
