"""Triton kernels of pvt_fast, installed as ``pvt_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op, their launchers, ``aot_specs()`` (the (dtype,
block configuration) combinations its launcher can pick, which ``python -m pvt_fast.kernels.report``
compiles ahead of time for sm_80 and sm_90) and the count of what each launch moves (``*_cost``, the
traffic model's input: ``python -m pvt_fast.kernels.report --traffic``). Each op's plain-PyTorch reference
is its ``*_reference`` in :mod:`pvt_fast.ops.eager` (the official op order), one per op.
Set ``TRITON_INTERPRET=1`` before importing these modules to run the kernels on CPU tensors.
"""
import os


def _check_interpreter():
    """Triton < 3.7's interpreter turns a loop bound into a Python int with ``int()`` on a one-element array,
    which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
    kernel with a runtime trip count would fail. Compiled kernels are not affected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    def version(module):
        return tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:2])

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise ImportError(f"TRITON_INTERPRET=1 with triton {triton.__version__} needs numpy < 2.4 (its interpreter "
                          f"cannot run loops with runtime bounds on numpy >= 2.4), found numpy {numpy.__version__}; "
                          "install numpy<2.4 or triton>=3.7")


_check_interpreter()
