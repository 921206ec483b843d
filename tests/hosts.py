"""Tiny PVT-family models of the host libraries (random weights, nothing downloaded) for the accelerate tests.

``HOSTS`` maps a name to its builder and the input sizes it runs at; :func:`build` returns a fresh model with
dropout and drop-path off (so train mode is deterministic); :func:`output` takes whatever a model returns to
one tensor.
"""
import torch
import torch.nn as nn

SIZES = [(64, 64), (64, 96), (67, 45)]  # square, non-square, odd
TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 2, 4], num_labels=5,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def output(out):
    """One tensor from whatever the model returns (logits, hidden state, list of maps)."""
    for name in ("logits", "feature_maps", "last_hidden_state"):
        if hasattr(out, name) and getattr(out, name) is not None:
            out = getattr(out, name)
            break
    if isinstance(out, (list, tuple)):
        return torch.cat([t.flatten() for t in out])
    return out


def timm_pvt_v2(linear=False):
    import timm

    if linear:
        return timm.create_model("pvt_v2_b2_li", depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), num_classes=5)
    return timm.create_model("pvt_v2_b0", depths=(1, 2, 1, 1), embed_dims=(16, 32, 40, 64), num_classes=5)


def hf_pvt_v2(linear=False, **config):
    from transformers import PvtV2Config, PvtV2ForImageClassification

    return PvtV2ForImageClassification(PvtV2Config(**TINY, linear_attention=linear, **config))


def hf_pvt_v2_backbone():
    from transformers import PvtV2Backbone, PvtV2Config

    return PvtV2Backbone(PvtV2Config(**TINY, out_features=["stage1", "stage2", "stage3", "stage4"]))


def hf_pvt_v1():
    from transformers import PvtConfig, PvtForImageClassification

    return PvtForImageClassification(PvtConfig(**TINY, image_size=64))


def _segformer_config(**kwargs):
    from transformers import SegformerConfig

    return SegformerConfig(**TINY, decoder_hidden_size=24, classifier_dropout_prob=0.0, **kwargs)


def hf_segformer(**kwargs):
    from transformers import SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(_segformer_config(**kwargs))


def hf_segformer_model():
    from transformers import SegformerModel

    return SegformerModel(_segformer_config())


def hf_segformer_classifier():
    from transformers import SegformerForImageClassification

    return SegformerForImageClassification(_segformer_config())


def smp_segformer():
    import segmentation_models_pytorch as smp

    return smp.Segformer("mit_b0", encoder_weights=None, classes=3, decoder_segmentation_channels=32)


def smp_mit_encoder():
    """smp's MiT encoder class (the official module names) with a tiny config."""
    from functools import partial

    from segmentation_models_pytorch.encoders.mix_transformer import LayerNorm, MixVisionTransformerEncoder

    return MixVisionTransformerEncoder(
        out_channels=[3, 0, 16, 32, 40, 64], embed_dims=[16, 32, 40, 64], num_heads=[1, 2, 2, 4],
        mlp_ratios=[4, 4, 4, 4], qkv_bias=True, norm_layer=partial(LayerNorm, eps=1e-6), depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1])


def smp_unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("mit_b0", encoder_weights=None, classes=2, decoder_channels=(32, 16, 8, 8, 8))


# name -> (builder, sizes); HF's PVT v1 runs only at its configured image size.
HOSTS = {
    "timm": (timm_pvt_v2, SIZES),
    "timm-li": (lambda: timm_pvt_v2(linear=True), SIZES),
    "hf-pvt-v2": (hf_pvt_v2, SIZES),
    "hf-pvt-v2-li": (lambda: hf_pvt_v2(linear=True), SIZES),
    "hf-pvt-v2-backbone": (hf_pvt_v2_backbone, SIZES),
    "hf-pvt-v1": (hf_pvt_v1, [(64, 64)]),
    "hf-segformer": (hf_segformer, SIZES),
    "hf-segformer-model": (hf_segformer_model, SIZES[:1]),
    "hf-segformer-classifier": (hf_segformer_classifier, SIZES[:1]),
    "smp-segformer": (smp_segformer, SIZES[1:2]),  # smp's Segformer wants sides divisible by 32
    "smp-mit-encoder": (smp_mit_encoder, SIZES),
    "smp-unet": (smp_unet, [(64, 96)]),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return no_dropout(HOSTS[name][0]())
