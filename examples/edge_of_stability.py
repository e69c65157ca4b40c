"""Edge of stability on real data in seconds, with gradwatch's sharpness diagnostic.

Full-batch gradient descent on scikit-learn's digits (1,000 examples, 64-128-128-10 tanh MLP, MSE loss
0.5 * sum of squares per example, averaged over the batch), as in Cohen et al. 2021, "Gradient descent on
neural networks typically occurs at the edge of stability":

- lr 0.05: progressive sharpening, the sharpness rises steadily toward 2/lr = 40;
- lr 0.2: the sharpness reaches 2/lr = 10 and hovers there while the loss keeps falling;
- Adam (lr 1e-3): the preconditioned sharpness lambda_1(P^-1 H) hovers at 38/lr (Cohen et al. 2022).

Each run is a Lightning ``Trainer`` with ``GradWatch(sharpness=SharpnessConfig(...))``, writing TensorBoard
logs under ``--log-dir`` (open them with ``tensorboard --logdir <log-dir>``), and a PNG of sharpness
against the threshold.

    python examples/edge_of_stability.py --log-dir runs/eos
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.callbacks.lightning import GradWatch

RUNS = ("gd_0.05", "gd_0.2", "adam_1e-3")


def digits(n: int) -> TensorDataset:
    """The first ``n`` digits, pixels scaled to [0, 1], one-hot targets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    if not 1 <= n <= len(d.target):
        raise ValueError(f"--examples expected 1..{len(d.target)}, got {n}")
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = nn.functional.one_hot(torch.tensor(d.target[:n]), 10).float()
    return TensorDataset(x, y)


class DigitsMLP(L.LightningModule):
    """64-128-128-10 tanh MLP, loss 0.5 * ||f(x) - y||^2 averaged over the batch."""

    def __init__(self, optimizer: str, lr: float, width: int = 128) -> None:
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 10))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = 0.5 * (self.net(x) - y).square().sum(1).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999))
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def read_series(log_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag under ``log_dir`` as (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def train(name: str, optimizer: str, lr: float, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    data = digits(args.examples)
    module = DigitsMLP(optimizer, lr, args.width)
    config = gradwatch.SharpnessConfig(every=args.every, probe_size=min(args.probe_size, args.examples),
                                       tol=args.tol, max_iter=args.max_iter)
    cb = GradWatch(spectra=False, sharpness=config, max_overhead=None, on_error="raise")
    root = os.path.join(args.log_dir, name)
    logger = L.pytorch.loggers.TensorBoardLogger(root, name="", version="")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", callbacks=[cb], logger=logger, default_root_dir=root,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=len(data)))  # full batch: gradient descent
    seconds = time.perf_counter() - t0
    series = read_series(logger.log_dir)
    steps_s, lam = series["sharpness/lambda_max"]
    out: dict[str, Any] = {
        "optimizer": optimizer, "lr": lr, "seconds": seconds, "log_dir": logger.log_dir,
        "steps": steps_s, "lambda_max": lam, "threshold": series["sharpness/threshold"][1][-1],
        "ratio": series["sharpness/ratio"][1], "converged": series["sharpness/converged"][1],
        "hvps": series["sharpness/hvps"][1],
        "loss_steps": series["train_loss"][0], "loss": series["train_loss"][1],
    }
    if "sharpness/lambda_max_precond" in series:
        out["precond_steps"], out["lambda_max_precond"] = series["sharpness/lambda_max_precond"]
    return out


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.5 * len(results), 6), squeeze=False)
    for col, (name, r) in enumerate(results.items()):
        ax = axes[0, col]
        if "lambda_max_precond" in r:
            ax.plot(r["precond_steps"], r["lambda_max_precond"], label="lambda_1(P^-1 H)")
            ax.axhline(r["threshold"], color="k", ls="--", label=f"38/lr = {r['threshold']:.4g}")
            ax2 = ax.twinx()
            ax2.plot(r["steps"], r["lambda_max"], color="tab:orange", alpha=0.6, label="lambda_1(H)")
            ax2.set_ylabel("lambda_1(H)")
        else:
            ax.plot(r["steps"], r["lambda_max"], label="sharpness lambda_1(H)")
            ax.axhline(r["threshold"], color="k", ls="--", label=f"2/lr = {r['threshold']:.4g}")
        ax.set_title(f"{r['optimizer']} lr={r['lr']:g}")
        ax.set_xlabel("step")
        ax.legend(loc="lower right", fontsize=8)
        axes[1, col].plot(r["loss_steps"], r["loss"])
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step")
        axes[1, col].set_ylabel("train loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", default="runs/edge_of_stability")
    p.add_argument("--png", default=None, help="figure path (default: <log-dir>/edge_of_stability.png)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--examples", type=int, default=1000, help="digits examples (full batch)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps-slow", type=int, default=1000, help="steps at lr 0.05")
    p.add_argument("--steps-fast", type=int, default=300, help="steps at lr 0.2")
    p.add_argument("--steps-adam", type=int, default=400, help="Adam steps")
    p.add_argument("--every", type=int, default=25, help="sharpness cadence (steps)")
    p.add_argument("--probe-size", type=int, default=1000, help="examples in the Hessian's probe batch")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the chosen runs; returns ``{run: series}`` (steps, lambda_max, threshold, ratio, loss, ...)."""
    args = parse_args(argv)
    spec = {"gd_0.05": ("sgd", 0.05, args.steps_slow), "gd_0.2": ("sgd", 0.2, args.steps_fast),
            "adam_1e-3": ("adam", 1e-3, args.steps_adam)}
    results = {name: train(name, *spec[name], args) for name in args.runs}
    png = args.png or os.path.join(args.log_dir, "edge_of_stability.png")
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    plot(results, png)
    for name, r in results.items():
        lam = r.get("lambda_max_precond", r["lambda_max"])
        k = max(1, len(lam) // 3)
        print(f"{name}: {r['seconds']:.1f} s, threshold {r['threshold']:.4g}; "
              f"{'preconditioned ' if 'lambda_max_precond' in r else ''}sharpness first {lam[0]:.4g}, "
              f"last third {min(lam[-k:]):.4g}..{max(lam[-k:]):.4g} "
              f"({min(lam[-k:]) / r['threshold']:.3f}..{max(lam[-k:]) / r['threshold']:.3f} x threshold), "
              f"all converged: {all(c == 1.0 for c in r['converged'])}")
    print(f"figure: {png}\nTensorBoard: tensorboard --logdir {args.log_dir}")
    for r in results.values():
        r["png"] = png
    return results


if __name__ == "__main__":
    main()
