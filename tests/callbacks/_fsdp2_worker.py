"""FSDP2 reproduction harness: ``python _fsdp2_worker.py OUTDIR [mode]`` (see notes/fsdp2_fp16.md).

A tiny MLP (16 -> 32 -> 4) trained for 6 SGD steps under Lightning's ``ModelParallelStrategy`` (FSDP2,
``torch.distributed.fsdp.fully_shard``) on 2 CPU processes with the gloo backend, and the same 6 global
batches in one process for reference. Modes ``all`` to ``deadlock`` do not use gradwatch: their callbacks are
plain Lightning ones, so they show what the host gives a callback, independently of the engine. The
``gradwatch`` modes run the GradWatch Lightning callback (tests/callbacks/test_fsdp2.py).

Modes:

``all`` (default)
    ``fsdp2`` in a subprocess, then ``reference`` in this process, then ``compare``. Exit 0 iff the full
    gradients agree within 1e-5 at every step.
``fsdp2``
    Lightning's own launcher (``accelerator="cpu", devices=2``) re-runs this script for rank 1. Also
    works under ``torchrun --nproc_per_node 2 _fsdp2_worker.py OUTDIR fsdp2`` (Lightning then sees a
    TorchElastic environment and launches nothing). At ``on_before_optimizer_step`` every rank records each
    parameter's and gradient's type, placements and local shape, and calls ``grad.full_tensor()`` (an
    all-gather, so on every rank, in the same order). Writes ``fsdp2_rank<r>.pt`` per rank and rank 0's
    full gradients as ``fsdp2_grads.pt`` (``{step: {name: tensor}}``, steps 1-based).
``reference``
    One process, no strategy, each step's batch the concatenation of what the two ranks'
    ``DistributedSampler`` gave them (Lightning shuffles it, seed 0), mean loss. Writes
    ``reference_rank0.pt`` and ``reference_grads.pt``.
``compare``
    Loads the reference and every FSDP2 run present (``fsdp2``, ``hvp``), checks each step trained on the
    same examples and prints the max abs error of the full gradients; exit 1 above 1e-5.
``hvp``
    ``fsdp2`` plus, on every rank inside ``on_before_optimizer_step``, extra passes through the sharded
    modules on a probe batch that is the same on every rank: forward + ``torch.autograd.grad`` (and a
    Hessian-vector product with ``create_graph=True``) in five ways (``VARIANTS``). Each variant's outcome
    (ok, or the exception), its error against a plain unsharded copy of the module built from the full
    parameters, and whether the training gradients were left untouched are written to ``hvp_rank<r>.json``;
    ``hvp_rank<r>.pt`` holds the gradients as in ``fsdp2`` (``compare`` checks them: training unperturbed).
``deadlock``
    The bug of issue 7: only rank 0 calls ``full_tensor()``. A 10 s collective timeout; each rank
    writes what happened to ``deadlock_rank<r>.json`` and exits non-zero. Run it under ``timeout 90``.
``gradwatch``
    GradWatch (spectra every step, sharpness every 2) under FSDP2, twice in one launch: ``clean``
    (``on_error="raise"``) and ``faulty`` (``on_error="warn"``; GradSpectrum's share on rank 0 (the owner solve of its
    layers) raises at step 3, the
    sharpness probe forward raises on rank 1 at step 4, inside the sharded modules). Writes
    ``OUTDIR/<run>/rank<r>.pt`` (full final weights, gradwatch's warnings) and rank 0's TensorBoard run
    ``OUTDIR/<run>/tb/version_0``.
``gradwatch_reference``
    The same GradWatch settings in one process on the same global batches; writes as ``gradwatch`` does,
    into OUTDIR directly.
``signals``
    The signals family (opposing signals) alone under FSDP2, on 192 examples with a planted opposing pair,
    12 steps: ``OUTDIR/signals`` (strict, no alarm) and ``OUTDIR/signals_confirm`` (alarm and gradient
    confirmation). The ``gradwatch`` mode runs these too, after its own two runs.
``signals_reference``
    Both in one process on the same global batches: ``OUTDIR/signals_reference``,
    ``OUTDIR/signals_confirm_reference``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

STEPS = 6
BATCH = 8  # per rank; the global batch is 16
WORLD = 2
N = STEPS * BATCH * WORLD  # one epoch exactly
TOL = 1e-5
SEED = 0


def make_dataset() -> TensorDataset:
    """96 examples, 16 features, 4 classes from a fixed linear map; the third column is the example index."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return TensorDataset(x, (x @ w).argmax(1), torch.arange(N))


