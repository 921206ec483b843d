"""What every accelerated host block shares: role paths, structure checks, the binding kept on the module,
reading the host forward's arguments, and handing a call back to the host's own forward."""
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTRIBUTE = "_pvt_fast"  # where an accelerated module keeps its Binding


class Unsupported(Exception):
    """A module with a PVT block's structure that the op table cannot compute exactly (the reason says why)."""


def require(ok, reason):
    if not ok:
        raise Unsupported(reason)


def get(module, path):
    """The object at the dotted ``path`` below ``module``, or None where any step is missing."""
    obj = module
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def present(obj):
    """An optional part counts as absent when missing, None or an Identity (the hosts use all three)."""
    return obj is not None and not isinstance(obj, nn.Identity)


def holds_only(module, paths):
    """True when ``module``, and every holder on the way down ``paths``, has no submodule, parameter or
    buffer other than those the paths name (so its forward has nothing else to compute with)."""
    tree = {}
    for path in paths:
        node = tree
        for name in path.split("."):
            node = node.setdefault(name, {})

    def visit(m, node):
        names = set(m._modules) | set(m._parameters) | set(m._buffers)
        if not names <= node.keys():
            return False
        return all(not sub or m._modules.get(name) is None or visit(m._modules[name], sub)
                   for name, sub in node.items())

    return visit(module, tree)


def check_layer_norm(norm, channels, what):
    require(isinstance(norm, nn.LayerNorm), f"{what} is a {type(norm).__name__}, not a LayerNorm")
    require(tuple(norm.normalized_shape) == (channels,) and norm.weight is not None and norm.bias is not None,
            f"{what} must normalize {channels} channels with a weight and a bias, got {norm}")


def check_conv(conv, what, *, groups=1):
    require(isinstance(conv, nn.Conv2d), f"{what} is a {type(conv).__name__}, not a Conv2d")
    square = conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
    require(square and not isinstance(conv.padding, str) and conv.padding[0] == conv.padding[1]
            and conv.dilation == (1, 1) and conv.groups == groups and conv.padding_mode == "zeros"
            and conv.bias is not None,
            f"{what} must be a square, symmetric, undilated, zero-padded Conv2d with a bias and groups={groups}, "
            f"got {conv}")


def computes_gelu(act):
    """True when ``act`` computes the exact (erf) GELU, read from probe values: the hosts hold it as
    nn.GELU, as an activation wrapper, or as a plain function."""
    if not callable(act) or (isinstance(act, nn.Module) and (list(act.parameters()) or list(act.buffers()))):
        return False
    probe = torch.linspace(-6.0, 6.0, 97)
    try:
        out = act(probe.clone())
    except Exception:  # anything that cannot take a CPU tensor is not the GELU we compute
        return False
    return isinstance(out, torch.Tensor) and torch.equal(out, F.gelu(probe))


def has_hooks(module):
    """Hooks registered on ``module`` (an activation may also be a plain function: it has none)."""
    return isinstance(module, nn.Module) and bool(module._forward_hooks or module._forward_pre_hooks
                                                  or module._backward_hooks or module._backward_pre_hooks)


@dataclass(frozen=True)
class Signature:
    """The host forward's parameters (``self`` excluded): names that may come positionally, names that may
    come by keyword, how many have no default, whether it takes ``**kwargs``."""
    positional: tuple
    keywords: frozenset
    required: int
    var_kwargs: bool

    @classmethod
    def of(cls, module):
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
        kinds = inspect.Parameter
        require(not any(p.kind == kinds.VAR_POSITIONAL for p in params),
                f"{type(module).__name__}.forward takes *args")
        positional = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
        keywords = frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY))
        required = sum(1 for p in params if p.default is kinds.empty and p.kind != kinds.VAR_KEYWORD)
        return cls(positional, keywords, required, any(p.kind == kinds.VAR_KEYWORD for p in params))

    def bind(self, args, kwargs):
        """The arguments by name, or None when they do not fit (the host's forward then raises its own error)."""
        if len(args) > len(self.positional):
            return None
        values = dict(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in values or not (name in self.keywords or self.var_kwargs):
                return None
            values[name] = value
        if any(name not in values for name in self.positional[:self.required]):
            return None
        return values


@dataclass(frozen=True)
class Binding:
    """What an accelerated module keeps (as ``module._pvt_fast``): its kind, its family's parts, the op table,
    the host forward's signature, the submodules the op table computes in their place, and a detail (the
    K/V reduction, the patch embedding's output layout)."""
    kind: str
    parts: object
    signature: Signature
    fused: tuple
    detail: str = ""
    ops: object = None

    def arguments(self, module, args, kwargs, host_options=()):
        """The call's arguments by name, or None when the host's forward must run it: arguments that do not
        fit, a host option that is set (as an argument or in the module's ``config``), or hooks on a
        submodule whose work the op table does (they would not fire)."""
        values = self.signature.bind(args, kwargs)
        if values is None:
            return None
        config = getattr(module, "config", None)
        for option in host_options:
            value = values[option] if option in values else getattr(config, option, None)
            if value is not None and value is not False:
                return None
        if any(has_hooks(get(module, path)) for path in self.fused):
            return None
        return values

    def grid(self, values):
        """(x, H, W) from arguments (x, H, W) or (x, (H, W))."""
        names = self.signature.positional
        if self.signature.required == 2:
            H, W = values[names[1]]
        else:
            H, W = values[names[1]], values[names[2]]
        return values[names[0]], H, W


def host_forward(module, args, kwargs):
    return type(module).forward(module, *args, **kwargs)
