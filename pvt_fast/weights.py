"""Load official, timm and Hugging Face PVT checkpoints into pvt_fast models; convert between their key layouts.

Formats, told apart by their keys (:func:`detect_format`):

``official``   whai362/PVT classification keys, which are pvt_fast's own: ``patch_embed{i}``, ``pos_embed{i}``
               and ``cls_token`` (v1), ``block{i}.{j}`` with ``attn.q`` / ``attn.kv`` (K rows first) /
               ``attn.sr`` / ``attn.norm`` / ``mlp.fc1`` / ``mlp.dwconv.dwconv`` / ``mlp.fc2``, ``norm`` (v1) or
               ``norm{i}`` (v2), ``head``.
``timm``       timm's ``pvt_v2_*``: ``patch_embed``, ``stages.{i}.downsample`` (stages 2-4), ``stages.{i}.blocks.{j}``
               with ``mlp.dwconv``, ``stages.{i}.norm``; the reverse of timm's ``checkpoint_filter_fn``.
``hf_pvt``     transformers ``PvtModel`` / ``PvtForImageClassification`` (v1): ``pvt.encoder.patch_embeddings.{i}``
               (``projection``, ``layer_norm``, ``position_embeddings``, ``cls_token`` in the last stage),
               ``pvt.encoder.block.{i}.{j}`` (``attention.self.query/key/value/sequence_reduction/layer_norm``,
               ``attention.output.dense``, ``layer_norm_1/2``, ``mlp.dense1/2``), ``pvt.encoder.layer_norm``,
               ``classifier``.
``hf_pvt_v2``  transformers ``PvtV2Model`` / ``PvtV2ForImageClassification`` / ``PvtV2Backbone``:
               ``pvt_v2.encoder.layers.{i}`` (``patch_embedding.proj/layer_norm``, ``blocks.{j}`` as in v1 but
               ``attention.proj`` and ``attention.spatial_reduction``, ``layer_norm``), ``classifier``.
               The bare models' keys have no ``pvt.`` / ``pvt_v2.`` prefix; both forms are read.

Hugging Face keeps keys and values apart (``key``, ``value``); the official ``kv`` is their concatenation,
keys first. Hugging Face uses one LayerNorm eps (``config.layer_norm_eps``, 1e-6) everywhere, where the
official patch-embedding and spatial-reduction norms use PyTorch's 1e-5: loading a Hugging Face checkpoint
therefore also sets that eps on the model's LayerNorms, so the model reproduces the Hugging Face outputs,
and a later official or timm checkpoint puts the construction eps back (see :func:`load_pretrained`).
"""
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

from pvt_fast.models.pvt import resize_pos_embed

HF_EPS = 1e-6
FORMATS = ("official", "timm", "hf_pvt", "hf_pvt_v2")
_HF_PREFIX = {"hf_pvt": "pvt.", "hf_pvt_v2": "pvt_v2."}
_SHOWN_PER_LIST = 12
_WRAPPERS = ("model", "state_dict", "state_dict_ema", "model_ema")
# Set on a LayerNorm when a Hugging Face load first changes its eps: the eps the model was built with.
_CONSTRUCTION_EPS = "pvt_fast_construction_eps"


class _KeyMap:
    """Pairs of key templates (official, foreign), tried in order: the first template that matches the start
    of a key renames that part and keeps the rest (``weight``, ``bias``, ...); keys no template matches pass
    unchanged. ``{S}`` is the official 1-based stage number, ``{s}`` the 0-based stage index, ``{b}`` the block.
    """

    _FIELD = re.compile(r"\{([Ssb])\}")

    def __init__(self, pairs):
        self._pairs = [(official, foreign, self._regex(official), self._regex(foreign)) for official, foreign in pairs]

    @classmethod
    def _regex(cls, template):
        parts = cls._FIELD.split(template)
        return re.compile("".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts)))

    def rename(self, key, to_official, **fields):
        for official, foreign, official_re, foreign_re in self._pairs:
            match = (foreign_re if to_official else official_re).match(key)
            if match is None:
                continue
            found = {name: int(value) for name, value in match.groupdict().items()}
            if "S" in found:
                found["s"] = found["S"] - 1
            if "s" in found:
                found["S"] = found["s"] + 1
            return (official if to_official else foreign).format(**{**fields, **found}) + key[match.end():]
        return key

    def convert(self, state_dict, to_official, **fields):
        return {self.rename(k, to_official, **fields): v for k, v in state_dict.items()}


