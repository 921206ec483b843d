"""``pvt_fast.accelerate(model)``: one walk over a model that finds its PVT-family blocks and binds them to
pvt_fast's op table.

Every module is offered to each family's parts (:mod:`pvt_fast.hosts.layouts`) and kind (attention, MLP,
patch embedding, decode head); the first match is bound and its subtree is not searched further. pvt_fast's
own models and layers are re-bound to the backend instead. The whole model is examined before anything is
changed, so a model without any recognizable block is left as it was.
"""
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field, replace

import torch.nn as nn

from pvt_fast._backend import resolve_backend
from pvt_fast.hosts.blocks import (MLP, PATCH_EMBED, SR_CONV, SR_NONE, SR_POOL, match_attention, match_mlp,
                                   match_patch_embed)
from pvt_fast.hosts.common import ATTRIBUTE, Unsupported
from pvt_fast.hosts.decode_head import match_decode_head
from pvt_fast.hosts.layouts import FAMILIES
from pvt_fast.ops import get_backend_ops

logger = logging.getLogger(__name__)

MATCHERS = (("attention", match_attention), ("mlp", match_mlp), ("patch_embed", match_patch_embed),
            ("decode_head", match_decode_head))
OWN = "pvt_fast"


@dataclass
class AccelerationSummary:
    """What :func:`accelerate` did, also kept as ``model.pvt_fast_summary``: blocks per kind, blocks per source
    package (the host class's top-level package; ``pvt_fast`` for our own models, re-bound), and the modules
    that look like PVT blocks but were left as they are, with the reason."""
    model: str
    backend: str
    counts: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)

    @property
    def total(self):
        return sum(self.counts.values())

    def __str__(self):
        lines = [f"pvt_fast.accelerate({self.model}, backend={self.backend!r}): {self.total} blocks"]
        lines += [f"  {kind:<28}{n:>5}" for kind, n in self.counts.items()]
        if self.sources:
            lines.append("  from " + ", ".join(f"{source} ({n})" for source, n in self.sources.items()))
        lines += [f"  left as is: {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def accelerate(model, backend="auto", verbose=False):
    """Make the PVT-family blocks of ``model`` compute through pvt_fast's op table for ``backend``, in place.

    Recognized by structure (no host library is imported): spatial-reduction attention (sr > 1, sr = 1 and
    v2-li's pool + 1x1 conv + LayerNorm + GELU), the v2 / Mix-FFN MLP and the patch embeddings of timm's
    ``pvt_v2``, Hugging Face ``Pvt*`` / ``PvtV2*`` / ``Segformer*``, segmentation_models_pytorch's MiT encoders
    and the official whai362/PVT classes; SegFormer's decode head (Hugging Face, smp) is folded (see
    :mod:`pvt_fast.hosts.decode_head`). pvt_fast's own models are switched to ``backend``
    (:meth:`~pvt_fast.models.base.PyramidBase.set_backend`).

    Only how ``forward`` computes changes: parameters (the same objects), names, ``state_dict``, buffers, the
    host's dropout / drop-path modules and hooks on the accelerated modules stay; hooks on a submodule whose
    work the op table takes over send that call to the host's forward, as do host options the op table does
    not compute (Hugging Face ``output_attentions``, an ``attention_mask``). Calling it again re-binds to
    ``backend``. Returns ``model``; the :class:`AccelerationSummary` is logged at INFO, printed when
    ``verbose``, and kept as ``model.pvt_fast_summary``. Raises ValueError naming the model's class when
    nothing is recognized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}")
    backend = resolve_backend(backend)
    summary = AccelerationSummary(type(model).__name__, backend)
    plan = []
    _find(model, "", plan, summary.skipped)
    if not plan:
        why = "".join(f"; {name} looks like one but {reason}" for name, reason in summary.skipped)
        raise ValueError(f"pvt_fast.accelerate found no PVT-family block in {type(model).__name__}{why}")
    for module, match in plan:
        if match is None:
            _rebind_own(module, backend, summary)
        else:
            _bind(module, match, backend, summary)
    model.pvt_fast_summary = summary
    logger.info("%s", summary)
    if verbose:
        print(summary)
    return model


def _find(module, name, plan, skipped):
    """Append ``(module, match)`` for every block below ``module`` (``match`` None: pvt_fast's own)."""
    if _is_own(module):
        plan.append((module, None))
        return
    reasons = []
    for family in FAMILIES:
        for kind, matcher in MATCHERS:
            parts = getattr(family, kind)
            if parts is None:
                continue
            try:
                found = matcher(module, parts)
            except Unsupported as why:
                reasons.append(str(why))
                continue
            if found is not None:
                plan.append((module, found))
                return
    if reasons:
        skipped.append((name or type(module).__name__, reasons[0]))
    for child_name, child in module.named_children():
        _find(child, f"{name}.{child_name}" if name else child_name, plan, skipped)


def _bind(module, match, backend, summary):
    forward, binding, attn_dropout = match
    binding = replace(binding, ops=get_backend_ops(backend, attn_dropout=attn_dropout))
    setattr(module, ATTRIBUTE, binding)
    # A partial rather than a bound method: it pickles (torch.save of the whole model) and deep-copies with
    # the module it belongs to.
    module.forward = functools.partial(forward, module)
    summary.counts[binding.kind] += 1
    summary.sources[type(module).__module__.partition(".")[0]] += 1


def _is_own(module):
    from pvt_fast.models import layers
    from pvt_fast.models.base import PyramidBase

    return isinstance(module, (PyramidBase, layers.Attention, layers.Mlp, layers.PatchEmbed))


def _rebind_own(module, backend, summary):
    from pvt_fast.models import layers
    from pvt_fast.models.base import PyramidBase

    if isinstance(module, PyramidBase):
        module.set_backend(backend)
    else:
        layers.bind_backend(module, backend)
    for m in module.modules():
        if isinstance(m, layers.Attention):
            kind = SR_POOL if m.linear else SR_CONV if m.sr_ratio > 1 else SR_NONE
        elif isinstance(m, layers.Mlp) and hasattr(m, "dwconv"):
            kind = MLP
        elif isinstance(m, layers.PatchEmbed):
            kind = PATCH_EMBED
        else:
            continue
        summary.counts[kind] += 1
        summary.sources[OWN] += 1
