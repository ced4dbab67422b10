"""DistributedDataParallel (issue 6): 2 processes (gloo, localhost) train a tiny TSC model a few steps.

Parameters (the controller's included) must stay identical across ranks and match one process
training on the whole batch. BN runs in eval mode (running statistics), so a half batch gives the
same per-sample outputs as the whole batch and the averaged gradients equal the whole-batch ones;
SGD without momentum. Runs on the default backend (auto: the C++ kernels when built): DDP is about
gradient synchronisation around the ops, which every backend shares.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH, LR = 3, 8, 0.1


def _model():
    from tsc_kernels import models

    torch.manual_seed(0)
    return models.cifar_resnet(8, tsc="lstm").eval()


def _data(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def _train(model, part=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        half = BATCH // world
        _train(model, slice(rank * half, (rank + 1) * half))
        torch.save(
            {k: v.detach().clone() for k, v in model.module.state_dict().items()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _model()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    _train(single)
    want = single.state_dict()
    ctrl = [k for k in want if k.startswith("tsc_controller.")]
    assert ctrl, "the model has a controller"
    for k in want:
        # DDP broadcasts rank 0's buffers and all-reduces gradients: every rank holds the same values
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs across ranks"
        # the mean of two half-batch gradients = the whole-batch gradient, up to summation order
        torch.testing.assert_close(ranks[0][k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    moved = [k for k in ctrl if not torch.equal(want[k], start[k])]
    assert moved, "training moved the controller's parameters (else the comparison says nothing about them)"
