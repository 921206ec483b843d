"""Two training steps under DistributedDataParallel (gloo, 2 CPU processes) give the gradients and weights
of one process training on the same global batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pvt_fast

WORLD = 2
STEPS = 2


def _train(model, batches, lr=0.1):
    """SGD steps over ``batches``; returns the first step's gradients and the final weights."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    first_grads = None
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return first_grads, weights


def _model(state):
    model = pvt_fast.pvt_v2_b0(backend="sdpa", num_classes=10)
    model.load_state_dict(state)
    return model


def _worker(rank, init_file, state, batches, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(state))
        n = batches[0][0].shape[0] // WORLD
        shard = [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]
        grads, weights = _train(model, shard)
        if rank == 0:
            strip = len("module.")
            torch.save(({n[strip:]: g for n, g in grads.items()}, {n[strip:]: w for n, w in weights.items()}), out)
        dist.barrier()  # both ranks done before either tears gloo down (a rank left alone aborted)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    torch.manual_seed(0)
    state = pvt_fast.pvt_v2_b0(backend="sdpa", num_classes=10).state_dict()
    batches = [(torch.randn(4, 3, 64, 48), torch.randint(0, 10, (4,))) for _ in range(STEPS)]
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), state, batches, str(out)), nprocs=WORLD, join=True)
    ddp_grads, ddp_weights = torch.load(out)

    grads, weights = _train(_model(state), batches)
    assert ddp_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ddp_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
        torch.testing.assert_close(ddp_weights[name], weights[name], rtol=1e-4, atol=1e-6, msg=f"weight {name}")
