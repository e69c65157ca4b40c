"""Gradient spectra spread over ranks, on CPU processes (gloo): ``python _spectra_ranks_worker.py OUT
[WORLD:MODE,MODE ...]`` forks WORLD ranks that each run the modes below with gradwatch's Watcher driving a
hand-written loop (no host), and save ``OUT/<WORLD>/rank<r>.pt``.

The model holds every kind of watched view: ``nn.MultiheadAttention`` (in_proj (18, 6): its k block straddles
the two ranks' shards), GPT-2's ``Conv1D`` stored (in, out) (the fused ``c_attn``: q/k/v are columns of the
stored shard; ``c_proj``), a wide Linear (rows Gram), a tall one (columns Gram) and a square one whose Gram is
over half the cap (solved by its owner at once instead of beside the other owners). Modes:

- ``ddp``: DistributedDataParallel; ``fsdp2``: ``fully_shard`` on each layer and the root (with 4 ranks some
  shards are empty). Each step, after the Watcher's step and outside it, the full gradients (``full_tensor()``
  under FSDP2) give the float64 reference statistics of a one-process GradSpectrum on the same gradients;
  ``full_tensor`` calls made inside the Watcher are counted.
- ``ddp_fail``, ``fsdp2_fail``: rank 1's share raises: its owner solve at step 2 (``owned_statistics``, or
  ``local_statistics`` under DDP) and, under FSDP2, every block-row product at step 3 (``add_block_row``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STEPS = 4
CAP = 4096  # SpectraConfig.shard_buffer_bytes: tiny, so shards travel in chunks of a few rows
MODES = ("ddp", "fsdp2", "ddp_fail", "fsdp2_fail")


class Conv1D(nn.Module):
    """GPT-2's transposed linear (as transformers.pytorch_utils.Conv1D): weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.c_attn = Conv1D(18, 6)
        self.wide = nn.Linear(18, 5)
        self.tall = nn.Linear(5, 11)
        self.square = nn.Linear(11, 20)  # its Gram (3200 bytes) is over CAP / 2: its owner solves it at once
        self.c_proj = Conv1D(6, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x, x, x, need_weights=False)[0]
        h = torch.tanh(self.tall(torch.tanh(self.wide(self.c_attn(h)))))
        return self.c_proj(torch.tanh(self.square(h)))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)


def _count_full_tensor() -> list[int]:
    from torch.distributed.tensor import DTensor

    calls = [0]
    original = DTensor.full_tensor

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        return original(self, *a, **k)

    DTensor.full_tensor = counted
    return calls


