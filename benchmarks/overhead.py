"""Training wall time with and without gradwatch's Lightning callback at its default settings.

A small GPT-2 (built from a config; nothing is downloaded) trains on synthetic random tokens on the
CPU. Runs come in pairs (``--pairs``), baseline first in even pairs and gradwatch first in odd ones (ABBA,
so an order effect does not favour one side), after one short warm-up pair, each from the same seed on the
same data with the same TensorBoardLogger set-up (so the logging cost is equal); the time of
``trainer.fit`` is measured. The report gives each pair's ratio, their median, gradwatch's own
``gradwatch/overhead`` estimate (``cb.watcher.overhead()`` after fit), its share without the one-off first
runs (what ``max_overhead`` bounds), and whether the gradwatch run ended with bitwise the same weights as
its baseline (it must: gradwatch only observes).

    python benchmarks/overhead.py                 # 300 steps, 2 pairs, batch 16 x 64
    python benchmarks/overhead.py --steps 1000 --pairs 3

Without ``transformers`` the model is ``lightning.pytorch.demos.Transformer`` of similar size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.callbacks.lightning import GradWatch


def build_model(kind: str, vocab: int, seq: int) -> nn.Module:
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=4, n_embd=192, n_head=4, n_positions=seq, vocab_size=vocab,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=vocab, ninp=192, nhead=4, nhid=768, nlayers=2, dropout=0.1)


class LanguageModel(pl.LightningModule):
    """Next-token prediction with AdamW; logs its training loss like any user's module."""

    def __init__(self, kind: str, vocab: int, seq: int) -> None:
        super().__init__()
        self.kind = kind
        self.model = build_model(kind, vocab, seq)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        if self.kind == "gpt2":
            loss = self.model(input_ids=ids, labels=ids).loss
        else:
            out = self.model(ids[:, :-1], ids[:, 1:])
            loss = nn.functional.nll_loss(out, ids[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


FAMILIES: dict[str, Any] = {}  # the families switched on, each at its default settings (set in main)


def per_example_loss(module: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Next-token cross-entropy of each sequence: what the probe-set families need for these (ids,) batches."""
    (ids,) = batch
    if module.kind == "gpt2":
        logits = module.model(input_ids=ids).logits[:, :-1]
    else:
        logits = module.model(ids[:, :-1], ids[:, 1:]).view(ids.shape[0], ids.shape[1] - 1, -1)
        return -logits.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)  # the demo returns log-probabilities
    return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def train_once(with_gradwatch: bool, kind: str, data: TensorDataset, steps: int, batch: int, seed: int,
               root: str, name: str) -> tuple[float, float, dict[str, Tensor], GradWatch | None]:
    """One seeded run; returns fit()'s wall seconds and process CPU seconds, the final weights, the callback."""
    pl.seed_everything(seed, verbose=False)
    module = LanguageModel(kind, vocab=int(data.tensors[0].max()) + 1, seq=data.tensors[0].shape[1])
    callback = GradWatch(**FAMILIES, loss_fn=per_example_loss) if with_gradwatch else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
        logger=TensorBoardLogger(root, name=name), callbacks=[callback] if callback else [],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=50, num_sanity_val_steps=0, deterministic=True,
    )
    loader = DataLoader(data, batch_size=batch, shuffle=False, num_workers=0)
    c0, t0 = time.process_time(), time.perf_counter()
    trainer.fit(module, loader)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return seconds, cpu_seconds, weights, callback


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--pairs", type=int, default=2, help="timed baseline/gradwatch pairs (default 2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--model", choices=["gpt2", "demo"], default=None,
                        help="gpt2 (default when transformers is installed) or lightning's demo Transformer")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps of the untimed warm-up pair")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nothing-due", action="store_true",
                        help="every chosen family (and each of its *_every cadences) runs at step 1 only: what the "
                             "steps with nothing due cost")
    parser.add_argument("--families", default="spectra",
                        help="comma-separated families switched on at their default settings (default: spectra, "
                             "i.e. GradWatch() as it comes); e.g. spectra,signals,stability")
    args = parser.parse_args(argv)
    from gradwatch.registry import families

    known = [f.key for f in families()]
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    if not chosen or any(f not in known for f in chosen):
        parser.error(f"--families expected a comma-separated subset of {known}, got {args.families!r}")
    FAMILIES.update({key: key in chosen for key in known})
    if args.nothing_due:
        import dataclasses

        from gradwatch.config import Cadence

        for f in families():
            if FAMILIES[f.key]:
                cfg = f.config_class()
                FAMILIES[f.key] = dataclasses.replace(cfg, **{x.name: Cadence.at([1]) for x in dataclasses.fields(cfg)
                                                              if x.name == "every" or x.name.endswith("_every")})
    for flag in ("steps", "pairs", "batch", "seq", "vocab"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kind = args.model
    if kind is None:
        try:
            import transformers  # noqa: F401
            kind = "gpt2"
        except ImportError:
            kind = "demo"
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*|.*log_every_n_steps.*")
    for noisy in ("lightning.pytorch", "lightning.fabric", "transformers"):
        import logging
        logging.getLogger(noisy).setLevel(logging.ERROR)

    g = torch.Generator().manual_seed(args.seed)
    n_seq = args.batch * args.steps  # one epoch = the run: every step sees a new batch
    data = TensorDataset(torch.randint(0, args.vocab, (n_seq, args.seq), generator=g))
    probe = LanguageModel(kind, args.vocab, args.seq)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    print(f"model: {kind} ({n_params / 1e6:.2f}M parameters), synthetic tokens, batch {args.batch} x {args.seq}, "
          f"vocab {args.vocab}, AdamW; CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    cadences = ", ".join(f"{f.key} every {getattr(FAMILIES[f.key], 'every', f.config_class().every)!r}"
                         for f in families() if FAMILIES[f.key])
    print(f"gradwatch: GradWatch({', '.join(f'{k}={v}' for k, v in FAMILIES.items())}) at default settings "
          f"({cadences}; TensorBoardLogger shared)")

    rows = []
    with tempfile.TemporaryDirectory() as root:
        warm = min(args.warmup_steps, args.steps)
        train_once(False, kind, data, warm, args.batch, args.seed, root, "warmup_baseline")
        train_once(True, kind, data, warm, args.batch, args.seed, root, "warmup_gradwatch")
        for i in range(args.pairs):
            # ABBA: every other pair runs gradwatch first, so an order effect (caches, allocator, the machine
            # warming) falls on both sides of the median instead of one
            order = (False, True) if i % 2 == 0 else (True, False)
            runs_i = {gw: train_once(gw, kind, data, args.steps, args.batch, args.seed, root,
                                     f"{'gradwatch' if gw else 'baseline'}_{i}") for gw in order}
            (base_s, base_c, base_w, _), (gw_s, gw_c, gw_w, cb) = runs_i[False], runs_i[True]
            assert cb is not None
            same = base_w.keys() == gw_w.keys() and all(torch.equal(base_w[k], gw_w[k]) for k in base_w)
            rows.append((base_s, gw_s, gw_s / base_s, base_c, gw_c, gw_c / base_c, cb.watcher.overhead(), same))
            runs = {cb.watcher._key(j).split(":", 2)[2]: b["runs"] for j, b in cb.watcher._budgeted.items()}
            print(f"  pair {i}: baseline {base_s:.2f} s, gradwatch {gw_s:.2f} s; gradwatch/overhead without the "
                  f"one-off first runs (what max_overhead bounds) {cb.watcher.budgeted_overhead():.2%}; postponed steps "
                  f"{cb.watcher.postponed_steps}" + (f"; runs of budgeted cadences {runs}" if runs else ""), flush=True)

    print(f"\nsteps {args.steps}, {args.pairs} pairs (ABBA order); wall = time of trainer.fit, "
          "cpu = process CPU time of trainer.fit (all threads); median over pairs")
    header = (f"{'pair':>4} {'steps':>6} {'baseline s':>11} {'gradwatch s':>12} {'ratio':>7} | {'cpu base s':>11} "
              f"{'cpu gw s':>9} {'cpu ratio':>9} | {'gradwatch/overhead':>19} {'same weights':>13}")
    print(header)
    print("-" * len(header))

    def line(label: str, r: Sequence[Any]) -> str:
        return (f"{label:>4} {args.steps:>6} {r[0]:>11.2f} {r[1]:>12.2f} {r[2]:>7.3f} | {r[3]:>11.2f} {r[4]:>9.2f} "
                f"{r[5]:>9.3f} | {r[6]:>19.2%} {str(r[7]):>13}")

    for i, r in enumerate(rows):
        print(line(str(i), r))
    print("-" * len(header))
    med = [statistics.median(r[j] for r in rows) for j in range(7)] + [all(r[7] for r in rows)]
    print(line("med", med))
    median_ratio = med[2]
    if len(rows) > 1:
        print(f"ratio over pairs ranges {min(r[2] for r in rows):.3f} .. {max(r[2] for r in rows):.3f}: differences "
              "within this spread are run-to-run noise (more pairs: --pairs)")
    print(f"target wall-time ratio <= 1.02 at default settings: {'met' if median_ratio <= 1.02 else 'NOT met'} "
          f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
