"""Packaging: the kernels ship as pvt_fast.kernels, old torch is refused at import, factories stay out of
timm's registry."""
import subprocess
import sys

import timm

import pvt_fast


def test_kernels_are_a_subpackage():
    import pvt_fast.kernels
    assert pvt_fast.kernels.__name__ == "pvt_fast.kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not pvt_fast.kernels


def test_old_torch_is_refused_at_import():
    code = "import torch; torch.__version__ = '2.10.0+cpu'; import pvt_fast"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pvt_fast needs torch >= 2.11, found 2.10.0+cpu" in proc.stderr


def test_factories_not_registered_with_timm():
    assert timm.create_model("pvt_v2_b0").__class__.__module__.startswith("timm.")
    assert set(pvt_fast.models.CONFIGS) == {
        "pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_huge_v2", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
        "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"}
    assert all(callable(getattr(pvt_fast, name)) for name in pvt_fast.models.CONFIGS)
