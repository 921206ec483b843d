"""The ``fused`` op table: Triton kernels for attention, K/V reduction and the v2 MLP middle, and the
CUDA patch embedding (each a ``torch.library`` custom op in the ``pvt_fast`` namespace).

The ops run on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the patch embedding,
which is not Triton, runs its PyTorch composite on the CPU)."""
from pvt_fast.ops import mlp_dwconv, patch_embed, reduce_kv, sra_attention


def fused_table():
    from pvt_fast.ops import BackendOps

    return BackendOps(
        name="fused",
        patch_embed=patch_embed.patch_embed,
        reduce_kv=reduce_kv.reduce_kv,
        reduce_kv_linear=reduce_kv.reduce_kv_linear,
        attention=sra_attention.attention,
        dwconv_gelu=mlp_dwconv.dwconv_gelu,
    )