def global_batches(n: int = N, steps: int = STEPS) -> list[list[int]]:
    """Step k's global batch: rank 0's k-th batch then rank 1's, as Lightning's injected sampler deals them
    (``n`` examples, ``steps`` steps: one epoch, ``n = steps * BATCH * WORLD``).

    Lightning replaces a training loader's sampler by ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``
    whatever the loader's own ``shuffle`` (``data_connector._process_dataloader`` sets ``is_shuffled = True``
    for the training stage), and the fit loop calls ``set_epoch(0)`` in the first epoch.
    """
    per_rank = []
    for r in range(WORLD):
        sampler = DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=True, seed=SEED)
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    return [sum((idx[k * BATCH:(k + 1) * BATCH] for idx in per_rank), []) for k in range(steps)]


class ShardedMLP(L.LightningModule):
    """Linear(16, 32) - Tanh - Linear(32, 4); each Linear and the root are ``fully_shard``-ed over the
    data-parallel mesh when the strategy gives one (``configure_model``), left alone otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))  # Tanh: a non-zero Hessian

    def configure_model(self) -> None:
        if self.device_mesh is None:  # reference run: no ModelParallelStrategy
            return
        from torch.distributed.fsdp import fully_shard

        dp = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=dp)
        fully_shard(self.net[2], mesh=dp)
        fully_shard(self.net, mesh=dp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class FullGradRecorder(Callback):
    """On every rank: gradient/parameter types and the full gradient (``full_tensor()`` on every rank)."""

    def __init__(self, out_dir: str, tag: str, only_rank0_gathers: bool = False) -> None:
        self.out_dir, self.tag, self.only_rank0_gathers = out_dir, tag, only_rank0_gathers
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.info: dict[int, dict[str, dict]] = {}
        self.indices: dict[int, list[int]] = {}
        self.batch: tuple[torch.Tensor, ...] | None = None
        self.seconds: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.only_rank0_gathers:
            # a short timeout for collectives only, set after the rendezvous (a 10 s process-group timeout
            # given to the strategy also bounds the startup, which a loaded machine can exceed)
            from torch.distributed.distributed_c10d import _set_pg_timeout

            for group in {None, pl_module.device_mesh["data_parallel"].get_group()}:
                _set_pg_timeout(timedelta(seconds=10), group)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batch = tuple(batch)
        self.indices[trainer.global_step + 1] = batch[2].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        step = trainer.global_step + 1
        t0 = time.perf_counter()
        full, info = {}, {}
        for name, p in pl_module.named_parameters():
            g = p.grad
            info[name] = {"param_type": type(p).__name__, "grad_type": type(g).__name__,
                          "is_dtensor": _is_dtensor(g),
                          "placements": str(getattr(g, "placements", None)),
                          "local_shape": list((g.to_local() if _is_dtensor(g) else g).shape),
                          "full_shape": list(g.shape)}
            if _is_dtensor(g):
                if self.only_rank0_gathers and trainer.global_rank != 0:
                    continue  # the bug: the all-gather is entered by rank 0 only
                g = g.full_tensor()  # a collective: every rank calls it, in the same order
            full[name] = g.detach().clone()
        self.grads[step], self.info[step] = full, info
        self.seconds[step] = time.perf_counter() - t0

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        rank = trainer.global_rank
        record = {"grads": self.grads, "info": self.info, "indices": self.indices, "world_size": trainer.world_size,
                  "global_step": trainer.global_step, "gather_seconds": self.seconds,
                  "strategy": type(trainer.strategy).__name__}
        torch.save(record, os.path.join(self.out_dir, f"{self.tag}_rank{rank}.pt"))
        if rank == 0:
            torch.save(self.grads, os.path.join(self.out_dir, f"{self.tag}_grads.pt"))


# --------------------------------------------------------------------------------------------------------
# hvp mode: extra passes through FSDP2-sharded modules inside on_before_optimizer_step
# --------------------------------------------------------------------------------------------------------

def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    """The same 12 examples on every rank (like gradwatch's seeded probe set)."""
    x, y, _ = make_dataset()[:12]
    return x, y


def _plain_reference(pl_module: L.LightningModule, full: dict[str, torch.Tensor]):  # noqa: ANN202
    """Gradient and H v of the probe loss from an unsharded copy of the MLP carrying the full parameters."""
    ref = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    ref.load_state_dict({k.removeprefix("net."): v for k, v in full.items()})
    x, y = _probe()
    ps = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), ps, create_graph=True)
    hv = torch.autograd.grad(g, ps, grad_outputs=[torch.ones_like(p) for p in ps])
    return [t.detach() for t in g], [t.detach() for t in hv]