_TIMM = _KeyMap([
    ("patch_embed1.", "patch_embed."),
    ("patch_embed{S}.", "stages.{s}.downsample."),
    ("block{S}.{b}.mlp.dwconv.dwconv.", "stages.{s}.blocks.{b}.mlp.dwconv."),
    ("block{S}.{b}.", "stages.{s}.blocks.{b}."),
    ("norm{S}.", "stages.{s}.norm."),
])

# attn.k / attn.v: the two halves of the official attn.kv, split and merged by _split_kv / _merge_kv.
_HF_BLOCK = {"norm1.": "layer_norm_1.", "norm2.": "layer_norm_2.", "mlp.fc1.": "mlp.dense1.",
             "mlp.fc2.": "mlp.dense2."}
_HF_V1 = _KeyMap([
    ("patch_embed{S}.proj.", "encoder.patch_embeddings.{s}.projection."),
    ("patch_embed{S}.norm.", "encoder.patch_embeddings.{s}.layer_norm."),
    ("pos_embed{S}", "encoder.patch_embeddings.{s}.position_embeddings"),
    ("cls_token", "encoder.patch_embeddings.{s}.cls_token"),
    *(("block{S}.{b}." + official, "encoder.block.{s}.{b}." + foreign) for official, foreign in {
        **_HF_BLOCK, "attn.q.": "attention.self.query.", "attn.k.": "attention.self.key.",
        "attn.v.": "attention.self.value.", "attn.sr.": "attention.self.sequence_reduction.",
        "attn.norm.": "attention.self.layer_norm.", "attn.proj.": "attention.output.dense."}.items()),
    ("norm.", "encoder.layer_norm."),
    ("head.", "classifier."),
])
_HF_V2 = _KeyMap([
    ("patch_embed{S}.proj.", "encoder.layers.{s}.patch_embedding.proj."),
    ("patch_embed{S}.norm.", "encoder.layers.{s}.patch_embedding.layer_norm."),
    *(("block{S}.{b}." + official, "encoder.layers.{s}.blocks.{b}." + foreign) for official, foreign in {
        **_HF_BLOCK, "attn.q.": "attention.query.", "attn.k.": "attention.key.", "attn.v.": "attention.value.",
        "attn.sr.": "attention.spatial_reduction.", "attn.norm.": "attention.layer_norm.",
        "attn.proj.": "attention.proj.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv."}.items()),
    ("norm{S}.", "encoder.layers.{s}.layer_norm."),
    ("head.", "classifier."),
])


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did.

    format:     the detected checkpoint format (one of :data:`FORMATS`).
    loaded:     the model's state_dict keys filled from the checkpoint.
    resized:    ``(key, checkpoint grid, model grid)`` for every v1 position embedding resized on load.
    eps:        ``(module name, old eps, new eps)`` for every LayerNorm whose eps was changed: set to the
                checkpoint's (Hugging Face), or put back to the model's construction eps (official, timm,
                after an earlier Hugging Face load).
    missing, unexpected, mismatched: what did not fit (only non-empty with ``strict=False``); mismatched
                entries are ``(key, checkpoint shape, model shape)``, the checkpoint's "shape" being the
                type name (``"int"``) for an entry that is not a tensor.

    Its repr counts each list (b0 alone has 178 keys); the fields hold the lists and
    :meth:`details` writes them all out.
    """
    format: str
    loaded: tuple
    resized: tuple = ()
    eps: tuple = ()
    missing: tuple = ()
    unexpected: tuple = ()
    mismatched: tuple = ()

    def __repr__(self):
        counts = ", ".join(f"{name}={len(getattr(self, name))}" for name in self._fields[1:])
        return f"LoadReport(format={self.format!r}, {counts})"

    def details(self):
        """Every list in full, one entry a line."""
        return "\n".join([f"{self.format} checkpoint:",
                          *_listing("loaded", self.loaded),
                          *_listing("resized", [f"{k}: grid {old} -> {new}" for k, old, new in self.resized]),
                          *_listing("eps changed", [f"{name}: {old} -> {new}" for name, old, new in self.eps]),
                          *_listing("missing from the checkpoint", self.missing),
                          *_listing("unexpected in the checkpoint", self.unexpected),
                          *_listing("shape mismatch", _mismatch_lines(self.mismatched))])


def detect_format(state_dict):
    """The format of ``state_dict``'s keys: ``"timm"``, ``"hf_pvt"``, ``"hf_pvt_v2"``, else ``"official"``."""
    for key in state_dict:
        bare = re.sub(r"^(pvt|pvt_v2)\.", "", key)
        if bare.startswith("encoder.patch_embeddings."):
            return "hf_pvt"
        if bare.startswith("encoder.layers."):
            return "hf_pvt_v2"
        if key.startswith("stages."):
            return "timm"
    return "official"


