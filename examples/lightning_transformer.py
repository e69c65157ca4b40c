"""Lightning's own demo transformer, trained with gradwatch's Lightning callback, on text that ships with Python.

The model is ``lightning.pytorch.demos.LightningTransformer``: an ``nn.Transformer`` (2 encoder and 2 decoder
layers, d_model 200, fused ``in_proj_weight`` attention, which gradwatch splits into q, k and v), its
``training_step`` and its SGD optimizer, none of it written here. The demo trains on WikiText-2, which it
downloads; here the data is word-level text of the Python language reference that CPython ships for ``help()``
(``pydoc_data.topics``), cut into blocks of 35 words the way the demo cuts WikiText-2. Only the data hooks are
replaced (a subclass with ``prepare_data`` and ``train_dataloader``) and the loss is logged.

    python examples/lightning_transformer.py                  # 300 steps, ~1-2 minutes on 2 CPU cores
    tensorboard --logdir runs/lightning_transformer            # Custom Scalars, Images (heatmaps)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made a step of this model take
# 3.5 s with torch's two threads against 0.2 s with one (0.2 s with two once they sleep).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.demos import LightningTransformer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.callbacks.lightning import GradWatch  # noqa: E402

BLOCK = 35  # the demo's block size for WikiText-2
UNKNOWN = "<unk>"
END = "<eos>"


def python_reference_words(vocab_size: int = 2000) -> tuple[Tensor, list[str]]:
    """The text of ``pydoc_data.topics`` (the language reference behind ``help('assert')`` and friends) as word
    ids: lower-cased words and punctuation, ``<eos>`` at each line end, words outside the ``vocab_size - 2`` most
    frequent ones mapped to ``<unk>``."""
    from pydoc_data.topics import topics

    lines = [re.findall(r"[a-z0-9_]+|[^\sa-z0-9_]", line.lower()) for name in sorted(topics)
             for line in topics[name].splitlines() if line.strip()]
    counts = Counter(word for line in lines for word in line)
    vocab = [UNKNOWN, END] + [w for w, _ in counts.most_common(vocab_size - 2)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, 0) for line in lines for w in (*line, END)]
    return torch.tensor(ids, dtype=torch.long), vocab


class Blocks(Dataset):
    """Consecutive blocks of a token stream and the same blocks shifted by one (the demo's WikiText2 items)."""

    def __init__(self, ids: Tensor, block: int = BLOCK, limit: int | None = None) -> None:
        self.ids, self.block = ids, block
        self.n = len(ids) // block - 1 if limit is None else min(limit, len(ids) // block - 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.block
        return self.ids[start:start + self.block], self.ids[start + 1:start + self.block + 1]


class OfflineLightningTransformer(LightningTransformer):
    """The demo module with its own model, ``training_step`` and optimizer; only its data hooks are replaced
    (the demo's download WikiText-2) and its loss is logged."""

    def __init__(self, dataset: Dataset, vocab_size: int, batch_size: int = 16) -> None:
        super().__init__(vocab_size=vocab_size)
        self.dataset, self.batch_size = dataset, batch_size

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True)
        return loss


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2000, help="most frequent words kept (others: <unk>)")
    parser.add_argument("--every", type=int, default=10, help="gradient spectra every N optimizer steps")
    parser.add_argument("--heatmap-every", type=int, default=100, help="layer-by-step heatmaps every N steps")
    parser.add_argument("--log-dir", default="runs")
    # A step of this model takes ~30-60 ms on 2 CPU cores, a spectrum of its 22 watched matrices ~40 ms: spectra
    # every 10 steps need ~10% of the time, more than the library's default 5% budget.
    parser.add_argument("--max-overhead", type=float, default=0.3, help="share of wall time gradwatch may use")
    parser.add_argument("--small", action="store_true", help="a tiny run for the tests: 12 steps, spectra every 4")
    args = parser.parse_args(argv)
    if args.small:
        args.steps, args.every, args.heatmap_every, args.vocab, args.max_overhead = 12, 4, 12, 500, 0.0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns the run directory, the first and last logged losses and the time taken."""
    args = parse_args(argv)
    started = time.perf_counter()
    L.seed_everything(0, verbose=False)
    ids, vocab = python_reference_words(args.vocab)
    dataset = Blocks(ids, limit=args.steps * args.batch_size if args.small else None)
    model = OfflineLightningTransformer(dataset, vocab_size=len(vocab), batch_size=args.batch_size)
    watch = GradWatch(spectra=gradwatch.SpectraConfig(every=args.every, heatmap_every=args.heatmap_every),
                      max_overhead=args.max_overhead)
    logger = TensorBoardLogger(args.log_dir, name="lightning_transformer")
    trainer = L.Trainer(max_steps=args.steps, max_epochs=-1, logger=logger, callbacks=[watch],
                        log_every_n_steps=5 if not args.small else 1, accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.small)
    print(f"data: {len(ids)} words of CPython's language reference (pydoc_data.topics), vocabulary {len(vocab)}, "
          f"{len(dataset)} blocks of {BLOCK}")
    trainer.fit(model)
    elapsed = time.perf_counter() - started
    print(f"\n{trainer.global_step} steps in {elapsed:.0f} s; gradient spectra are in {watch.log_dir}\n"
          f"  tensorboard --logdir {logger.root_dir}")
    return {"log_dir": watch.log_dir, "steps": trainer.global_step, "seconds": elapsed}


if __name__ == "__main__":
    main(sys.argv[1:])