def _fsdp_modules(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _grad_and_hvp(module: nn.Module, params: list[torch.Tensor], allow_unused: bool = False):  # noqa: ANN202
    x, y = _probe()
    loss = F.cross_entropy(module(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=allow_unused)
    if any(t is None for t in g):
        return g, None
    hv = torch.autograd.grad(g, params, grad_outputs=[torch.ones_like(p) for p in params])
    return g, hv


def variant_naive(pl_module: L.LightningModule):  # noqa: ANN202
    """What gradwatch does today: params = module.parameters() (sharded DTensors), forward, grad."""
    return _grad_and_hvp(pl_module, list(pl_module.parameters()))


def variant_naive_allow_unused(pl_module: L.LightningModule):  # noqa: ANN202
    return _grad_and_hvp(pl_module, list(pl_module.parameters()), allow_unused=True)


def variant_unshard_only(pl_module: L.LightningModule):  # noqa: ANN202
    """unshard() every FSDP module, take the (now unsharded) registered parameters, default FSDP settings."""
    mods = _fsdp_modules(pl_module)
    try:
        for m in mods:
            m.unshard()
        return _grad_and_hvp(pl_module, list(pl_module.parameters()))
    finally:
        for m in mods:
            m.reshard()


def variant_unshard_no_reshard_no_sync(pl_module: L.LightningModule):  # noqa: ANN202
    """The recipe that works: no reshard after forward or backward, no gradient sync, unshard() every FSDP
    module (the only collective), read the unsharded parameters, run locally, then reshard and restore."""
    mods = _fsdp_modules(pl_module)
    restore = _save_fsdp_settings(mods)
    try:
        root = mods[0]
        root.set_reshard_after_forward(False)  # recurse=True (the default): every FSDP module under root
        root.set_reshard_after_backward(False)
        root.set_requires_gradient_sync(False)
        for m in mods:
            m.unshard()  # not recursive; an all-gather, so on every rank
        return _grad_and_hvp(pl_module, list(pl_module.parameters()))
    finally:
        for m in mods:
            m.reshard()
        restore()


def _save_fsdp_settings(mods: list):  # noqa: ANN202
    """FSDP2 has setters but no getters: save the private fields the three setters write, and return a
    function putting them back (the root's reshard-after-forward is specially False, so "set back to True"
    would be wrong)."""
    saved = []
    for m in mods:
        state = m._get_fsdp_state()
        groups = [(pg, pg.post_forward_mesh_info, pg.reshard_after_backward, pg.reduce_grads,
                   getattr(pg, "all_reduce_grads", None)) for pg in state._fsdp_param_groups]
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None), groups))

    def restore() -> None:
        for state, auto, groups in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for pg, post_fwd, rab, reduce, all_reduce in groups:
                pg.post_forward_mesh_info, pg.reshard_after_backward, pg.reduce_grads = post_fwd, rab, reduce
                if all_reduce is not None:
                    pg.all_reduce_grads = all_reduce

    return restore


def variant_functional_call_full(pl_module: L.LightningModule):  # noqa: ANN202
    """torch.func.functional_call of the FSDP module with full (full_tensor) leaves: what a float32-view
    reparametrisation (gradwatch Sharpness today) would do."""
    from torch.func import functional_call

    full = {n: p.full_tensor().detach().requires_grad_() for n, p in pl_module.named_parameters()}
    x, y = _probe()
    loss = F.cross_entropy(functional_call(pl_module, full, (x,)), y)
    ps = list(full.values())
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(g, ps, grad_outputs=[torch.ones_like(p) for p in ps])
    return g, hv


VARIANTS = {"naive_sharded_params": variant_naive, "naive_allow_unused": variant_naive_allow_unused,
            "unshard_default_settings": variant_unshard_only,
            "unshard_no_reshard_no_sync": variant_unshard_no_reshard_no_sync,
            "functional_call_full_tensors": variant_functional_call_full}


