"""The ``fused`` op table: Triton kernels for attention, K/V reduction and the v2 MLP middle, and the
CUDA patch embedding (each a ``torch.library`` custom op in the ``pvt_fast`` namespace).

The ops run on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the patch embedding,
which is not Triton, runs its PyTorch composite on the CPU). While a model is being exported (torch.export,
``torch.onnx.export(..., dynamo=True)``) every op computes the ``sdpa`` backend's composite instead: an
exported graph holds standard aten ops that ONNX and other runtimes know, at every input size."""
import functools

import torch

from pvt_fast.ops import eager, mlp_dwconv, patch_embed, reduce_kv, sra_attention


def _composite_while_exporting(fused, composite):
    """``fused``, or ``composite`` (same signature) while ``torch.compiler.is_exporting()``."""
    @functools.wraps(fused)
    def op(*args, **kwargs):
        if torch.compiler.is_exporting():
            return composite(*args, **kwargs)
        return fused(*args, **kwargs)
    return op


@functools.cache
def fused_table():
    """The one ``fused`` table (every model and accelerated host module shares it)."""
    from pvt_fast.ops import BackendOps

    return BackendOps(
        name="fused",
        patch_embed=_composite_while_exporting(patch_embed.patch_embed, eager.patch_embed_sdpa),
        reduce_kv=_composite_while_exporting(reduce_kv.reduce_kv, eager.reduce_kv_sdpa),
        reduce_kv_linear=_composite_while_exporting(reduce_kv.reduce_kv_linear, eager.reduce_kv_linear_sdpa),
        attention=_composite_while_exporting(sra_attention.attention, eager.attention_sdpa),
        dwconv_gelu=_composite_while_exporting(mlp_dwconv.dwconv_gelu, eager.dwconv_gelu_sdpa),
        linear=eager.linear_sdpa,
    )
