"""Group ``onnxruntime`` (CPU): pvt_v2_b2's forward in ONNX Runtime against PyTorch eager, same weights.

- ``pytorch``: pvt_fast's CPU default (the ``sdpa`` backend) under ``torch.no_grad``;
- ``onnxruntime``: the same model exported once with ``torch.onnx.export(..., dynamo=True)`` and dynamic
  batch, H and W, run by ONNX Runtime's CPU provider at every size.

Both use ``torch.get_num_threads()`` threads. With ``--benchmark-disable`` (CI) a one-block pvt_v2_b0 at
64x64 stands in, so that the export and both paths are exercised in seconds. ONNX Runtime's allocations are
invisible to torch's profiler: its records carry ``peak_mem_bytes`` None.
"""
import functools

import pytest
import torch

from harness import ON_CUDA, run_benchmark
import pvt_fast
from pvt_fast.flops import model_flops

MODEL = "pvt_v2_b2"
CASES = [(224, 8), (1024, 1)]
CI_CASE = dict(name="pvt_v2_b0", depths=(1, 1, 1, 1), resolution=64, batch=1)
IMPLS = ["pytorch", "onnxruntime"]

pytestmark = pytest.mark.skipif(ON_CUDA, reason="a CPU group (ONNX Runtime's CPU provider)")


@functools.lru_cache(maxsize=2)
def _model(name, depths):
    torch.manual_seed(0)
    kwargs = {} if depths is None else dict(depths=depths)
    return pvt_fast.create_model(name, backend="sdpa", **kwargs).eval()


@functools.lru_cache(maxsize=2)
def _session(name, depths, path):
    ort = pytest.importorskip("onnxruntime")
    torch.onnx.export(_model(name, depths), (torch.randn(2, 3, 224, 224),), path, dynamo=True, verbose=False,
                      dynamic_shapes={"x": {0: "batch", 2: "height", 3: "width"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@pytest.mark.benchmark(group="onnxruntime")
@pytest.mark.parametrize("resolution,batch", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_onnxruntime(benchmark, impl, resolution, batch, tmp_path_factory):
    name, depths = MODEL, None
    if benchmark.disabled:
        name, depths, resolution, batch = (CI_CASE[k] for k in ("name", "depths", "resolution", "batch"))
    model = _model(name, depths)
    if impl == "onnxruntime":
        session = _session(name, depths, str(tmp_path_factory.getbasetemp() / f"{name}-{depths}.onnx"))
        input_name = session.get_inputs()[0].name

        def call(x):
            return session.run(None, {input_name: x.numpy()})
    else:
        def call(x):
            with torch.no_grad():
                return model(x)

    run_benchmark(benchmark, call, lambda: (torch.randn(batch, 3, resolution, resolution),), impl=impl,
                  resolution=resolution, batch=batch, model=name, flops=model_flops(model, resolution, batch))
    if impl == "onnxruntime":
        benchmark.extra_info["peak_mem_bytes"] = None