class ExtraPassProbe(FullGradRecorder):
    """FullGradRecorder, then each extra-pass variant on every rank, with its outcome."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(out_dir, "hvp")
        self.results: dict[int, dict[str, dict]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        import torch.distributed as dist

        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        step = trainer.global_step + 1
        full_params = {n: p.full_tensor().detach().clone() for n, p in pl_module.named_parameters()}
        ref_g, ref_hv = _plain_reference(pl_module, full_params)
        grads_before = {n: p.grad.to_local().clone() for n, p in pl_module.named_parameters()}
        out: dict[str, dict] = {}
        for name, fn in VARIANTS.items():
            t0 = time.perf_counter()
            res: dict = {}
            try:
                g, hv = fn(pl_module)
                res["ok"] = True
                res["grad_types"] = [type(t).__name__ for t in g]
                if any(t is None for t in g):
                    res["ok"] = False
                    res["note"] = "returned None gradients (silently wrong)"
                else:
                    g = [t.full_tensor() if _is_dtensor(t) else t for t in g]
                    res["grad_max_err"] = max(float((a.detach() - b).abs().max()) for a, b in zip(g, ref_g))
                    if hv is not None:
                        hv = [t.full_tensor() if _is_dtensor(t) else t for t in hv]
                        res["hvp_max_err"] = max(float((a.detach() - b).abs().max()) for a, b in zip(hv, ref_hv))
            except Exception as e:  # noqa: BLE001 (recorded, the harness goes on)
                res["ok"] = False
                res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                res["where"] = traceback.format_exc().strip().splitlines()[-3].strip()
            res["seconds"] = round(time.perf_counter() - t0, 4)
            res["param_types_after"] = sorted({type(p).__name__ for p in pl_module.parameters()})
            after = {n: p.grad for n, p in pl_module.named_parameters()}
            res["training_grads_unchanged"] = all(
                after[n] is not None and _is_dtensor(after[n]) and torch.equal(after[n].to_local(), v)
                for n, v in grads_before.items())
            if not res["training_grads_unchanged"]:  # put them back so later variants and steps are comparable
                for n, p in pl_module.named_parameters():
                    from torch.distributed.tensor import DTensor
                    p.grad = DTensor.from_local(grads_before[n], p.device_mesh, p.placements)
            out[name] = res
            dist.barrier()  # keep the ranks in step between variants
        self.results[step] = out

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        super().on_train_end(trainer, pl_module)
        with open(os.path.join(self.out_dir, f"hvp_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.results, f, indent=1)


# --------------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------------

def _trainer(out_dir: str, callbacks: list, distributed: bool) -> L.Trainer:
    kw: dict = dict(accelerator="cpu", max_steps=STEPS, callbacks=callbacks, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=out_dir)
    if distributed:
        from lightning.pytorch.strategies import ModelParallelStrategy

        # data_parallel_size=2, tensor_parallel_size=1: the defaults ("auto") give dp = num_nodes = 1 and
        # tp = devices = 2, i.e. FSDP over a 1-rank mesh (nothing sharded) and both ranks on the same data.
        kw.update(devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1))
    else:
        kw.update(devices=1)
    return L.Trainer(**kw)


def run_fsdp2(out_dir: str, mode: str) -> None:
    L.seed_everything(SEED, verbose=False)
    model = ShardedMLP()  # same initial weights on every rank (same seed); fully_shard slices them
    if mode == "hvp":
        cb: FullGradRecorder = ExtraPassProbe(out_dir)
    elif mode == "deadlock":
        cb = FullGradRecorder(out_dir, "deadlock", only_rank0_gathers=True)
    else:
        cb = FullGradRecorder(out_dir, "fsdp2")
    trainer = _trainer(out_dir, [cb], distributed=True)
    # shuffle=False is overridden: Lightning injects DistributedSampler(shuffle=True, seed=0), see global_batches
    loader = DataLoader(make_dataset(), batch_size=BATCH, shuffle=False)
    if mode != "deadlock":
        trainer.fit(model, loader)
        return
    t0 = time.perf_counter()
    outcome: dict = {}
    try:
        trainer.fit(model, loader)
        outcome["finished"] = True
    except BaseException as e:  # noqa: BLE001
        outcome["finished"] = False
        outcome["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:600]
    outcome["seconds"] = round(time.perf_counter() - t0, 2)
    outcome["steps_recorded"] = sorted(cb.grads)
    outcome["global_step"] = trainer.global_step
    with open(os.path.join(out_dir, f"deadlock_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(outcome, f, indent=1)
    os._exit(0 if outcome["finished"] else 3)  # do not wait on a broken process group at exit


def run_reference(out_dir: str) -> None:
    L.seed_everything(SEED, verbose=False)
    model = ShardedMLP()
    cb = FullGradRecorder(out_dir, "reference")
    loader = DataLoader(make_dataset(), batch_sampler=global_batches())
    _trainer(out_dir, [cb], distributed=False).fit(model, loader)


def compare(out_dir: str) -> float:
    """Max abs error of the gathered gradients of every FSDP2 run found in ``out_dir`` (``fsdp2``, and
    ``hvp`` whose extra passes must leave training untouched) against the single-process reference."""
    ref = torch.load(os.path.join(out_dir, "reference_rank0.pt"), weights_only=False)
    steps = list(range(1, STEPS + 1))
    assert sorted(ref["grads"]) == steps, sorted(ref["grads"])
    worst_all = 0.0
    tags = [t for t in ("fsdp2", "hvp") if os.path.exists(os.path.join(out_dir, f"{t}_rank0.pt"))]
    assert tags, f"no fsdp2_rank0.pt or hvp_rank0.pt in {out_dir}"
    for tag in tags:
        runs = [torch.load(os.path.join(out_dir, f"{tag}_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        assert [f["global_step"] for f in runs] == [STEPS] * WORLD, [f["global_step"] for f in runs]
        assert sorted(runs[0]["grads"]) == steps, sorted(runs[0]["grads"])
        worst = 0.0
        for step in steps:
            # same examples: the global batch is the union of the ranks' batches
            union = sorted(runs[0]["indices"][step] + runs[1]["indices"][step])
            assert union == sorted(ref["indices"][step]), step
            for name, want in ref["grads"][step].items():
                info = runs[0]["info"][step][name]
                assert info["is_dtensor"] and info["param_type"] == "DTensor", info
                for r in range(WORLD):  # every rank gathered the same full gradient
                    got = runs[r]["grads"][step][name]
                    assert got.shape == want.shape
                    worst = max(worst, float((got - want).abs().max()))
        if tag == "fsdp2":
            print("grad types at on_before_optimizer_step (rank 0, step 1):")
            for name, i in runs[0]["info"][1].items():
                print(f"  {name}: param {i['param_type']}, grad {i['grad_type']} {i['placements']},"
                      f" local {i['local_shape']} of {i['full_shape']}")
        gather = max(max(f["gather_seconds"].values()) for f in runs)
        print(f"[{tag}] max |full_tensor() grad - single-process grad| over {STEPS} steps, 4 params, 2 ranks:"
              f" {worst:.3e} (tolerance {TOL:g}); slowest recording pass {gather * 1e3:.1f} ms")
        worst_all = max(worst_all, worst)
    return worst_all


# --------------------------------------------------------------------------------------------------------
# gradwatch mode: the GradWatch Lightning callback under FSDP2 (tests/callbacks/test_fsdp2.py)
# --------------------------------------------------------------------------------------------------------

SHARPNESS_EVERY = 2
FAIL_SPECTRA_STEP, FAIL_SPECTRA_RANK = 3, 0  # GradSpectrum's share (all ranks, layers spread) raising on rank 0
FAIL_SHARPNESS_STEP, FAIL_SHARPNESS_RANK = 4, 1  # an all-ranks one raising on rank 1 only, mid-forward
GW_MODES = ("clean", "faulty")


def gradwatch_callback(on_error: str):  # noqa: ANN201
    """Spectra every step and sharpness every ``SHARPNESS_EVERY`` steps, tight enough that two runs on the same
    weights agree far below the tests' tolerances; no budget (every due step runs)."""
    from gradwatch import SharpnessConfig, SpectraConfig
    from gradwatch.callbacks.lightning import GradWatch

    return GradWatch(spectra=SpectraConfig(every=1),
                     sharpness=SharpnessConfig(every=SHARPNESS_EVERY, probe_size=16, max_iter=100, tol=1e-6),
                     max_overhead=None, on_error=on_error)


