"""PVT v1 and v2 models and the official factories (not registered with timm, whose own ``pvt_v2_*``
names they would shadow)."""
from pvt_fast.models.pvt import V1_CONFIGS, PVT, PyramidVisionTransformer
from pvt_fast.models.pvt_v2 import V2_CONFIGS, PVTv2, PyramidVisionTransformerV2

CONFIGS = {**{n: (PyramidVisionTransformer, c) for n, c in V1_CONFIGS.items()},
           **{n: (PyramidVisionTransformerV2, c) for n, c in V2_CONFIGS.items()}}


def create_model(name, pretrained=False, **kwargs):
    """Build the official variant ``name``; ``kwargs`` override its config (``backend``, ``img_size``,
    ``num_classes``, ``out_indices``, ...). ``pretrained`` may be a checkpoint path
    (see :func:`pvt_fast.load_pretrained`); nothing is ever downloaded."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}")
    cls, config = CONFIGS[name]
    model = cls(**{**config, **kwargs})
    if pretrained is True:
        raise ValueError("pretrained=True would need a download; pass the path of a checkpoint instead")
    if pretrained:
        from pvt_fast.weights import load_pretrained
        load_pretrained(model, pretrained)
    return model


def _factory(name):
    def build(pretrained=False, **kwargs):
        return create_model(name, pretrained, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"The official ``{name}`` configuration; see :func:`create_model`."
    return build


pvt_tiny, pvt_small, pvt_medium, pvt_large, pvt_huge_v2 = (_factory(n) for n in V1_CONFIGS)
(pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b2_li, pvt_v2_b3, pvt_v2_b4,
 pvt_v2_b5) = (_factory(n) for n in V2_CONFIGS)

__all__ = ["CONFIGS", "PVT", "PVTv2", "PyramidVisionTransformer", "PyramidVisionTransformerV2", "create_model",
           *CONFIGS]