def convert_to_timm(state_dict):
    """Official PVT v2 keys -> timm ``pvt_v2_*`` keys (what timm's ``checkpoint_filter_fn`` does)."""
    if "cls_token" in state_dict:
        raise ValueError("state_dict is a PVT v1 (it has cls_token); timm implements only PVT v2")
    return _TIMM.convert(state_dict, to_official=False)


def from_timm(state_dict):
    """timm ``pvt_v2_*`` keys -> official keys."""
    return _TIMM.convert(state_dict, to_official=True)


def convert_to_hf(state_dict):
    """Official keys -> the keys of transformers' ``PvtForImageClassification`` (v1, told by its ``pos_embed``
    keys) or ``PvtV2ForImageClassification`` (v2); ``attn.kv`` is split into ``key`` and ``value``. For the
    bare ``PvtModel`` / ``PvtV2Model``, drop the ``pvt.`` / ``pvt_v2.`` prefix and the classifier."""
    pos_stages = [int(m[1]) for m in (re.fullmatch(r"pos_embed(\d+)", k) for k in state_dict) if m]
    fmt = "hf_pvt" if pos_stages else "hf_pvt_v2"
    keymap = _HF_V1 if pos_stages else _HF_V2
    renamed = keymap.convert(_split_kv(state_dict), to_official=False, s=max(pos_stages, default=1) - 1)
    return {(_HF_PREFIX[fmt] + k if k.startswith("encoder.") else k): v for k, v in renamed.items()}


def from_hf(state_dict):
    """transformers PVT v1 / v2 keys (with or without the ``pvt.`` / ``pvt_v2.`` prefix) -> official keys;
    ``key`` and ``value`` are concatenated into ``attn.kv``."""
    fmt = detect_format(state_dict)
    if fmt not in _HF_PREFIX:
        raise ValueError(f"state_dict must have Hugging Face PVT keys (encoder.patch_embeddings.* or "
                         f"encoder.layers.*), got {_preview(state_dict)}")
    prefix = _HF_PREFIX[fmt]
    bare = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    keymap = _HF_V1 if fmt == "hf_pvt" else _HF_V2
    return _merge_kv(keymap.convert(bare, to_official=True))


def _split_kv(state_dict):
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn\.)kv\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        keys, values = value.chunk(2, dim=0)
        out[f"{match[1]}k.{match[2]}"], out[f"{match[1]}v.{match[2]}"] = keys.clone(), values.clone()
    return out


def _merge_kv(state_dict):
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn\.)([kv])\.(weight|bias)", key)
        partner = match and state_dict.get(f"{match[1]}{'v' if match[2] == 'k' else 'k'}.{match[3]}")
        if partner is None:
            out[key] = value
        elif match[2] == "k":
            out[f"{match[1]}kv.{match[3]}"] = torch.cat((value, partner), dim=0)
    return out


def _to_official(state_dict, fmt):
    if fmt == "timm":
        return from_timm(state_dict)
    if fmt in _HF_PREFIX:
        return from_hf(state_dict)
    return dict(state_dict)


def _preview(state_dict, n=5):
    keys = list(state_dict)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "") if keys else "no keys"


# --- reading ------------------------------------------------------------------------------------------


