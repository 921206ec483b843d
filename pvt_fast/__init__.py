"""pvt_fast: a faithful, fast Pyramid Vision Transformer (v1 and v2)."""
import torch

_MIN_TORCH = (2, 11)
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < _MIN_TORCH:
    raise ImportError(f"pvt_fast needs torch >= {'.'.join(map(str, _MIN_TORCH))}, found {torch.__version__}")

from pvt_fast._backend import BACKENDS, resolve_backend  # noqa: E402
from pvt_fast.hosts import AccelerationSummary, accelerate  # noqa: E402

__version__ = "0.1.0"
from pvt_fast.models import *  # noqa: E402,F401,F403
from pvt_fast.models import __all__ as _models_all  # noqa: E402

__all__ = ["BACKENDS", "AccelerationSummary", "accelerate", "resolve_backend", "load_pretrained", *_models_all]


def load_pretrained(model, path, **kwargs):
    """Load an official, timm or Hugging Face checkpoint into ``model``; see :mod:`pvt_fast.weights`."""
    from pvt_fast.weights import load_pretrained as _load
    return _load(model, path, **kwargs)
