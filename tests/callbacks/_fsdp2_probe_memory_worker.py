"""Worker for tests/callbacks/test_fsdp2_probe_memory.py: ``python _fsdp2_probe_memory_worker.py OUT.json``.

Two gloo ranks; a 4-Linear MLP with each Linear and the root ``fully_shard``-ed (4 parameter groups; the root
holds none), trained with SGD on the same batches on both ranks, in lockstep with a plain copy of the model in
each process (the reference: FSDP2 averages two equal gradients, so the weights stay equal). The Watcher is
driven directly (no host), its three events around each step. Every ``FSDPParamGroup`` transition between
sharded and unsharded is counted while gradwatch's events run: the most groups unsharded at one moment, and
the calls of ``FSDPModule.unshard`` (what ``gradwatch.engine.fsdp.unsharded`` makes).

Phases (rank 0 writes what each saw to OUT.json):

``signals``
    3 steps of signals every step (no confirmation), 20 probe examples in batches of 8: 3 batches, 2 on rank 0 and 1 on
    rank 1, which runs a stand-in forward. ``loss_fn`` also computes the plain model's losses on the same batch
    and records the largest difference; at step ``FAULT_STEP`` it raises on rank 1 after its forward (so rank 1
    runs its stand-in forward all the same, and both ranks fail the step together).
``refused``
    sharpness every step with ``max_unshard_gb=1e-9``: refused at step 1 (one warning), off at step 2.
``unsharded``
    sharpness every step, no limit: today's path, the whole model unsharded for the pass.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

STEPS = {"signals": 3, "refused": 2, "unsharded": 2}
FAULT_STEP = 3  # signals: rank 1's loss_fn raises after its forward at this step


class Counter:
    """Groups unsharded at once (peak) and ``FSDPModule.unshard`` calls, while ``on`` is set."""

    def __init__(self) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.groups: list = []
        self.on = False
        self.peak = 0
        self.unshard_calls = 0
        counter = self
        for name in ("_to_unsharded", "_to_sharded", "_to_sharded_post_forward"):
            original = getattr(FSDPParamGroup, name)

            def wrapped(group, _original=original):  # noqa: ANN001, ANN202
                out = _original(group)
                if counter.on:
                    counter.peak = max(counter.peak, sum(bool(g.is_unsharded) for g in counter.groups))
                return out

            setattr(FSDPParamGroup, name, wrapped)
        module_unshard = FSDPModule.unshard

        def unshard(module, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if counter.on:
                counter.unshard_calls += 1
            return module_unshard(module, *args, **kwargs)

        FSDPModule.unshard = unshard

    def watch(self, net: nn.Module) -> None:
        from gradwatch.engine.fsdp import fsdp_modules

        self.groups = [g for m in fsdp_modules(net) for g in m._get_fsdp_state()._fsdp_param_groups]
        self.peak = self.unshard_calls = 0


def phase(rank: int, mesh, counter: Counter, name: str) -> dict:  # noqa: ANN001
    from torch.distributed.fsdp import fully_shard

    from gradwatch import SharpnessConfig, SignalsConfig, WatchConfig
    from gradwatch.engine.probe import ProbeSet
    from gradwatch.engine.watcher import Watcher

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, 3))
    ref = copy.deepcopy(net)
    for m in (net[0], net[2], net[4], net[6], net):
        fully_shard(m, mesh=mesh)
    counter.watch(net)
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    worst = [0.0]
    at = [0]

    def loss_fn(model: nn.Module, batch: list) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x), y, reduction="none")
        if name == "signals" and rank == 1 and at[0] == FAULT_STEP:
            raise RuntimeError("planted: rank 1's loss code fails after its forward")
        with torch.no_grad():
            want = F.cross_entropy(ref(x), y, reduction="none")
        worst[0] = max(worst[0], float(((loss.detach() - want).abs() / want.abs().clamp_min(1e-12)).max()))
        return loss

    if name == "signals":
        options = dict(signals=SignalsConfig(every=1, probe_size=20, batch_size=8, confirm=False), sharpness=False)
    else:
        options = dict(sharpness=SharpnessConfig(every=1, probe_size=8, max_iter=5), signals=False,
                       max_unshard_gb=1e-9 if name == "refused" else None)
    config = WatchConfig(spectra=False, stability=False, max_overhead=None, loss_fn=loss_fn, **options)
    watcher = Watcher(config)
    watcher.attach(net, probe_source=lambda size: ProbeSet.from_dataset(data, size, device=torch.device("cpu"),
                                                                        loss_fn=loss_fn, batch_size=8))
    logged: dict[str, list[float]] = {}
    observed = [0]
    for d in watcher.diagnostics:
        original = d.observe

        def observe(ctx, _original=original):  # noqa: ANN001, ANN202
            observed[0] += 1
            return _original(ctx)

        d.observe = observe
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, STEPS[name] + 1):
            at[0] = step
            x, y = data.tensors[0][8 * step:8 * step + 8], data.tensors[1][8 * step:8 * step + 8]
            counter.on = True
            watcher.on_step_start(step)
            counter.on = False
            opt.zero_grad()
            ref_opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            F.cross_entropy(ref(x), y).backward()
            counter.on = True
            watcher.on_gradients_ready(step, optimizer=opt)
            counter.on = False
            opt.step()
            ref_opt.step()
            counter.on = True
            out = watcher.on_step_end(step, loss=torch.tensor(0.0))
            counter.on = False
            for k, v in out.items():
                logged.setdefault(k, []).append(float(v))
    full = {k: v.full_tensor() for k, v in net.state_dict().items()}
    same = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    watcher.close()
    return {"peak_unsharded_groups": counter.peak, "groups": len(counter.groups),
            "unshard_calls": counter.unshard_calls, "worst_rel_loss_error": worst[0], "observed": observed[0],
            "logged": logged, "same_weights_as_plain": same,
            "warnings": [str(w.message) for w in caught if "gradwatch" in str(w.message)]}


def run(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    counter = Counter()
    results = {name: phase(rank, mesh, counter, name) for name in ("signals", "refused", "unsharded")}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    # forked, not spawned: the ranks need not import torch again (no process group exists before the fork)
    mp.start_processes(run, args=(29900 + os.getpid() % 90, sys.argv[1]), nprocs=2, join=True, start_method="fork")
    sys.exit(0)
