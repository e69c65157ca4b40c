"""Attention-logit growth seen coming, with gradwatch's stability diagnostics.

A tiny causal transformer language model (2 blocks, width 64, 4 heads, pre-LayerNorm, SDPA attention) is
trained with AdamW at a high learning rate (0.1) on sequences from a fixed random Markov chain over 32
tokens, as in Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities":

- ``no_qk_norm`` (lr 0.1): the max attention logit grows by orders of magnitude within tens of steps,
  attention entropy collapses, and gradwatch raises ``stability/attention_logit_level`` while the loss
  still tracks the stable run; only later does the loss stall above it;
- ``qk_norm`` (lr 0.1, LayerNorm on queries and keys): the logits stay bounded, no attention alert, the
  loss keeps falling;
- ``low_lr`` (lr 0.01, no qk-layernorm): stable too.

Each run is a Lightning ``Trainer`` with ``GradWatch(stability=StabilityConfig(...))`` writing TensorBoard
logs and ``alerts.jsonl`` under ``--log-dir/<run>`` (``tensorboard --logdir <log-dir>``), and one PNG of
max attention logit and loss against the step, alerts marked.

    python examples/instability.py --log-dir runs/instability
    python examples/instability.py --small      # the size the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.callbacks.lightning import GradWatch
from gradwatch.metrics.stability import StabilityConfig

RUNS = {"no_qk_norm": (0.1, False), "qk_norm": (0.1, True), "low_lr": (0.01, False)}
ATTENTION_RULES = ("stability/attention_logit_level", "stability/attention_logit_growth",
                   "stability/attention_entropy_collapse")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``, optionally with qk-layernorm."""

    def __init__(self, width: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.q_norm = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(L.LightningModule):
    def __init__(self, lr: float, qk_norm: bool, vocab: int = 32, width: int = 64, heads: int = 4, layers: int = 2,
                 seq_len: int = 32) -> None:
        super().__init__()
        self.lr = lr
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList([Block(width, heads, qk_norm) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln(x))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (seq,) = batch
        logits = self(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def markov_sequences(n: int, seq_len: int, vocab: int, seed: int = 0) -> TensorDataset:
    """``n`` sequences of ``seq_len + 1`` tokens from a fixed random Markov chain with peaked transitions."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=g), dim=-1)
    seq = torch.zeros(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(transitions[seq[:, t]], 1, generator=g).squeeze(1)
    return TensorDataset(seq)


def read_series(log_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def train(name: str, lr: float, qk_norm: bool, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed, workers=True)
    module = TinyLM(lr, qk_norm, width=args.width, seq_len=args.seq_len)
    data = markov_sequences(args.batch_size * 20, args.seq_len, 32, seed=args.seed)
    alerts: list[Any] = []
    cb = GradWatch(spectra=False, stability=StabilityConfig(every=args.every), max_overhead=None,
                   on_alert=alerts.append)
    root = os.path.join(args.log_dir, name)
    logger = L.pytorch.loggers.TensorBoardLogger(root, name="", version="")
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", callbacks=[cb], logger=logger, default_root_dir=root,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, deterministic=True)
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size, shuffle=True))
    seconds = time.perf_counter() - t0
    series = read_series(logger.log_dir)
    steps, max_logit = series["stability/attention/max_logit"]
    attention_alerts = [a for a in alerts if a.rule in ATTENTION_RULES]
    return {"lr": lr, "qk_norm": qk_norm, "seconds": seconds, "log_dir": logger.log_dir,
            "steps": steps, "max_logit": max_logit,
            "entropy_min": [min(per_module) for per_module in zip(
                *[series[t][1] for t in series if t.startswith("stability/attention/entropy_min/")])],
            "loss_steps": series["train_loss"][0], "loss": series["train_loss"][1],
            "alerts": [a.as_record() for a in alerts],
            "first_attention_alert": min((a.step for a in attention_alerts), default=None)}


def smoothed(values: Sequence[float], k: int = 10) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def loss_falls_behind(unstable: dict[str, Any], stable: dict[str, Any], margin: float = 0.1) -> int | None:
    """First step from which the unstable run's smoothed loss stays ``margin`` (10%) above the stable run's."""
    a, b = smoothed(unstable["loss"]), smoothed(stable["loss"])
    behind = [s for s, x, y in zip(unstable["loss_steps"], a, b) if x > (1 + margin) * y]
    steps = unstable["loss_steps"]
    for s in behind:  # stays behind: every later step is behind as well
        if set(steps[steps.index(s):]) <= set(behind):
            return s
    return None


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for name, r in results.items():
        line, = top.plot(r["steps"], r["max_logit"], label=f"{name} (lr {r['lr']:g})")
        bottom.plot(r["loss_steps"], smoothed(r["loss"]), color=line.get_color(), label=name)
        if r["first_attention_alert"] is not None:
            s = r["first_attention_alert"]
            top.axvline(s, color=line.get_color(), ls=":", lw=1)
            bottom.axvline(s, color=line.get_color(), ls=":", lw=1)
            top.annotate("alert", (s, r["max_logit"][r["steps"].index(s)]), color=line.get_color(), fontsize=8,
                         xytext=(4, 4), textcoords="offset points")
    top.axhline(100, color="k", ls="--", lw=0.8, label="alert level 100")
    top.set_yscale("log")
    top.set_ylabel("max attention logit")
    top.legend(fontsize=8)
    bottom.set_ylabel("train loss (10-step mean)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", default="runs/instability")
    p.add_argument("--png", default=None, help="figure path (default: <log-dir>/instability.png)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=5, help="stability cadence (steps)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="80 steps of no_qk_norm and qk_norm (for tests)")
    args = p.parse_args(argv)
    if args.small:
        args.steps, args.runs = 80, ["no_qk_norm", "qk_norm"]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the chosen runs; returns ``{run: series}`` (steps, max_logit, loss, alerts, ...) and, under
    ``"summary"``, when the first attention alert fired and when the unstable loss fell behind."""
    args = parse_args(argv)
    results = {name: train(name, *RUNS[name], args) for name in args.runs}
    png = args.png or os.path.join(args.log_dir, "instability.png")
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    plot(results, png)
    for name, r in results.items():
        rules = sorted({a["rule"] for a in r["alerts"]})
        print(f"{name}: lr {r['lr']:g}, qk-layernorm {r['qk_norm']}, {r['seconds']:.1f} s; max attention logit "
              f"{r['max_logit'][0]:.3g} -> {max(r['max_logit']):.3g} (x{max(r['max_logit']) / r['max_logit'][0]:.3g}); "
              f"loss {r['loss'][0]:.3g} -> {smoothed(r['loss'])[-1]:.3g}; first attention alert: "
              f"{r['first_attention_alert']}; alerts: {rules or 'none'}")
    summary: dict[str, Any] = {}
    if "no_qk_norm" in results and "qk_norm" in results:
        summary = {"first_attention_alert": results["no_qk_norm"]["first_attention_alert"],
                   "loss_falls_behind": loss_falls_behind(results["no_qk_norm"], results["qk_norm"])}
        print(f"no_qk_norm: attention alert at step {summary['first_attention_alert']}, loss falls behind the "
              f"qk_norm run (10-step mean > 1.1x) from step {summary['loss_falls_behind']}")
    print(f"figure: {png}\nTensorBoard: tensorboard --logdir {args.log_dir}")
    with open(os.path.join(args.log_dir, "summary.json"), "w") as f:
        runs = {n: {k: v for k, v in r.items() if k != "alerts"} for n, r in results.items()}
        json.dump({"summary": summary, **runs}, f, indent=1)
    return {**results, "summary": summary, "png": png}  # type: ignore[dict-item]


if __name__ == "__main__":
    main()
