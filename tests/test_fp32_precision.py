"""fp32 dots follow torch.get_float32_matmul_precision(): IEEE at "highest", TF32 otherwise. The interpreter
computes both exactly, so the choice itself is checked here; its numbers are checked on a GPU."""
import pytest
import torch

from pvt_fast.kernels import reduce_kv, sra_attention


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("precision, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dot_precision_follows_torch(matmul_precision, precision, expected):
    matmul_precision(precision)
    assert reduce_kv.input_precision(torch.float32) == expected
    assert sra_attention._dot_inputs(torch.float32, 64) == expected
    # head dims above 64 have no spill-free TF32 tiling: they stay IEEE (documented in the kernel module)
    assert sra_attention._dot_inputs(torch.float32, 128) == "ieee"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_ignore_the_fp32_setting(matmul_precision, dtype):
    matmul_precision("high")
    assert reduce_kv.input_precision(dtype) == "ieee"
    assert sra_attention._dot_inputs(dtype, 64) == "16-bit"
