"""Build script: the Python package, the Triton kernels (``kernels/`` ships as ``pvt_fast.kernels``)
and the optional CUDA extension ``pvt_fast._C`` built from ``csrc/``.

PVT_FAST_BUILD_CUDA: ``0`` skips the extension, ``1`` requires it (a missing nvcc or a CPU-only torch
fails the build), unset builds it when nvcc and a CUDA-enabled torch are present. CUDA_HOME and
TORCH_CUDA_ARCH_LIST are honoured as torch.utils.cpp_extension reads them.
"""
import glob
import os

from setuptools import setup


def _cuda_extensions():
    mode = os.environ.get("PVT_FAST_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"PVT_FAST_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(nvcc):
        problems.append(f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME}; set CUDA_HOME to the toolkit)")
    if not sources:
        problems.append("no sources in csrc/")
    if problems:
        if mode == "1":
            raise RuntimeError("PVT_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        print("pvt_fast: skipping the CUDA extension: " + "; ".join(problems))
        return [], {}
    ext = cpp_extension.CUDAExtension(
        name="pvt_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++17", "-Xptxas", "-v", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    packages=["pvt_fast", "pvt_fast.ops", "pvt_fast.models", "pvt_fast.kernels"],
    package_dir={"pvt_fast": "pvt_fast", "pvt_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
