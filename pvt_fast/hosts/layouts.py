"""Where each host family keeps the parts of a PVT block: one table-like description per family.

A description maps roles onto attribute paths of the host's module (dotted for nested modules, a tuple for
alternatives tried in order). :mod:`pvt_fast.hosts.blocks` and :mod:`pvt_fast.hosts.decode_head` check the
structure behind those names (module types, shapes, that the block holds nothing else) before a block is
accelerated; nothing here imports a host library. Adding a family means adding one description here and its
test in ``tests/test_accelerate.py``.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionParts:
    """Spatial-reduction attention: softmax(q k^T * scale) v over keys/values of the reduced tokens."""
    q: str                      # Linear C -> C
    kv: tuple                   # ("kv",): one Linear C -> 2C, K first; (key, value): two Linears C -> C
    proj: str | None            # output Linear C -> C; None where the host applies it outside this module
    proj_drop: str | None       # Dropout after proj
    attn_drop: str              # an nn.Dropout, or a float attribute: dropout on the attention probabilities
    sr: str                     # strided Conv2d (k == stride) of the reduction, the 1x1 Conv2d of v2-li, or absent
    norm: str                   # the LayerNorm after sr
    pool: str | None            # v2-li: AdaptiveAvgPool2d(7) before sr
    act: str | None             # v2-li: GELU after norm
    num_heads: str              # int attribute
    scale: str | None           # float attribute holding the softmax scale; None: head_dim ** -0.5
    returns: str                # "tensor"; "tuple": (out,); "pair": (out, None)
    host_options: tuple = ()    # arguments (or, when not passed, same-named attributes of the module's
                                # ``config``) that, when set, send the call to the host's own forward


@dataclass(frozen=True)
class MlpParts:
    """The v2 / Mix-FFN MLP: fc1 -> [ReLU] -> depthwise 3x3 -> GELU -> drop -> fc2 -> drop."""
    fc1: str
    dwconv: tuple               # alternatives: the depthwise Conv2d, directly or inside a holder
    act: str                    # must compute GELU exactly (checked on probe values)
    relu: str | None            # v2-li: ReLU before the depthwise conv (absent or Identity otherwise)
    drop: str                   # Dropout (applied twice, as the hosts do)
    fc2: str


@dataclass(frozen=True)
class PositionParts:
    """Hugging Face PVT v1 patch embeddings: position embeddings (resized by the host's method), a cls token
    in the last stage, dropout."""
    position: str
    cls_token: str
    resize: str
    drop: str


@dataclass(frozen=True)
class PatchEmbedParts:
    """Conv2d + LayerNorm over channels. What the host returns (NHWC map, NCHW map, (tokens, H, W) or
    (tokens, (H, W))) is read from one tiny call of its forward; with ``position`` the host's position
    embeddings follow and (tokens, H, W) is returned."""
    proj: str
    norm: str
    position: PositionParts | None = None


@dataclass(frozen=True)
class DecodeHeadParts:
    """SegFormer's all-MLP head: per-stage Linear -> bilinear upsample -> concat -> 1x1 fuse conv -> the rest.

    ``inputs`` names how the forward's argument becomes the stage maps: ``"stages"`` (Hugging Face: the
    stage maps in stage order, upsampled to the first one's size, concatenated in reverse stage order) or
    ``"smp"`` (segmentation_models_pytorch: the encoder's feature list, image first, concatenated deepest
    first, upsampled to a quarter of the image)."""
    projections: str            # ModuleList, one holder per stage
    linear: str                 # the Linear inside each holder
    fuse: str                   # the 1x1 Conv2d, or a Sequential that starts with it
    after: tuple                # modules applied after the fuse conv, in order (empty: the rest of ``fuse``)
    inputs: str


@dataclass(frozen=True)
class Family:
    name: str
    attention: AttentionParts | None = None
    mlp: MlpParts | None = None
    patch_embed: PatchEmbedParts | None = None
    decode_head: DecodeHeadParts | None = None


# The official whai362/PVT classes (classification, detection, segmentation), timm's pvt_v2 and
# segmentation_models_pytorch's MiT share these names; they differ in the forward's arguments ((x, H, W)
# or (x, feat_size)), read from its signature, and in what the patch embedding returns, read from a probe.
QKV = Family(
    "q/kv (official, timm, smp)",
    attention=AttentionParts(q="q", kv=("kv",), proj="proj", proj_drop="proj_drop", attn_drop="attn_drop",
                             sr="sr", norm="norm", pool="pool", act="act", num_heads="num_heads", scale="scale",
                             returns="tensor"),
    mlp=MlpParts(fc1="fc1", dwconv=("dwconv.dwconv", "dwconv"), act="act", relu="relu", drop="drop", fc2="fc2"),
    patch_embed=PatchEmbedParts(proj="proj", norm="norm"),
)

HF_PVT_V2 = Family(
    "Hugging Face PvtV2",
    attention=AttentionParts(q="query", kv=("key", "value"), proj="proj", proj_drop="proj_drop",
                             attn_drop="attn_drop", sr="spatial_reduction", norm="layer_norm", pool="pool",
                             act="act", num_heads="num_attention_heads", scale=None, returns="tuple",
                             host_options=("output_attentions",)),
    mlp=MlpParts(fc1="dense1", dwconv=("dwconv.dwconv",), act="intermediate_act_fn", relu="relu",
                 drop="dropout", fc2="dense2"),
    patch_embed=PatchEmbedParts(proj="proj", norm="layer_norm"),
)

HF_PVT = Family(
    "Hugging Face Pvt (v1)",
    attention=AttentionParts(q="query", kv=("key", "value"), proj=None, proj_drop=None, attn_drop="dropout",
                             sr="sequence_reduction", norm="layer_norm", pool=None, act=None,
                             num_heads="num_attention_heads", scale=None, returns="tuple",
                             host_options=("output_attentions",)),
    patch_embed=PatchEmbedParts(proj="projection", norm="layer_norm", position=PositionParts(
        position="position_embeddings", cls_token="cls_token", resize="interpolate_pos_encoding", drop="dropout")),
)

HF_SEGFORMER = Family(
    "Hugging Face Segformer",
    attention=AttentionParts(q="q_proj", kv=("k_proj", "v_proj"), proj="o_proj", proj_drop=None,
                             attn_drop="attention_dropout", sr="sequence_reduction.sequence_reduction",
                             norm="sequence_reduction.layer_norm", pool=None, act=None,
                             num_heads="num_attention_heads", scale="scaling", returns="pair",
                             host_options=("attention_mask", "output_attentions")),
    mlp=MlpParts(fc1="fc1", dwconv=("dwconv.dwconv",), act="activation_fn", relu=None, drop="dropout", fc2="fc2"),
    patch_embed=PatchEmbedParts(proj="proj", norm="layer_norm"),
    decode_head=DecodeHeadParts(projections="linear_projections", linear="proj", fuse="linear_fuse",
                                after=("batch_norm", "activation", "dropout", "classifier"), inputs="stages"),
)

# transformers 4.x: the attention of Hugging Face's PVT v1 with ``sr`` for the reduction (its output Linear sits
# outside, in ``SegformerSelfOutput``), the decode head's projections under ``linear_c``; its Mix-FFN has
# HF_PVT_V2's names and patch embeddings HF_SEGFORMER's, matched there.
HF_SEGFORMER_4 = Family(
    "Hugging Face Segformer (transformers 4.x)",
    attention=AttentionParts(q="query", kv=("key", "value"), proj=None, proj_drop=None, attn_drop="dropout",
                             sr="sr", norm="layer_norm", pool=None, act=None, num_heads="num_attention_heads",
                             scale=None, returns="tuple", host_options=("output_attentions",)),
    decode_head=DecodeHeadParts(projections="linear_c", linear="proj", fuse="linear_fuse",
                                after=("batch_norm", "activation", "dropout", "classifier"), inputs="stages"),
)

SMP_SEGFORMER = Family(
    "segmentation_models_pytorch Segformer decoder",
    decode_head=DecodeHeadParts(projections="mlp_stage", linear="linear", fuse="fuse_stage", after=(),
                                inputs="smp"),
)

FAMILIES = (QKV, HF_PVT_V2, HF_PVT, HF_SEGFORMER, HF_SEGFORMER_4, SMP_SEGFORMER)
