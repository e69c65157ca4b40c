"""Resident memory over a long run with every gradwatch family on at every step.

A tiny GPT-2 (built from a config; nothing is downloaded) trains on synthetic random tokens with Lightning
and AdamW; spectra (with per-example spectra and heatmaps), sharpness, opposing signals and every stability
proxy run at every step (the spectra heatmap images every 100 steps) (``max_overhead=None``: the budget postpones nothing), writing TensorBoard events
and JSONL records as a user's run does. The process's resident set size (psutil RSS) is sampled every
``--sample-every`` steps; the report prints the samples and the growth after the warm-up (the first
sample past ``--warmup`` steps up to the last one), in MiB and in MiB per 1,000 steps.

    python benchmarks/long_run.py                         # 2,000 steps, sampled every 100
    python benchmarks/long_run.py --steps 500 --sample-every 50 --warmup 100 --threads 1   # ~20 min, 2 cores

Each sample (:func:`resources`) also counts open file descriptors, threads, live gradwatch objects, live
tensors, gc-tracked objects and the model's hooks. Without ``transformers`` the model is
``lightning.pytorch.demos.Transformer`` of similar size. The test suite runs :func:`long_run` for 100 steps
on a smaller GPT-2 with the probe families every 5th step (``tests/reliability/test_long_run.py``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ = 64, 16


def build_model(kind: str, n_layer: int = 2, n_embd: int = 32) -> nn.Module:
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=SEQ, vocab_size=VOCAB,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=n_embd, nhead=2, nhid=2 * n_embd, nlayers=n_layer, dropout=0.0)


class LanguageModel(pl.LightningModule):
    """Next-token prediction with AdamW."""

    def __init__(self, kind: str, **size: int) -> None:
        super().__init__()
        self.kind = kind
        self.model = build_model(kind, **size)

    def logits(self, ids: Tensor) -> Tensor:
        if self.kind == "gpt2":
            return self.model(input_ids=ids[:, :-1]).logits
        return self.model(ids[:, :-1], ids[:, 1:]).view(ids.shape[0], ids.shape[1] - 1, -1)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        logits = self.logits(ids)
        if self.kind == "gpt2":
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:  # the demo returns log-probabilities
            loss = nn.functional.nll_loss(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def per_example_loss(module: LanguageModel, batch: Sequence[Tensor]) -> Tensor:
    """Each sequence's mean next-token cross-entropy (the probe families' loss for these ``(ids,)`` batches)."""
    (ids,) = batch
    logits = module.logits(ids)
    if module.kind == "gpt2":
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    return -logits.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)


def every_family_every_step(heatmap_every: int = 100, small: dict[str, Any] | None = None) -> dict[str, Any]:
    """GradWatch keywords: every registered family on, each of its cadences (``every``, ``*_every``) at 1 but
    the spectra heatmaps (at ``heatmap_every``); ``small`` replaces the sized configs given here."""
    import dataclasses

    from gradwatch import SharpnessConfig, SignalsConfig, SpectraConfig
    from gradwatch.registry import families

    small = small or {"spectra": SpectraConfig(per_example=True, per_example_size=4),  # heatmap_every: see below
                      "sharpness": SharpnessConfig(probe_size=16, max_iter=10, trace_samples=2),
                      "signals": SignalsConfig(probe_size=32, window=5, burst=1, batch_size=16)}
    out: dict[str, Any] = {}
    for f in families():
        cfg = small.get(f.key, f.config_class())
        out[f.key] = dataclasses.replace(cfg, **{x.name: 1 for x in dataclasses.fields(cfg)
                                                 if x.name == "every" or x.name.endswith("_every")})
    # a heatmap is an image of the logged history, not a diagnostic: drawn every step it costs 1.5 s (matplotlib)
    out["spectra"] = dataclasses.replace(out["spectra"], heatmap_every=heatmap_every)
    return out


def hook_count(module: nn.Module) -> int:
    """Forward, backward and gradient hooks on ``module``'s submodules and parameters, and the global ones."""
    from torch.nn.modules import module as m

    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    n = sum(len(getattr(sub, k, None) or ()) for sub in module.modules() for k in names)
    n += sum(len(getattr(p, k, None) or ()) for p in module.parameters()
             for k in ("_backward_hooks", "_post_accumulate_grad_hooks"))
    return n + sum(len(getattr(m, f"_global{k}", None) or ()) for k in names)


def _module_of(obj: object) -> str:
    m = getattr(type(obj), "__module__", None)
    return m if isinstance(m, str) else ""


def resources(module: nn.Module | None = None) -> dict[str, float]:
    """After a full collection: RSS (MiB), open file descriptors, OS threads, Python threads, live objects of
    gradwatch's own types, live tensors, all gc-tracked objects and ``module``'s hooks (:func:`hook_count`)."""
    import threading

    gc.collect()
    proc = psutil.Process()
    objs = gc.get_objects()
    ours = tensors = 0
    for o in objs:  # one pass over some 500,000 objects (the imports' mostly): about 0.3 s
        ours += _module_of(o).startswith("gradwatch")
        tensors += isinstance(o, torch.Tensor)
    out = {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(), "threads": proc.num_threads(),
           "py_threads": threading.active_count(), "gradwatch_objects": ours, "tensors": tensors,
           "objects": len(objs)}
    del objs
    if module is not None:
        out["hooks"] = hook_count(module)
    return out


