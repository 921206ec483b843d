"""pytest-benchmark hooks for the pvt_fast benchmarks; the shared timing harness is in ``harness.py``."""
import importlib.metadata

import torch

from harness import DEVICE


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        machine_info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        machine_info["triton"] = None
    machine_info["benchmark_device"] = str(DEVICE)
