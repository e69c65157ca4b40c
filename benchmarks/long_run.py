"""Resident memory over a long run with every gradwatch family on at every step.

A tiny GPT-2 (built from a config; nothing is downloaded) trains on synthetic random tokens with Lightning
and AdamW; spectra (with per-example spectra and heatmaps), sharpness, opposing signals and every stability
proxy run at every step (the spectra heatmap images every 100 steps) (``max_overhead=None``: the budget postpones nothing), writing TensorBoard events
and JSONL records as a user's run does. The process's resident set size (psutil RSS) is sampled every
``--sample-every`` steps; the report prints the samples and the growth after the warm-up (the first
sample past ``--warmup`` steps up to the last one), in MiB and in MiB per 1,000 steps.

    python benchmarks/long_run.py                         # 2,000 steps, sampled every 100
    python benchmarks/long_run.py --steps 200 --sample-every 20 --warmup 40

Without ``transformers`` the model is ``lightning.pytorch.demos.Transformer`` of similar size. The test
suite runs :func:`long_run` at 200 steps (``tests/reliability/test_long_run.py``).
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


def build_model(kind: str) -> nn.Module:
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=VOCAB,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)


class LanguageModel(pl.LightningModule):
    """Next-token prediction with AdamW."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.model = build_model(kind)

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


def every_family_every_step(heatmap_every: int = 100) -> dict[str, Any]:
    """GradWatch keywords: every registered family on, each of its cadences (``every``, ``*_every``) at 1 but
    the spectra heatmaps (at ``heatmap_every``)."""
    import dataclasses

    from gradwatch import SharpnessConfig, SignalsConfig, SpectraConfig
    from gradwatch.registry import families

    small = {"spectra": SpectraConfig(per_example=True, per_example_size=4),  # heatmap_every: see below
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


@dataclass(frozen=True)
class Samples:
    """RSS samples: ``steps[i]`` (the global step) and ``rss_mib[i]``; seconds of the whole fit."""

    steps: tuple[int, ...]
    rss_mib: tuple[float, ...]
    seconds: float
    warnings: tuple[str, ...]

    def growth_mib(self, warmup: int) -> float:
        """RSS of the last sample minus that of the first sample at or after step ``warmup``."""
        first = next(i for i, s in enumerate(self.steps) if s >= warmup)
        return self.rss_mib[-1] - self.rss_mib[first]


class RSSSampler(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.steps, self.rss = every, [], []
        self.process = psutil.Process()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            gc.collect()
            self.steps.append(step)
            self.rss.append(self.process.memory_info().rss / 2**20)


def long_run(root: str, steps: int, sample_every: int, kind: str = "gpt2", batch: int = 8,
             seed: int = 0) -> Samples:
    """Train ``steps`` steps under ``root`` with every family at every step; RSS every ``sample_every`` steps."""
    from gradwatch.callbacks.lightning import GradWatch

    pl.seed_everything(seed, verbose=False)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randint(0, VOCAB, (batch * 64, SEQ), generator=g))  # epochs repeat the data
    sampler = RSSSampler(sample_every)
    gw = GradWatch(**every_family_every_step(), loss_fn=per_example_loss, max_overhead=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                         logger=TensorBoardLogger(root, name="long_run"), callbacks=[gw, sampler],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LanguageModel(kind), DataLoader(data, batch_size=batch, shuffle=True))
    seen = tuple(sorted({str(w.message) for w in caught if "gradwatch" in str(w.message)}))
    return Samples(tuple(sampler.steps), tuple(sampler.rss), time.perf_counter() - t0, seen)


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
    print(f"{'step':>6} {'RSS MiB':>9}")
    for step, rss in zip(s.steps, s.rss_mib):
        print(f"{step:>6} {rss:>9.1f}")
    grow = s.growth_mib(args.warmup)
    span = s.steps[-1] - next(x for x in s.steps if x >= args.warmup)
    print(f"\n{args.steps} steps in {s.seconds:.0f} s; RSS growth from step >= {args.warmup} to {s.steps[-1]}: "
          f"{grow:+.1f} MiB ({grow / max(span, 1) * 1000:+.1f} MiB per 1,000 steps); peak {max(s.rss_mib):.1f} MiB")
    for w in s.warnings:
        print(f"warning: {w}")


if __name__ == "__main__":
    main()