class RunRecord(Callback):
    """On every rank: the full final weights (``full_tensor()``, a collective, so on every rank), the steps,
    and the warnings gradwatch gave during the fit; written to ``<out_dir>/rank<r>.pt`` at train end. Put it
    last in ``callbacks`` (GradWatch's train-end hook runs first)."""

    def __init__(self, out_dir: str, gw) -> None:  # noqa: ANN001
        self.out_dir, self.gw = out_dir, gw
        self._catcher = None
        self._caught: list = []
        self._t0 = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        import warnings

        self._t0 = time.perf_counter()
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        said = [str(w.message) for w in self._caught if str(w.message).startswith("gradwatch")]
        final = {n: (p.full_tensor() if _is_dtensor(p) else p).detach().clone()
                 for n, p in pl_module.named_parameters()}
        torch.save({**self.extra(trainer), "final": final, "global_step": trainer.global_step,
                    "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                    "log_dir": self.gw.log_dir,
                    "param_types": sorted({type(p).__name__ for p in pl_module.parameters()}),
                    "local_shapes": {n: list(p.to_local().shape) if _is_dtensor(p) else list(p.shape)
                                     for n, p in pl_module.named_parameters()},
                    "warnings": said, "fit_seconds": time.perf_counter() - self._t0},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))

    def extra(self, trainer) -> dict:  # noqa: ANN001
        """More entries for ``rank<r>.pt`` (none here)."""
        return {}