def _checkpoint_file(path):
    """A file path as given; for a directory (e.g. a ``save_pretrained`` folder) the weights file in it."""
    if not os.path.isdir(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in directory {path}")


def _not_a_checkpoint(path, error):
    return ValueError(f"{path} is not a PyTorch (.pth / .bin) or safetensors checkpoint (reading it raised "
                      f"{type(error).__name__}, see above)")


def _starts_like_torch_save(path):
    """Whether the file begins as ``torch.save`` writes: a zip archive, or (the legacy format) a pickle of
    protocol 2 or more."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _read_state_dict(path, map_location):
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device=str(map_location))
        except SafetensorError as error:
            raise _not_a_checkpoint(path, error) from error
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (KeyError, EOFError, pickle.UnpicklingError) as error:  # a text or empty file raises any of these
        if not (isinstance(error, pickle.UnpicklingError) and _starts_like_torch_save(path)):
            raise _not_a_checkpoint(path, error) from error
        raise pickle.UnpicklingError(
            f"{path} holds objects other than tensors and containers, which torch.load(weights_only=True) "
            f"refuses; if you trust the file, load it yourself and pass the state_dict instead. {error}") from error
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint {path} must hold a state_dict (a mapping), got {type(checkpoint).__name__}")
    return checkpoint


def _unwrap(checkpoint):
    """The state_dict inside a training checkpoint, without a DDP ``module.`` prefix: the first mapping among
    ``model``, ``state_dict`` (official / DeiT, timm), ``state_dict_ema``, ``model_ema`` (their EMA weights,
    taken only from a file without plain weights)."""
    for wrapper in _WRAPPERS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _hf_config_eps(path):
    """``layer_norm_eps`` from a ``config.json`` beside the checkpoint file, or None."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("layer_norm_eps")


# --- fitting the model ----------------------------------------------------------------------------------


def _resize_pos_embeds(model, state_dict, shapes):
    """Resize v1 ``pos_embed{i}`` made on another grid to the model's construction grid, in place.

    The checkpoint's grid is inferred from the tensor: the token count, less the cls slot where the model's
    embedding has one (the last stage), must be a square (side = sqrt). Embeddings that cannot be resized
    that way are left as they are and reported as mis-shaped.
    """
    resized = []
    for key, value in list(state_dict.items()):
        match = re.fullmatch(r"pos_embed(\d+)", key)
        if (match is None or key not in shapes or not isinstance(value, torch.Tensor)
                or value.shape == shapes[key] or value.dim() != 3):
            continue
        patch_embed = getattr(model, f"patch_embed{match[1]}", None)
        if patch_embed is None or value.shape[2] != shapes[key][2]:
            continue
        H, W = patch_embed.H, patch_embed.W
        extra = shapes[key][1] - H * W
        side = math.isqrt(max(value.shape[1] - extra, 0))
        if extra not in (0, 1) or side * side != value.shape[1] - extra or side == 0:
            continue
        grid = resize_pos_embed(value[:, extra:].float(), (side, side), (H, W)).to(value.dtype)
        state_dict[key] = torch.cat((value[:, :extra], grid), dim=1)
        resized.append((key, (side, side), (H, W)))
    return tuple(resized)


def _shape(value):
    """A tensor's shape; the type name of anything else (a training checkpoint's ``epoch``, ``optimizer``)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _described(value):
    shape = _shape(value)
    return f"({shape}, not a tensor)" if isinstance(shape, str) else str(shape)


def _listing(title, lines, shown=None):
    """``title (count):`` and the first ``shown`` lines (all when None), indented; nothing for no lines."""
    if not lines:
        return []
    head = list(lines[:shown])
    more = [f"    ... and {len(lines) - len(head)} more"] if len(lines) > len(head) else []
    return [f"  {title} ({len(lines)}):", *(f"    {line}" for line in head), *more]


def _mismatch_lines(mismatched):
    return [f"{key}: checkpoint {checkpoint}, model {model}" for key, checkpoint, model in mismatched]


def _mismatch_message(source, fmt, model, missing, unexpected, mismatched, shapes, state_dict):
    lines = [f"checkpoint {source} ({fmt} format) does not fit {type(model).__name__}:",
             *_listing("missing from the checkpoint", [f"{k} {shapes[k]}" for k in missing], _SHOWN_PER_LIST),
             *_listing("unexpected in the checkpoint", [f"{k} {_described(state_dict[k])}" for k in unexpected],
                       _SHOWN_PER_LIST),
             *_listing("shape mismatch", _mismatch_lines(mismatched), _SHOWN_PER_LIST)]
    if any(k.startswith("pos_embed") for k, _, _ in mismatched):
        lines.append("  (position embeddings are resized only from a square grid: sqrt of the token count)")
    lines.append("pass strict=False to load only the keys that fit")
    return "\n".join(lines)


def _set_layer_norm_eps(model, eps):
    """Give every LayerNorm ``eps`` (None: its construction eps, kept by the first change); the changes."""
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        new = getattr(module, _CONSTRUCTION_EPS, module.eps) if eps is None else eps
        if module.eps != new:
            if not hasattr(module, _CONSTRUCTION_EPS):
                setattr(module, _CONSTRUCTION_EPS, module.eps)
            changed.append((name, module.eps, new))
            module.eps = new
    return tuple(changed)


def load_pretrained(model, checkpoint, *, strict=True, map_location="cpu", hf_eps=None):
    """Load an official, timm or Hugging Face PVT checkpoint into ``model`` and return a :class:`LoadReport`.

    ``checkpoint``: a ``.pth`` / ``.bin`` file (read with ``torch.load(weights_only=True)``), a
    ``.safetensors`` file, a directory holding ``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face
    ``save_pretrained`` folder), or an already loaded mapping. A raw state_dict or one wrapped as
    ``{'model': ...}`` / ``{'state_dict': ...}`` (or, when there are no plain weights, ``{'state_dict_ema': ...}``
    / ``{'model_ema': ...}``); a DDP ``module.`` prefix is dropped. The format is detected from the keys
    (:func:`detect_format`) and converted to official keys. A file that is neither a PyTorch nor a
    safetensors checkpoint raises a ValueError naming it.

    v1 position embeddings made at another image size are resized (bilinear, ``align_corners=False``, the
    last stage's cls slot split off and re-attached) from the checkpoint's grid, inferred as the square root
    of the token count, to the model's construction grid (``patch_embed{i}.H, .W``), i.e. the same
    interpolation the model would do at run time.

    Hugging Face checkpoints: every LayerNorm of the model gets the checkpoint's eps, ``hf_eps`` when given,
    else ``layer_norm_eps`` from a ``config.json`` beside the file, else 1e-6 (:data:`HF_EPS`). Hugging Face
    uses that one eps everywhere, so for the official variants this changes the patch-embedding and
    spatial-reduction norms (``patch_embed{i}.norm``, ``block{i}.{j}.attn.norm``) from 1e-5, and the model then
    reproduces the Hugging Face outputs; ``LoadReport.eps`` lists each change. Hugging Face's v1 itself runs
    only at its configured image size. Each LayerNorm remembers the eps it was built with, and an official or
    timm checkpoint loaded later puts it back (also listed in ``LoadReport.eps``).

    ``strict=True`` raises a RuntimeError listing the missing, unexpected and mis-shaped keys (with shapes),
    leaving the model untouched; ``strict=False`` loads the keys that fit and reports the others.
    """
    if isinstance(checkpoint, Mapping):
        path, source, state_dict = None, "(mapping)", _unwrap(checkpoint)
    else:
        path = _checkpoint_file(os.fspath(checkpoint))
        source, state_dict = repr(path), _unwrap(_read_state_dict(path, map_location))
    fmt = detect_format(state_dict)
    if hf_eps is not None and fmt not in _HF_PREFIX:
        raise ValueError(f"hf_eps applies to Hugging Face checkpoints only, got a {fmt} checkpoint {source}")
    if fmt in _HF_PREFIX and hf_eps is None:
        hf_eps = (_hf_config_eps(path) if path else None) or HF_EPS
    state_dict = _to_official(state_dict, fmt)

    shapes = {k: _shape(v) for k, v in model.state_dict().items()}
    resized = _resize_pos_embeds(model, state_dict, shapes)
    missing = tuple(k for k in shapes if k not in state_dict)
    unexpected = tuple(k for k in state_dict if k not in shapes)
    mismatched = tuple((k, _shape(v), shapes[k]) for k, v in state_dict.items()
                       if k in shapes and _shape(v) != shapes[k])
    if strict and (missing or unexpected or mismatched):
        raise RuntimeError(_mismatch_message(source, fmt, model, missing, unexpected, mismatched, shapes,
                                             state_dict))

    bad = {k for k, _, _ in mismatched}
    fitting = {k: v for k, v in state_dict.items() if k in shapes and k not in bad}
    model.load_state_dict(fitting, strict=False)
    eps = _set_layer_norm_eps(model, hf_eps if fmt in _HF_PREFIX else None)
    return LoadReport(fmt, tuple(fitting), resized, eps, missing, unexpected, mismatched)


__all__ = ["FORMATS", "HF_EPS", "LoadReport", "convert_to_hf", "convert_to_timm", "detect_format", "from_hf",
           "from_timm", "load_pretrained"]
