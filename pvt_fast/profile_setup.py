"""What ``python -m pvt_fast profile`` profiles: its arguments checked and resolved, and the model built.

:func:`check_profile_args` checks every argument of :func:`pvt_fast.profiler.profile_model` before anything
runs and raises :class:`ProfileArgumentError` (which the CLI prints without a traceback) for the first bad one;
nothing falls back to another backend or device. :func:`build_model` is the one place a profiled model is made.
"""
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWEEP_SIZES = (224, 512, 1024, 2048, 4096, 8192)
CPU_CAP_ENV = "PVT_FAST_CPU_CAP_MIB"
DEFAULT_CPU_CAP_MIB = 2048


class ProfileArgumentError(ValueError):
    """A bad argument to :func:`pvt_fast.profiler.profile_model`."""


def model_names():
    """The names :func:`build_model` knows."""
    from pvt_fast.models import CONFIGS

    return list(CONFIGS)


def build_model(name, backend="reference", img_size=224, dtype=torch.float32, device="cpu"):
    """The model ``name`` on the concrete ``backend``, built for ``img_size`` x ``img_size``, in eval mode (on
    the ``meta`` device it allocates nothing)."""
    from pvt_fast.models import create_model

    if name not in model_names():
        raise ProfileArgumentError(f"model must be one of {', '.join(model_names())}, got {name!r}")
    with torch.device(device):
        model = create_model(name, backend=backend, img_size=img_size)
    return model.to(dtype=dtype).eval()


def cpu_cap_bytes():
    """The most bytes one baseline case (plain global attention, a CPU benchmark) may allocate on the CPU:
    ``PVT_FAST_CPU_CAP_MIB`` MiB, default 2048, so that a 2-core machine is not busy for minutes with it."""
    text = os.environ.get(CPU_CAP_ENV, "").strip()
    if not text:
        return DEFAULT_CPU_CAP_MIB * 2**20
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not mib > 0 or math.isinf(mib):
        raise ProfileArgumentError(f"{CPU_CAP_ENV} must be a positive number of MiB, got {text!r}")
    return int(mib * 2**20)


@dataclass(frozen=True)
class ProfileSetup:
    """The checked arguments of a profile, with the backends, device and sweep resolved."""
    name: str
    size: int
    batch: int
    dtype: str
    device: torch.device
    backend: str
    compare: str | None
    sweep: list
    repeat: int | None
    out_dir: Path

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def warmup(self):
        """Untimed passes first: CUDA must JIT and autotune; on the CPU the profiled pass is the warm-up."""
        return 2 if self.device.type == "cuda" else 0

    def runs_at(self, size):
        """Timed runs at ``size``: ``repeat``, else 10 on CUDA; on CPU 2 at the profile's size and 1 at the other
        sweep points, so that the README's CPU demo stays short."""
        return self.repeat or (10 if self.device.type == "cuda" else 2 if size == self.size else 1)


def _default_sweep(size, min_size):
    """224, 512, 1024, ... below ``size`` (or half of ``size`` when none fits), and ``size``."""
    sizes = [s for s in SWEEP_SIZES if min_size <= s < size]
    if not sizes:
        sizes = [max(min_size, size // 2)] if size // 2 >= min_size else []
    return sorted(set(sizes + [size]))


def resolve_device(device):
    """``device`` (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``) as a torch.device that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ProfileArgumentError(expected) from err
    if device.type not in ("cpu", "cuda"):
        raise ProfileArgumentError(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileArgumentError(f"device {str(device)!r} was asked for but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ProfileArgumentError(f"device {str(device)!r} was asked for but only {torch.cuda.device_count()} "
                                   "CUDA device(s) are visible")
    return device


def concrete_backend(argument, backend, device):
    """``backend`` (the value of ``argument``) as a concrete name; ``fused`` must be able to run on ``device``."""
    from pvt_fast import resolve_backend
    from pvt_fast._backend import ENV_VAR

    try:
        concrete = resolve_backend(backend)
    except ValueError as err:
        raise ProfileArgumentError(str(err)) from err
    if concrete == "fused" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = f" (from {ENV_VAR}={os.environ[ENV_VAR]})" if backend == "auto" and os.environ.get(ENV_VAR) else ""
        raise ProfileArgumentError(
            f"{argument} {backend!r} resolves to 'fused'{why}, which runs on CUDA, or on CPU only with "
            f"TRITON_INTERPRET=1 set; on device 'cpu' use --{argument} sdpa")
    return concrete


def _out_folder(out_dir):
    """``out_dir`` created if need be, once a file can be written in it."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ProfileArgumentError(f"out must be a folder that can be written, got {str(out_dir)!r} "
                                   f"({err.strerror or err})") from err
    return out_dir


def check_profile_args(name, size, out_dir, batch=1, dtype="fp32", backend="auto", compare="reference",
                       device="auto", sweep=None, repeat=None):
    """The arguments of :func:`pvt_fast.profiler.profile_model` as a :class:`ProfileSetup`, or a
    :class:`ProfileArgumentError` for the first bad one; ``out_dir`` is created last, once all others are good."""
    from pvt_fast import BACKENDS

    min_size = build_model(name, device="meta").min_input_size
    if dtype not in DTYPES:
        raise ProfileArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ProfileArgumentError(f"batch must be a positive integer, got {batch!r}")
    if repeat is not None and (not isinstance(repeat, int) or repeat < 1):
        raise ProfileArgumentError(f"repeat must be a positive integer, got {repeat!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ProfileArgumentError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {backend!r}")
    if compare is not None and compare not in BACKENDS:
        raise ProfileArgumentError(f"compare must be one of {', '.join(BACKENDS)} or None, got {compare!r}")
    if not isinstance(size, int) or size < min_size:
        raise ProfileArgumentError(f"size must be at least {name}'s min_input_size {min_size}, got {size!r}")
    cpu_cap_bytes()
    device = resolve_device(device)
    backend = concrete_backend("backend", backend, device)
    if compare is not None:
        compare = concrete_backend("compare", compare, device)
    sweep = sorted(set(sweep or _default_sweep(size, min_size)) | {size})
    small = [s for s in sweep if s < min_size]
    if small:
        raise ProfileArgumentError(f"sweep sizes must be at least {name}'s min_input_size {min_size}, got {small}")
    return ProfileSetup(name, size, batch, dtype, device, backend, compare, sweep, repeat, _out_folder(out_dir))


__all__ = ["CPU_CAP_ENV", "DTYPES", "ProfileArgumentError", "ProfileSetup", "build_model", "check_profile_args",
           "concrete_backend", "cpu_cap_bytes", "model_names", "resolve_device"]
