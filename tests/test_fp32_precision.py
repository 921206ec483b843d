"""fp32 dots follow torch.get_float32_matmul_precision(): exact fp32 at "highest", TF32 (10-bit mantissas)
at "high". The interpreter computes both exactly, so the difference is measured on a GPU: at "highest" the
fused ops' fp32 error against float64 is at fp32's level, at "high" it is at TF32's, as cuBLAS's own."""
import pytest
import torch

from pvt_fast.ops import eager
from pvt_fast.ops.reduce_kv import reduce_kv
from pvt_fast.ops.sra_attention import attention

pytestmark = pytest.mark.gpu


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def _cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 128, device="cuda", generator=g)
    kv = torch.randn(2, 49, 256, device="cuda", generator=g)
    x = torch.randn(2, 28 * 28, 64, device="cuda", generator=g)
    w = torch.randn(64, 64, 4, 4, device="cuda", generator=g) / 32
    vec = torch.randn(64, device="cuda", generator=g) * 0.1
    return {
        "attention": (lambda: attention(q, kv, 2, 0.125), lambda: eager.attention_reference(q, kv, 2, 0.125),
                      lambda: eager.attention_reference(q.double(), kv.double(), 2, 0.125)),
        "reduce_kv": (lambda: reduce_kv(x, 28, 28, w, vec, vec + 1, vec, 1e-5),
                      lambda: eager.reduce_kv_reference(x, 28, 28, w, vec, vec + 1, vec, 1e-5),
                      lambda: eager.reduce_kv_reference(x.double(), 28, 28, w.double(), vec.double(),
                                                        vec.double() + 1, vec.double(), 1e-5)),
    }


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("op", ["attention", "reduce_kv"])
def test_fp32_dots_follow_torch_precision(matmul_precision, op):
    fused, torch_op, ref64 = _cases()[op]
    ref = ref64()
    with torch.backends.cudnn.flags(allow_tf32=False):
        matmul_precision("highest")
        exact = _rel(fused(), ref)
        assert exact < 1e-5, f"{op} at 'highest': relative error {exact:.2e}, not fp32's"
        matmul_precision("high")
        tf32 = _rel(fused(), ref)
    assert tf32 > 10 * exact, f"{op} at 'high': error {tf32:.2e} is no larger than at 'highest' ({exact:.2e})"
    assert tf32 < 1e-2, f"{op} at 'high': relative error {tf32:.2e}"
