"""Groups ``model-forward`` (``model(x)`` under no_grad) and ``model-train-step`` (forward, cross-entropy,
backward, SGD step) of pvt_v2_b2, every implementation with the same weights:

- ``official-eager``: pvt_fast's ``reference`` backend (the official forward, op for op);
- ``timm`` / ``timm-compiled``: timm's pvt_v2_b2, weights mapped with ``checkpoint_filter_fn``;
- ``pvt_fast`` / ``pvt_fast-compiled``: pvt_fast's default backend (``auto``: sdpa, or fused on a GPU verified
  for it; ``gpu_run.sh`` sets ``PVT_FAST_BACKEND=fused`` so that GPU records time the fused kernels).

``*-compiled`` run ``torch.compile(model)`` and carry the ``compiled`` marker (CI skips them); they run at
fewer sizes, since each size compiles anew.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, DTYPE, ITEMSIZE, cases, op_table, require_bytes, run_benchmark
import pvt_fast
from pvt_fast.flops import model_flops, stage_flops
from pvt_fast.profile_setup import build_model
from pvt_fast.profiler import attention_matrix_bytes, forward_bytes_estimate

MODEL = "pvt_v2_b2"
EAGER = ["official-eager", "timm", "pvt_fast"]
COMPILED = ["timm-compiled", "pvt_fast-compiled"]
FORWARD = dict(eager=cases(cpu=[(224, 1)], cuda=[(224, 64), (512, 16), (1024, 4), (2048, 1)]),
               compiled=cases(cpu=[(224, 1)], cuda=[(224, 64), (1024, 4)]))
TRAIN = dict(eager=cases(cpu=[(224, 1)], cuda=[(224, 64), (512, 8), (1024, 2)]),
             compiled=cases(cpu=[(224, 1)], cuda=[(224, 64)]))


def _params(sizes):
    params = [pytest.param(impl, r, b, id=f"{impl}-{r}-{b}") for impl in EAGER for r, b in sizes["eager"]]
    params += [pytest.param(impl, r, b, id=f"{impl}-{r}-{b}", marks=pytest.mark.compiled)
               for impl in COMPILED for r, b in sizes["compiled"]]
    return params


@functools.lru_cache(maxsize=1)
def _weights():
    torch.manual_seed(0)
    return pvt_fast.create_model(MODEL, backend="reference").state_dict()


def _build(impl):
    """``impl``'s model with the shared weights, on the benchmark device and dtype."""
    if impl.startswith("timm"):
        timm = pytest.importorskip("timm")
        from timm.models.pvt_v2 import checkpoint_filter_fn

        model = timm.create_model(MODEL, pretrained=False)
        model.load_state_dict(checkpoint_filter_fn(_weights(), model))
    else:
        backend = "reference" if impl == "official-eager" else "auto"
        if pvt_fast.resolve_backend(backend) == "fused":
            op_table("fused")  # on CPU (PVT_FAST_BACKEND=fused) skips: fused kernels are timed on CUDA only
        model = pvt_fast.create_model(MODEL, backend=backend)
        model.load_state_dict(_weights())
    model = model.to(device=DEVICE, dtype=DTYPE)
    return torch.compile(model) if impl.endswith("-compiled") else model


def _bytes_needed(impl, resolution, batch, train):
    """A rough upper estimate: weights (x4 when training: grads and a spare) plus activations; when training,
    every block keeps its MLP activations (and, for the reference, its attention probabilities) for backward."""
    model = build_model(MODEL, "reference" if impl == "official-eager" else "sdpa", device="meta")
    weights = sum(p.numel() for p in model.parameters()) * ITEMSIZE
    if not train:
        return weights + forward_bytes_estimate(model, resolution, batch, ITEMSIZE)
    saved = 0
    for i, s in enumerate(stage_flops(model, resolution, batch)):
        blk = getattr(model, f"block{i + 1}")[0]
        per_block = batch * s.tokens * (12 * model.embed_dims[i] + 4 * blk.mlp.fc1.out_features) * ITEMSIZE
        if model.backend == "reference":
            per_block += attention_matrix_bytes(batch, blk.attn.num_heads, s.tokens, s.keys, ITEMSIZE)
        saved += model.depths[i] * per_block
    return 4 * weights + saved


def _fitting_model(impl, resolution, batch, train):
    """``impl``'s model in train or eval mode, once the case is known to fit (else the case is skipped)."""
    step = "train step" if train else "forward"
    require_bytes(_bytes_needed(impl, resolution, batch, train),
                  f"{impl} {step} at {resolution}x{resolution}, batch {batch}")
    return _build(impl).train(train)


def _inputs(resolution, batch):
    x = torch.randn(batch, 3, resolution, resolution, device=DEVICE, dtype=DTYPE)
    return x, torch.randint(0, 1000, (batch,), device=DEVICE)


@pytest.mark.benchmark(group="model-forward")
@pytest.mark.parametrize("impl,resolution,batch", _params(FORWARD))
def test_model_forward(benchmark, impl, resolution, batch):
    model = _fitting_model(impl, resolution, batch, train=False)

    def forward(x, _):
        return model(x)

    with torch.no_grad():
        run_benchmark(benchmark, forward, functools.partial(_inputs, resolution, batch), impl=impl,
                      resolution=resolution, batch=batch, model=MODEL,
                      flops=model_flops(MODEL, resolution, batch))


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("impl,resolution,batch", _params(TRAIN))
def test_model_train_step(benchmark, impl, resolution, batch):
    model = _fitting_model(impl, resolution, batch, train=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step(x, target):
        loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Backward costs about twice the forward: 3x the forward's FLOPs per step.
    run_benchmark(benchmark, train_step, functools.partial(_inputs, resolution, batch), impl=impl,
                  resolution=resolution, batch=batch, model=MODEL,
                  flops=3 * model_flops(MODEL, resolution, batch))