def _inject(mode: str, rank: int, step: list[int]) -> None:
    from gradwatch.metrics import spectra_ranks

    if rank != 1 or not mode.endswith("_fail"):
        return
    for name in ("owned_statistics", "local_statistics", "add_block_row"):
        original = getattr(spectra_ranks, name)
        when = 3 if name == "add_block_row" else 2

        def failing(*a, _original=original, _when=when, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
            if step[0] == _when and (_name != "add_block_row" or mode == "fsdp2_fail"):
                raise RuntimeError(f"injected: {_name} fails on rank 1")
            return _original(*a, **k)

        setattr(spectra_ranks, name, failing)


def run(mode: str, rank: int, world: int, calls: list[int]) -> dict:
    from gradwatch import SpectraConfig, StabilityConfig, WatchConfig
    from gradwatch.engine import Watcher
    from gradwatch.functional.spectra import STATISTICS, gradient_spectrum_statistics
    from gradwatch.metrics import GradSpectrum, spectra_ranks
    from gradwatch.registry import families

    saved = {n: getattr(spectra_ranks, n) for n in ("owned_statistics", "local_statistics", "add_block_row")}
    torch.manual_seed(0)
    model = Net()
    if mode.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in (model.attn, model.c_attn, model.wide, model.tall, model.square, model.c_proj):
            fully_shard(m, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    off = {f.key: False for f in families() if f.key not in ("spectra", "stability")}
    config = WatchConfig(**off, max_overhead=None, on_error="warn", stability=StabilityConfig(spike_every=1, adam=False),
                         spectra=SpectraConfig(every=1, heatmap_every=0, shard_buffer_bytes=CAP))
    watcher = Watcher(config)
    watcher.attach(wrapped)
    spectrum = next(d for d in watcher.diagnostics if type(d) is GradSpectrum)
    spikes = next(d for d in watcher.diagnostics if type(d).__name__ == "GradNormSpikes")
    step = [0]
    _inject(mode, rank, step)
    out: dict = {"logged": {}, "reference": {}, "full_tensor_calls": 0, "owners": {}, "warnings": [],
                 "grad_norm": {}, "grad_norm_reference": {}}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(1, STEPS + 1):
                step[0] = t
                x, y = _batch(rank, t)
                opt.zero_grad()
                loss = (wrapped(x) - y).square().mean()
                loss.backward()
                before = calls[0]
                out["logged"][t] = dict(watcher.run_step(t, optimizer=opt, loss=loss))
                out["full_tensor_calls"] += calls[0] - before
                out["owners"][t] = list(spectrum.owners)
                grads = {}
                for n, p in model.named_parameters():
                    g = p.grad
                    grads[n] = g.full_tensor() if hasattr(g, "full_tensor") else g
                mats = [w.matrix(grads[w.param_name].detach()) for w in watcher.layers.matrices]
                ref, _ = gradient_spectrum_statistics([m.double() for m in mats], STATISTICS, "svdvals")
                if spikes.detector.history().numel():  # every rank under FSDP2; rank zero only under DDP
                    out["grad_norm"][t] = float(spikes.detector.history()[-1])
                    out["grad_norm_reference"][t] = float(sum(m.double().square().sum() for m in mats).sqrt())
                out["reference"][t] = {f"grad_spectrum/{s}/{w.tag}": float(ref[s][k])
                                       for s in STATISTICS for k, w in enumerate(watcher.layers.matrices)}
                opt.step()
        out["warnings"] = [str(w.message) for w in caught if str(w.message).startswith("gradwatch")]
    finally:
        for n, f in saved.items():
            setattr(spectra_ranks, n, f)
    shapes = [m.shape for m in mats]
    out["shapes"] = [tuple(s) for s in shapes]
    out["tags"] = [w.tag for w in watcher.layers.matrices]
    out["transposed"] = [w.transpose for w in watcher.layers.matrices]
    out["largest_gram_bytes"] = max(min(s) ** 2 * 8 for s in shapes)
    out["cap"] = CAP
    watcher.close()
    return out


def rank_main(rank: int, world: int, out_dir: str, port: int, modes: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))  # a rank left waiting fails, instead of hanging
    calls = _count_full_tensor()
    results = {}
    for mode in modes:
        t0 = time.perf_counter()
        results[mode] = run(mode, rank, world, calls)
        results[mode]["seconds"] = time.perf_counter() - t0
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """``OUT [WORLD:MODES ...]`` (default: 2 ranks run the failing modes, then 4 ranks ``fsdp2``), each world
    into ``OUT/<WORLD>/``; gradwatch is imported once, here, before the ranks are forked."""
    import socket

    # imported and warmed once, in the parent, so that no forked rank pays for it
    import torch._dynamo  # noqa: F401 - DistributedDataParallel imports it (3 s)
    import torch.multiprocessing as mp
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    import gradwatch.engine  # noqa: F401
    from gradwatch.functional.spectra import gradient_spectrum_statistics, gram_spectrum_statistics

    gradient_spectrum_statistics([torch.ones(3, 2), torch.ones(2, 3)])
    gram_spectrum_statistics([torch.eye(2, dtype=torch.float64)])

    out_dir = argv[1]
    runs = argv[2:] or ["2:ddp_fail,fsdp2_fail", "4:fsdp2"]
    for run_spec in runs:
        world, modes = run_spec.split(":")
        where = os.path.join(out_dir, world)
        os.makedirs(where, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(rank_main, args=(int(world), where, port, modes.split(",")), nprocs=int(world),
                           start_method="fork")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
