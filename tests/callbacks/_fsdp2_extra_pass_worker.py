"""Worker for tests/callbacks/test_fsdp2.py: ``python _fsdp2_extra_pass_worker.py``.

Two gloo ranks, a ``fully_shard`` MLP: one training step, then an extra pass inside
``gradwatch.engine.fsdp.unsharded`` that only rank 0 runs a forward in (as when one rank's probe block is
empty, or it sits out a confirmation pass), then two more training steps. Before the fix the extra forward's
forward-order records made rank 0's next backward prefetch an all-gather rank 1 never made: a deadlock (here
a 10 s gloo timeout). Prints one line per mode and exits non-zero if any mode failed.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

MODES = ("no_grad", "forward_with_grad", "grad_of_all")


def run(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=10))
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradwatch.engine.fsdp import unsharded

    mesh = init_device_mesh("cpu", (2,))
    for mode in MODES:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        for m in (net[0], net[2], net):
            fully_shard(m, mesh=mesh)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)

        def train() -> None:
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        train()
        with unsharded(net):
            if rank == 0:
                probe = torch.randn(5, 16)
                if mode == "no_grad":
                    with torch.no_grad():
                        net(probe)
                elif mode == "forward_with_grad":
                    net(probe)  # a graph built, no backward
                else:
                    torch.autograd.grad(net(probe).square().sum(), list(net.parameters()))
        try:
            train()
            train()
            ok = True
        except Exception as exc:  # noqa: BLE001 - the timeout of a mismatched collective
            ok = False
            print(f"rank {rank}, {mode}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            os._exit(3)  # the process group is broken: no later mode can run
        if rank == 0:
            print(f"{mode}: {'ok' if ok else 'FAILED'}", flush=True)
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(29400 + os.getpid() % 500, {}), nprocs=2, join=True)
    sys.exit(0)
