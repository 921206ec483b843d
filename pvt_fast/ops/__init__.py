"""The ops every pvt_fast module calls, one table per backend.

A model asks :func:`get_backend_ops` once, at construction, and keeps the table; nothing is decided
again inside ``forward``. Every table has the same functions with the signatures documented in
:mod:`pvt_fast.ops.eager`.
"""
from dataclasses import dataclass
from typing import Callable

from pvt_fast._backend import BACKENDS, resolve_backend
from pvt_fast.ops import eager


@dataclass(frozen=True)
class BackendOps:
    name: str
    patch_embed: Callable
    reduce_kv: Callable
    reduce_kv_linear: Callable
    attention: Callable
    dwconv_gelu: Callable
    linear: Callable


def _eager_table(name):
    return BackendOps(
        name=name,
        patch_embed=getattr(eager, f"patch_embed_{name}"),
        reduce_kv=getattr(eager, f"reduce_kv_{name}"),
        reduce_kv_linear=getattr(eager, f"reduce_kv_linear_{name}"),
        attention=getattr(eager, f"attention_{name}"),
        dwconv_gelu=getattr(eager, f"dwconv_gelu_{name}"),
        linear=getattr(eager, f"linear_{name}"),
    )


def _fused_table(attn_dropout):
    from pvt_fast.ops.fused import fused_table

    table = fused_table()
    if attn_dropout > 0:
        # The Triton attention has no dropout; such models attend through SDPA (decided here, once).
        table = BackendOps(**{**table.__dict__, "attention": eager.attention_sdpa})
    return table


def get_backend_ops(backend="auto", attn_dropout=0.0):
    """The op table for ``backend`` (resolved with :func:`pvt_fast.resolve_backend`)."""
    name = resolve_backend(backend)
    if name == "fused":
        return _fused_table(attn_dropout)
    return _eager_table(name)


__all__ = ["BACKENDS", "BackendOps", "get_backend_ops", "resolve_backend"]
