"""Triton kernels of pvt_fast, installed as ``pvt_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op, their launchers and a plain-PyTorch ``*_ref``
beside them, plus ``aot_specs()``: the (dtype, block configuration) combinations its launcher can pick,
which ``python -m pvt_fast.kernels.report`` compiles ahead of time for sm_80 and sm_90.
Set ``TRITON_INTERPRET=1`` before importing these modules to run the kernels on CPU tensors.
"""