@dataclass(frozen=True)
class Samples:
    """Resource samples (:func:`resources`) at the global steps ``steps``; seconds of the whole fit."""

    steps: tuple[int, ...]
    counts: dict[str, tuple[float, ...]]
    seconds: float
    warnings: tuple[str, ...]
    files: tuple[tuple[str, ...], ...] = ()  # the regular files open at each sample

    def files_changed(self) -> list[tuple[int, list[str], list[str]]]:
        """(step, opened, closed) at each sample whose open files differ from the previous sample's."""
        out = []
        for step, before, now in zip(self.steps[1:], self.files, self.files[1:]):
            if set(now) != set(before):
                out.append((step, sorted(set(now) - set(before)), sorted(set(before) - set(now))))
        return out

    @property
    def rss_mib(self) -> tuple[float, ...]:
        return self.counts["rss_mib"]

    def after(self, key: str, warmup: int) -> tuple[float, ...]:
        """The samples of ``key`` at steps >= ``warmup``."""
        return tuple(v for s, v in zip(self.steps, self.counts[key]) if s >= warmup)

    def growth_mib(self, warmup: int) -> float:
        """RSS of the last sample minus that of the first sample at or after step ``warmup``."""
        rss = self.after("rss_mib", warmup)
        return rss[-1] - rss[0]

    def slope_per_1000(self, warmup: int, key: str = "rss_mib") -> float:
        """Least-squares slope of ``key`` over the samples at steps >= ``warmup``, per 1,000 steps (for RSS:
        MiB per 1,000 steps; steadier than the last-minus-first growth on a noisy allocator)."""
        x = [s for s in self.steps if s >= warmup]
        y = self.after(key, warmup)
        mx, my = sum(x) / len(x), sum(y) / len(y)
        return 1000 * sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


class ResourceSampler(pl.Callback):
    """:func:`resources` every ``every`` global steps, at the end of the step (put it after GradWatch)."""

    def __init__(self, every: int) -> None:
        self.every, self.steps, self.samples, self.files = every, [], [], []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.steps.append(step)
            self.samples.append(resources(trainer.lightning_module))
            self.files.append(tuple(sorted(f.path for f in psutil.Process().open_files())))


def long_run(root: str, steps: int, sample_every: int, kind: str = "gpt2", batch: int = 8, seed: int = 0,
             gradwatch: dict[str, Any] | None = None, callbacks: Sequence[pl.Callback] = (),
             size: dict[str, int] | None = None) -> Samples:
    """Train ``steps`` steps under ``root`` with every family at every step (or the GradWatch keywords
    ``gradwatch``; an empty dict: no GradWatch), ``callbacks`` after it; resources every ``sample_every``
    steps. ``size``: ``n_layer``, ``n_embd`` of the model."""
    from gradwatch.callbacks.lightning import GradWatch

    pl.seed_everything(seed, verbose=False)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randint(0, VOCAB, (batch * 64, SEQ), generator=g))  # epochs repeat the data
    sampler = ResourceSampler(sample_every)
    keywords = every_family_every_step() if gradwatch is None else gradwatch
    gw = [GradWatch(**keywords, loss_fn=per_example_loss, max_overhead=None)] if keywords else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                         logger=TensorBoardLogger(root, name="long_run"), callbacks=[*gw, *callbacks, sampler],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LanguageModel(kind, **(size or {})), DataLoader(data, batch_size=batch, shuffle=True))
    seen = tuple(sorted({str(w.message) for w in caught if "gradwatch" in str(w.message)}))
    counts = {k: tuple(x[k] for x in sampler.samples) for k in sampler.samples[0]}
    return Samples(tuple(sampler.steps), counts, time.perf_counter() - t0, seen, tuple(sampler.files))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="steps before the growth is measured")
    parser.add_argument("--model", choices=["gpt2", "demo"], default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model
    if kind is None:
        try:
            import transformers  # noqa: F401
            kind = "gpt2"
        except ImportError:
            kind = "demo"
    for noisy in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    print(f"model: tiny {kind}, vocab {VOCAB}, seq {SEQ}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"families, every cadence at 1: {sorted(every_family_every_step())}")
    with tempfile.TemporaryDirectory() as root:
        s = long_run(root, args.steps, args.sample_every, kind)
        changed = [(step, [os.path.relpath(f, root) for f in opened], [os.path.relpath(f, root) for f in closed])
                   for step, opened, closed in s.files_changed()]
    keys = list(s.counts)
    print(f"{'step':>6} " + " ".join(f"{k:>17}" for k in keys))
    for i, step in enumerate(s.steps):
        print(f"{step:>6} " + " ".join(f"{s.counts[k][i]:>17.1f}" for k in keys))
    grow = s.growth_mib(args.warmup)
    span = s.steps[-1] - next(x for x in s.steps if x >= args.warmup)
    print(f"\n{args.steps} steps in {s.seconds:.0f} s; RSS growth from step >= {args.warmup} to {s.steps[-1]}: "
          f"{grow:+.1f} MiB ({grow / max(span, 1) * 1000:+.1f} MiB per 1,000 steps; least-squares slope "
          f"{s.slope_per_1000(args.warmup):+.1f}); peak {max(s.rss_mib):.1f} MiB")
    for k in keys[1:]:
        print(f"{k} after step {args.warmup}: {min(s.after(k, args.warmup)):.0f} to {max(s.after(k, args.warmup)):.0f}")
    print(f"regular files open at step {s.steps[0]}: {len(s.files[0]) if s.files else 0}")
    for step, opened, closed in changed:
        print(f"open files changed by step {step}: opened {opened or '-'}, closed {closed or '-'}")
    for w in s.warnings:
        print(f"warning: {w}")


if __name__ == "__main__":
    main()