class FaultInjector(Callback):
    """Makes gradwatch fail on one rank only: GradSpectrum's share on ``FAIL_SPECTRA_RANK`` (the statistics of
    the layers it owns, ``gradwatch.metrics.spectra_ranks.owned_statistics``) raises at ``FAIL_SPECTRA_STEP``,
    and the probe forward of Sharpness raises on ``FAIL_SHARPNESS_RANK`` at
    ``FAIL_SHARPNESS_STEP`` in a forward pre-hook of the second sharded Linear, which runs after FSDP's own
    pre-forward (registered with ``prepend=True``): that module and the root are left mid-forward, FSDP's
    post-forward never runs. Put it after GradWatch in ``callbacks``."""

    def __init__(self, gw) -> None:  # noqa: ANN001
        self.gw = gw
        self.handle = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        from gradwatch.metrics import spectra_ranks

        rank = trainer.global_rank

        def pre_hook(module, args):  # noqa: ANN001, ANN202
            if (not module.training and rank == FAIL_SHARPNESS_RANK
                    and trainer.global_step + 1 == FAIL_SHARPNESS_STEP):
                raise RuntimeError(f"injected: probe forward fails on rank {rank}")

        self.handle = pl_module.net[2].register_forward_pre_hook(pre_hook)
        original = spectra_ranks.owned_statistics

        def owned_statistics(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if trainer.global_step + 1 == FAIL_SPECTRA_STEP and rank == FAIL_SPECTRA_RANK:
                raise RuntimeError(f"injected: spectra fail on rank {rank}")
            return original(*args, **kwargs)

        self.restore = (spectra_ranks, original)
        spectra_ranks.owned_statistics = owned_statistics

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.handle is not None:
            self.handle.remove()
        module, original = self.restore
        module.owned_statistics = original


def _gw_trainer(out_dir: str, callbacks: list, distributed: bool, steps: int = STEPS) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    kw: dict = dict(accelerator="cpu", max_steps=steps, callbacks=callbacks, log_every_n_steps=1,
                    logger=TensorBoardLogger(save_dir=out_dir, name="tb", version=0), enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=out_dir)
    if distributed:
        from lightning.pytorch.strategies import ModelParallelStrategy

        # a short collective timeout: a rank left waiting fails in 30 s instead of hanging for 30 minutes
        kw.update(devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1,
                                                                timeout=timedelta(seconds=30)))
    else:
        kw.update(devices=1)
    return L.Trainer(**kw)


def run_gradwatch_fsdp2(out_dir: str) -> None:
    """Both ``GW_MODES`` in one launch (one process-group start-up): ``clean`` (``on_error="raise"``: any
    failure is fatal) and ``faulty`` (``FaultInjector``, ``on_error="warn"``), then ``SIGNALS_MODES``
    (``run_signals_fsdp2``). Each writes under ``<out_dir>/<mode>/``: ``rank<r>.pt`` and rank 0's TensorBoard
    run ``tb/version_0``."""
    for mode in GW_MODES:
        run_dir = os.path.join(out_dir, mode)
        os.makedirs(run_dir, exist_ok=True)
        L.seed_everything(SEED, verbose=False)
        model = ShardedMLP()
        gw = gradwatch_callback("raise" if mode == "clean" else "warn")
        record = RunRecord(run_dir, gw)
        callbacks = [gw, FaultInjector(gw), record] if mode == "faulty" else [gw, record]
        loader = DataLoader(make_dataset(), batch_size=BATCH, shuffle=False)  # Lightning shuffles (global_batches)
        _gw_trainer(run_dir, callbacks, distributed=True).fit(model, loader)
    run_signals_fsdp2(out_dir)


