"""Gradient spectra spread over ranks: per-step spectra time and extra memory per rank at 1, 2 and 4 CPU ranks
(gloo), under DDP and FSDP2, against one rank.

A GPT-2-shaped model (``transformers.GPT2Config``, built from the config: nothing is downloaded; default 4 layers,
n_embd 512, 8 heads, GPT-2's vocabulary) trains a few SGD steps on seeded token batches; gradwatch's Watcher
runs the spectra family alone at every step (24 watched matrices: q/k/v split, attention out, MLP in/out). Each
rank runs ``torch.set_num_threads(1)``, and so does the one-rank baseline. For every step after the first
(warm-up) the spectra time of each rank is measured around ``GradSpectrum.observe``, entered by all ranks
together (an untimed barrier first, so no rank's figure holds the wait for another's backward), as wall time
(``time.perf_counter``) and as the thread's CPU time (``time.thread_time``); a step's figure is the slowest
rank's, and a run's the median over its steps. The extra memory is what the spectra code itself allocated on
a rank at its peak (float64 Grams, chunks of shards, float64 copies; gloo's own buffers are not counted), the
max over ranks and steps; under FSDP2 ``SpectraConfig.shard_buffer_bytes`` is set to 10% of one rank's
parameter shard, so the bound to meet is the largest layer's Gram plus that.

On a machine with fewer cores than ranks (4 ranks on 2 cores) the ranks contend for wall time, so the wall
ratios there say little about the work split; the CPU-time ratios do, and the output says which is which.

    python benchmarks/spectra_ranks.py                          # worlds 1, 2, 4; DDP and FSDP2
    python benchmarks/spectra_ranks.py --worlds 1,2 --steps 4 --embd 768 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=args.seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def rank_main(rank: int, world: int, mode: str, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    from gradwatch import SpectraConfig, WatchConfig
    from gradwatch.engine import Watcher
    from gradwatch.metrics import GradSpectrum
    from gradwatch.registry import families

    model = _model(args)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in model.parameters())
    cap = max(4096, int(0.1 * local)) if mode == "fsdp2" else SpectraConfig().shard_buffer_bytes
    off = {f.key: False for f in families() if f.key != "spectra"}
    watcher = Watcher(WatchConfig(**off, max_overhead=None, on_error="raise",
                                  spectra=SpectraConfig(every=1, heatmap_every=0, mad=False, shard_buffer_bytes=cap)))
    watcher.attach(wrapped)
    spectrum = next(d for d in watcher.diagnostics if type(d) is GradSpectrum)
    rec: dict = {"wall": [], "cpu": [], "extra": [], "shard_bytes": local, "cap": cap,
                 "largest_gram": max(min(s) ** 2 * 8 for s in _shapes(watcher)), "matrices": len(watcher.layers.matrices)}
    observe = spectrum.observe

    def timed(ctx):  # noqa: ANN001, ANN202
        dist.barrier()  # untimed: the ranks start together, so no rank's time holds another's late backward
        w0, c0 = time.perf_counter(), time.thread_time()
        observe(ctx)
        rec["wall"].append(time.perf_counter() - w0)
        rec["cpu"].append(time.thread_time() - c0)
        rec["extra"].append(float(spectrum.extra_bytes))

    spectrum.observe = timed
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 50257, (args.batch, args.seq), generator=g)
        opt.zero_grad()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        watcher.run_step(step, optimizer=opt, loss=loss)
        opt.step()
    watcher.close()
    with open(os.path.join(out, f"{mode}_{world}_{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()


def _shapes(watcher) -> list[tuple[int, int]]:  # noqa: ANN001
    out = []
    for w in watcher.layers.matrices:
        p = watcher.layers.params[w.param_name]
        a, b = p.shape[0], int(torch.Size(p.shape[1:]).numel())
        if w.block is not None:
            if w.transpose:
                b //= w.block[1]
            else:
                a //= w.block[1]
        out.append((a, b))
    return out


def summary(out: str, mode: str, world: int, steps: int) -> dict:
    ranks = [json.load(open(os.path.join(out, f"{mode}_{world}_{r}.json"))) for r in range(world)]
    wall = [max(r["wall"][t] for r in ranks) for t in range(1, steps)]  # the slowest rank, step 1 left out
    cpu = [max(r["cpu"][t] for r in ranks) for t in range(1, steps)]
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu),
            "extra": max(max(r["extra"]) for r in ranks), "largest_gram": ranks[0]["largest_gram"],
            "shard": max(r["shard_bytes"] for r in ranks), "cap": ranks[0]["cap"], "matrices": ranks[0]["matrices"]}


def main() -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--modes", default="ddp,fsdp2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import torch._dynamo  # noqa: F401 - imported once here rather than in every forked rank
    import transformers  # noqa: F401

    import gradwatch.engine  # noqa: F401

    worlds = [int(w) for w in args.worlds.split(",")]
    cores = os.cpu_count()
    print(f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; GPT-2-shaped: {args.layers} layers, n_embd {args.embd}, "
          f"vocab 50257; batch {args.batch} x {args.seq} tokens; {args.steps} steps (the first is warm-up); "
          f"1 thread per rank; load average {os.getloadavg()[0]:.2f}")
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in args.modes.split(","):
            for world in worlds:
                t0 = time.perf_counter()
                mp.start_processes(rank_main, args=(world, mode, _port(), args, out), nprocs=world,
                                   start_method="fork")
                results[mode, world] = summary(out, mode, world, args.steps)
                print(f"  {mode} {world} rank(s): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"\nspectra per step, the slowest rank (median over steps 2-{args.steps}); extra memory: what the spectra "
          "code allocated on one rank at its peak")
    print(f"{'run':<14}{'wall s':>9}{'x 1 rank':>10}{'cpu s':>9}{'x 1 rank':>10}{'extra MiB':>11}{'bound MiB':>11}"
          f"{'Gram MiB':>10}{'shard MiB':>11}")
    for (mode, world), r in results.items():
        base = results.get((mode, worlds[0]))
        mib = 2.0 ** 20
        bound = r["largest_gram"] + 0.1 * r["shard"]
        print(f"{mode + ' x' + str(world):<14}{r['wall']:>9.3f}{r['wall'] / base['wall']:>10.2f}{r['cpu']:>9.3f}"
              f"{r['cpu'] / base['cpu']:>10.2f}{r['extra'] / mib:>11.2f}"
              f"{(bound / mib if mode == 'fsdp2' else float('nan')):>11.2f}{r['largest_gram'] / mib:>10.2f}"
              f"{r['shard'] / mib:>11.2f}")
    if any(w > (cores or 1) for w in worlds):
        print(f"\nnote: {max(worlds)} ranks on {cores} cores contend for wall time: the wall ratios there are "
              "bounded below by the core count; the cpu-time ratios show the work split.")
    print("bound (FSDP2): the largest layer's Gram + 10% of one rank's parameter shard "
          "(SpectraConfig.shard_buffer_bytes was set to that 10%); DDP holds whole gradients, no bound applies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
