"""The ``fused`` op table: Triton kernels for attention, K/V reduction and the v2 MLP middle, and the
CUDA patch embedding (each a ``torch.library`` custom op in the ``pvt_fast`` namespace)."""
import importlib

_OP_MODULES = ("sra_attention", "reduce_kv", "patch_embed", "mlp_dwconv")


def fused_table():
    from pvt_fast.ops import BackendOps

    modules = {}
    for name in _OP_MODULES:
        try:
            modules[name] = importlib.import_module(f"pvt_fast.ops.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pvt_fast.ops.{name}":
                raise
            raise NotImplementedError(
                f"backend='fused' is not available yet: the op module pvt_fast.ops.{name} does not exist; "
                "use backend='sdpa' or 'reference'"
            ) from None
    return BackendOps(
        name="fused",
        patch_embed=modules["patch_embed"].patch_embed,
        reduce_kv=modules["reduce_kv"].reduce_kv,
        reduce_kv_linear=modules["reduce_kv"].reduce_kv_linear,
        attention=modules["sra_attention"].attention,
        dwconv_gelu=modules["mlp_dwconv"].dwconv_gelu,
    )