def run_gradwatch_reference(out_dir: str) -> None:
    """One process, the same global batches and the same GradWatch settings (``on_error="raise"``)."""
    os.makedirs(out_dir, exist_ok=True)
    L.seed_everything(SEED, verbose=False)
    model = ShardedMLP()
    gw = gradwatch_callback("raise")
    record = RunRecord(out_dir, gw)
    loader = DataLoader(make_dataset(), batch_sampler=global_batches())
    _gw_trainer(out_dir, [gw, record], distributed=False).fit(model, loader)


# --------------------------------------------------------------------------------------------------------
# gradwatch signals: the opposing-signals family under FSDP2 (tests/callbacks/test_fsdp2.py)
# --------------------------------------------------------------------------------------------------------

SIGNALS_STEPS = 12  # with a window of 5 one-step changes, pairs are looked for from probe step 6 on
SIGNALS_N = SIGNALS_STEPS * BATCH * WORLD  # 192: one epoch exactly, as in make_dataset
SIGNALS_WINDOW = 5
SIGNALS_GROUP = 16  # planted examples per side
SIGNALS_STRENGTH = 8.0  # the shared feature, spread over [0.6, 1.4] x this (distinct movements, a clear z order)
SIGNALS_SPREAD = 0.4
# the whole dataset is the probe (sorted dataset indices): batches of 80, 80, 32; rank 0 takes the first two,
# rank 1 the last (unequal blocks, gathered in probe order)
SIGNALS_PROBE_BATCH = 80
SIGNALS_CONFIRM_ALARM = 0.2
SIGNALS_MODES = ("signals", "signals_confirm")


def _spread(indices: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` of ``indices``, evenly spaced from the first to the last."""
    return indices[torch.linspace(0, len(indices) - 1, k).round().long()]


def make_signals_dataset() -> tuple[TensorDataset, list[int], list[int]]:
    """(dataset, side a, side b): ``SIGNALS_N`` examples like ``make_dataset``'s (16 features, 4 classes from a
    fixed linear map, the example index third) with an opposing signal planted as in
    tests/metrics/_signals_helpers.py: two groups of ``SIGNALS_GROUP`` (labels 1 and 0) share a strong feature
    x0 (0 elsewhere) and keep a tenth of their other features, so a step that fits one side unfits the other.

    Each side is spread over the whole dataset, so every rank's block of the probe holds members of both
    sides and every rank runs the confirmation forward. (A rank whose block held none would skip it while
    the other runs it; under FSDP2 that desynchronises the next training backward: FSDP's forward-order
    records, which an extra forward appends to, are not put back by gradwatch.engine.fsdp.unsharded.)
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SIGNALS_N, 16, generator=g)
    x[:, 0] = 0.0
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    a, b = (_spread(torch.nonzero(y == label).reshape(-1), SIGNALS_GROUP) for label in (1, 0))
    levels = SIGNALS_STRENGTH * torch.linspace(1 - SIGNALS_SPREAD, 1 + SIGNALS_SPREAD, 2 * SIGNALS_GROUP)
    for k, side in enumerate((a, b)):
        x[side, 1:] *= 0.1
        x[side, 0] = levels[k::2]  # interleaved: no member of a moves exactly as one of b
    return TensorDataset(x, y, torch.arange(SIGNALS_N)), a.tolist(), b.tolist()


def per_example_loss(model: nn.Module, batch) -> torch.Tensor:  # noqa: ANN001
    """The probe's per-example loss (a batch is ``(x, y, index)``, for which gradwatch infers none)."""
    x, y, _ = batch
    return F.cross_entropy(model(x), y, reduction="none")


def signals_callback(mode: str):  # noqa: ANN201
    """The signals family probing every step over the whole dataset, spectra off, no budget.

    ``signals``: strict (``on_error="raise"``, where an alert is fatal too), so the alarm is out of reach
    (1.0: it needs a perfect score) and no confirmation pass runs. ``signals_confirm``: ``on_error="warn"`` and
    alarm ``SIGNALS_CONFIRM_ALARM``, so the planted pair alarms, its last-layer gradients are confirmed
    through the unsharded modules on both ranks (summed over ranks) and the alert goes to alerts.jsonl.
    """
    from gradwatch import SignalsConfig
    from gradwatch.callbacks.lightning import GradWatch

    strict = mode == "signals"
    cfg = SignalsConfig(every=1, window=SIGNALS_WINDOW, probe_size=SIGNALS_N, batch_size=SIGNALS_PROBE_BATCH,
                        alarm=1.0 if strict else SIGNALS_CONFIRM_ALARM)
    return GradWatch(signals=cfg, spectra=False, max_overhead=None, on_error="raise" if strict else "warn",
                     loss_fn=per_example_loss)


class SignalsRecord(RunRecord):
    """``RunRecord`` plus, on every rank, the signals family's carried window (``changes`` [window, probe
    examples], the one-step changes ending at ``change_steps``, the latest losses ``last``, the probe's dataset
    ``indices``) and the probe's dataset indices as the engine drew them."""

    def extra(self, trainer) -> dict:  # noqa: ANN001
        state = self.gw.watcher.state_dict()
        carried = next(v["carried"] for k, v in state["diagnostics"].items() if ":signals:" in k)
        return {"carried": carried, "probe_indices": list(self.gw.watcher.probe().indices)}


def _signals_fit(run_dir: str, mode: str, distributed: bool) -> None:
    os.makedirs(run_dir, exist_ok=True)
    L.seed_everything(SEED, verbose=False)
    model = ShardedMLP()
    gw = signals_callback(mode)
    data = make_signals_dataset()[0]
    if distributed:  # Lightning shuffles (global_batches)
        loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    else:
        loader = DataLoader(data, batch_sampler=global_batches(SIGNALS_N, SIGNALS_STEPS))
    trainer = _gw_trainer(run_dir, [gw, SignalsRecord(run_dir, gw)], distributed=distributed, steps=SIGNALS_STEPS)
    trainer.fit(model, loader)


def run_signals_fsdp2(out_dir: str) -> None:
    """Each of ``SIGNALS_MODES`` under FSDP2, into ``<out_dir>/<mode>/`` (as ``run_gradwatch_fsdp2`` writes, plus
    the carried window in ``rank<r>.pt`` and ``signals.jsonl``, ``alerts.jsonl`` beside rank 0's events)."""
    for mode in SIGNALS_MODES:
        _signals_fit(os.path.join(out_dir, mode), mode, distributed=True)


def run_signals_reference(out_dir: str) -> None:
    """Each of ``SIGNALS_MODES`` in one process on the same global batches, into ``<out_dir>/<mode>_reference/``."""
    for mode in SIGNALS_MODES:
        _signals_fit(os.path.join(out_dir, f"{mode}_reference"), mode, distributed=False)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "PL_", "RANK", "GROUP_RANK",
                                 "LOCAL_WORLD_SIZE", "TORCHELASTIC"))}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_dir, mode = argv[1], (argv[2] if len(argv) > 2 else "all")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    if mode in ("fsdp2", "hvp", "deadlock"):
        run_fsdp2(out_dir, mode)
        return 0
    runs = {"reference": run_reference, "gradwatch": run_gradwatch_fsdp2, "gradwatch_reference": run_gradwatch_reference,
            "signals": run_signals_fsdp2, "signals_reference": run_signals_reference}
    if mode in runs:
        runs[mode](out_dir)
        return 0
    if mode == "compare":
        return 0 if compare(out_dir) <= TOL else 1
    if mode == "all":
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out_dir, "fsdp2"], env=_clean_env(),
                              capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:])
            return proc.returncode
        t1 = time.perf_counter()
        run_reference(out_dir)
        t2 = time.perf_counter()
        worst = compare(out_dir)
        print(f"timings: fsdp2 (2 processes, incl. launch) {t1 - t0:.1f} s, reference {t2 - t1:.1f} s")
        return 0 if worst <= TOL else 1
    print(f"unknown mode {mode!r}; one of all, fsdp2, reference, compare, hvp, deadlock, gradwatch, "
          "gradwatch_reference, signals, signals_reference")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
