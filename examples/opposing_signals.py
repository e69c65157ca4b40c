"""Opposing signals (Rosenfeld and Risteski 2023), found live by gradwatch's ``signals`` family.

1. **Planted.** 4,096 points in 8-D, two classes told apart by a weak core feature (x1 = +-1 plus noise).
   Two groups of 4% each, A (label 1) and B (label 0), carry a strong shared "shortcut" feature
   (x0 = 16) and no core feature: the shortcut pulls A toward label 1 and B toward label 0 at once. For an
   8-32-2 MLP trained with SGD (lr 0.5, batch 1,024) the step is too long for the steep curvature along
   that feature: A's and B's losses swing in anti-phase while the rest of the data trains quietly. gradwatch should report
   A and B as the two sides of one opposing pair and raise the alarm. The same data without the shortcut
   (x0 = 0 everywhere) is the control: no alarm.
2. **Real data.** The same detector on scikit-learn's digits (1,797 8x8 images, a 64-64-10 MLP, SGD),
   reporting honestly what it finds, also when that is nothing.

Each run is a Lightning ``Trainer`` with ``GradWatch(signals=SignalsConfig(every=1), spectra=False)``;
TensorBoard logs and ``signals.jsonl`` go under ``--log-dir`` (``tensorboard --logdir <log-dir>``), and a
PNG of the paired losses is written there.

    python examples/opposing_signals.py --log-dir runs/signals          # ~30 s on 2 CPU cores
    python examples/opposing_signals.py --small                         # the test suite's size
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.callbacks.lightning import GradWatch

# ---- data ------------------------------------------------------------------------------------------


def planted_data(n: int = 4096, dim: int = 8, strength: float = 16.0, group: float = 0.04,
                 seed: int = 0) -> tuple[TensorDataset, list[int], list[int]]:
    """``n`` points, label y in {0, 1}; core feature x1 = (2y - 1) + N(0, 1), noise elsewhere. Groups A
    (label 1) and B (label 0) of ``group * n`` points each have x0 = ``strength`` (the shared shortcut) and an
    uninformative x1 ~ N(0, 0.5^2); everyone else has x0 = 0. ``strength=0`` is the control: the same points
    without the shortcut. Returns the dataset and the dataset indices of A and B."""
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] = 0.0
    x[:, 1] += 2.0 * y.float() - 1.0
    k = int(group * n)
    a = torch.nonzero(y == 1).reshape(-1)[:k]
    b = torch.nonzero(y == 0).reshape(-1)[:k]
    x[a, 0] = strength
    x[b, 0] = strength
    x[a, 1] = 0.5 * torch.randn(k, generator=g)
    x[b, 1] = 0.5 * torch.randn(k, generator=g)
    return TensorDataset(x, y), a.tolist(), b.tolist()


def digits() -> TensorDataset:
    """scikit-learn's digits: 1,797 8x8 images (1 x 8 x 8, so the pairs table's examples are drawn as
    thumbnails in ``signals/pair_examples``), pixels scaled to [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return TensorDataset(pixels, torch.tensor(d.target))


class Classifier(L.LightningModule):
    """An MLP classifier (inputs flattened first), cross-entropy, plain SGD."""

    def __init__(self, sizes: Sequence[int], lr: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(m, k)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(nn.Flatten(), *layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ---- one run -------------------------------------------------------------------------------------------


def train(dataset: TensorDataset, sizes: Sequence[int], lr: float, batch_size: int, steps: int, log_dir: str,
          seed: int, signals: Any | None) -> dict[str, Any]:
    """Train with (``signals`` a SignalsConfig) or without (None) gradwatch; the final weights, the run
    directory, the signals records and alerts read back from disk, and the wall time."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = Classifier(sizes, lr)
    callbacks = [] if signals is None else [GradWatch(signals=signals, spectra=False, max_overhead=None)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", deterministic=True, callbacks=callbacks,
                        default_root_dir=log_dir, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=50,
                        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="", version=""))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    run_dir = callbacks[0].log_dir if callbacks else log_dir
    probe = list(callbacks[0].watcher.probe().indices) if callbacks else []  # the probe's dataset indices
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "run_dir": run_dir,
            "probe": probe,
            "records": read_jsonl(os.path.join(run_dir, "signals.jsonl")) if callbacks else [],
            "alerts": read_jsonl(os.path.join(run_dir, "alerts.jsonl")) if callbacks else [], "seconds": seconds}


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def settled(records: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """The records whose window is full (the first ``window`` probe steps are still filling it)."""
    return [r for r in records if r["changes"] >= window]


def planted_figures(records: list[dict[str, Any]], a: Sequence[int], b: Sequence[int], probe: Sequence[int],
                    window: int) -> dict[str, float]:
    """How well the alarm points at the planted groups, over the settled probe steps (full window) at which
    the alarm was raised:

    - recall and precision of the planted examples (those in the probe set) among the most often reported
      outliers, the examples reported in at least half of those steps;
    - purity of the strongest pair: at each such step, the smaller of its two sides' shares of one planted
      group (the two sides on different groups; 0 when they are on the same), then the median;
    - the share of settled probe steps at which the alarm was raised, and the largest score.
    """
    rows = settled(records, window)
    alarmed = [r for r in rows if any(p["alarm"] for p in r["pairs"])]
    planted = (set(a) | set(b)) & set(probe)
    counts = Counter(i for r in alarmed for i in r["outliers"])
    often = {i for i, c in counts.items() if c >= 0.5 * len(alarmed)}
    hit = len(often & planted)
    purities = []
    for r in alarmed:
        top = next(p for p in r["pairs"] if p["alarm"])
        sa, sb = set(top["a"]), set(top["b"])
        ab = min(len(sa & set(a)) / len(sa), len(sb & set(b)) / len(sb))
        ba = min(len(sa & set(b)) / len(sa), len(sb & set(a)) / len(sb))
        purities.append(max(ab, ba))
    purities.sort()
    return {"recall": hit / max(1, len(planted)), "precision": hit / max(1, len(often)),
            "purity": purities[len(purities) // 2] if purities else 0.0,
            "alarm_share": len(alarmed) / max(1, len(rows)), "planted_in_probe": float(len(planted)),
            "reported": float(len(often)),
            "max_score": max((p["score"] for r in rows for p in r["pairs"]), default=0.0)}


def pair_losses(run_dir: str) -> dict[str, dict[int, float]]:
    """``signals/*`` scalars read back from the run's TensorBoard files: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith("signals/")}


def draw(path: str, panels: list[tuple[str, dict[str, dict[int, float]], float]], zoom: int = 60) -> str | None:
    """A PNG, one column per run: the mean loss of the two sides of the strongest pair over the ``zoom`` steps
    with the highest mean opposing score (top), and the opposing score against the alarm line over the whole
    run, the zoomed steps shaded (bottom). None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(4.2 * len(panels), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False)
    for k, (title, scalars, alarm) in enumerate(panels):
        top, bottom = axes[0][k], axes[1][k]
        score = scalars.get("signals/opposing_score", {})
        steps = sorted(score)
        values = [score[t] if score[t] == score[t] else 0.0 for t in steps]  # NaN (undefined) as 0
        best = max(range(max(1, len(steps) - zoom + 1)), key=lambda i: sum(values[i:i + zoom]), default=0)
        lo, hi = (steps[best], steps[min(len(steps), best + zoom) - 1]) if steps else (0, 1)
        for tag, color in (("signals/pair_loss/a", "tab:blue"), ("signals/pair_loss/b", "tab:orange")):
            series = {t: v for t, v in scalars.get(tag, {}).items() if lo <= t <= hi}
            if series:
                xs = sorted(series)
                top.plot(xs, [series[t] for t in xs], color=color, lw=1.0, marker=".", ms=3,
                         label=tag.rsplit("/", 1)[1])
        top.set_title(f"{title}\nsteps {lo}-{hi}", fontsize=9)
        top.set_ylabel("mean loss of each side")
        if top.lines:
            top.legend(fontsize=8, title="side", title_fontsize=8)
        else:
            top.text(0.5, 0.5, "no pair", ha="center", va="center", transform=top.transAxes)
        bottom.plot(steps, values, color="tab:red", lw=0.9, label="opposing score")
        bottom.axhline(alarm, color="k", ls="--", lw=0.8, label=f"alarm {alarm:g}")
        bottom.axvspan(lo, hi, color="0.9", zorder=0)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("step")
        bottom.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


# ---- the three runs ------------------------------------------------------------------------------------


def describe_digits(records: list[dict[str, Any]], labels: Tensor, window: int) -> list[str]:
    rows = settled(records, window)
    lines = []
    counts = Counter(i for r in rows for i in r["outliers"])
    if counts:
        top = counts.most_common(10)
        lines.append("most often reported outliers (dataset index: label, share of probe steps): " +
                     ", ".join(f"{i}: {int(labels[i])} ({c / len(rows):.0%})" for i, c in top))
    scores = [(r["pairs"][0]["score"], r) for r in rows if r["pairs"]]
    if not scores:
        lines.append("no opposing pair at any probe step")
        return lines
    best, row = max(scores, key=lambda t: t[0])
    p = row["pairs"][0]
    side = {k: Counter(int(labels[i]) for i in p[k]) for k in ("a", "b")}
    lines.append(f"strongest pair at step {row['step']}: score {best:.2f} (correlation {p['correlation']:.2f}, "
                 f"consistency {p['consistency']:.0%}, share of loss movement {p['share']:.0%}); side a: "
                 f"{len(p['a'])} examples, labels {dict(side['a'].most_common(3))}; side b: {len(p['b'])} examples, "
                 f"labels {dict(side['b'].most_common(3))}")
    alarmed = sum(any(q["alarm"] for q in r["pairs"]) for r in rows)
    lines.append(f"probe steps with a pair at or above the alarm: {alarmed} of {len(rows)}")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", default=None, help="where runs go (default: a new temporary directory)")
    ap.add_argument("--small", action="store_true", default=os.environ.get("GRADWATCH_EXAMPLE_SMALL") == "1",
                    help="fewer steps (the test suite's size; also GRADWATCH_EXAMPLE_SMALL=1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the planted and control runs")
    ap.add_argument("--steps", type=int, default=None, help="steps of the planted runs (default 300, small 80)")
    ap.add_argument("--digits-steps", type=int, default=None, help="steps of the digits run (default 400, small 150)")
    ap.add_argument("--no-digits", action="store_true", help="skip the digits run")
    ap.add_argument("--probe-size", type=int, default=512)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: one thread is faster than two contending ones
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    root = args.log_dir or tempfile.mkdtemp(prefix="gradwatch-signals-")
    steps = args.steps or (80 if args.small else 300)
    digit_steps = args.digits_steps or (150 if args.small else 400)
    config = gradwatch.SignalsConfig(every=1, probe_size=args.probe_size)
    window = config.window
    out: dict[str, Any] = {"root": root, "planted": {}, "control": {}}

    for seed in args.seeds:
        for kind, strength in (("planted", 16.0), ("control", 0.0)):
            data, a, b = planted_data(strength=strength, seed=seed)
            run = train(data, (data.tensors[0].shape[1], 32, 2), 0.5, 1024, steps, os.path.join(root, f"{kind}_seed{seed}"), seed, config)
            run["figures"] = planted_figures(run["records"], a, b, run["probe"], window)
            run["groups"] = (a, b)
            out[kind][seed] = run
            f = run["figures"]
            print(f"[{kind} seed {seed}] {steps} steps in {run['seconds']:.1f} s; planted examples in the probe: "
                  f"{int(f['planted_in_probe'])}; alarm at {f['alarm_share']:.0%} of probe steps (max score "
                  f"{f['max_score']:.2f}); there, the most often reported outliers: {int(f['reported'])} (recall "
                  f"{f['recall']:.2f}, precision {f['precision']:.2f}), the alarming pair's median purity "
                  f"{f['purity']:.2f}; alerts: {len(run['alerts'])}")

    panels = [(f"planted shortcut (seed {args.seeds[0]})", pair_losses(out["planted"][args.seeds[0]]["run_dir"]),
               config.alarm),
              ("control: no shortcut", pair_losses(out["control"][args.seeds[0]]["run_dir"]), config.alarm)]
    if not args.no_digits:
        data = digits()
        run = train(data, (64, 64, 10), 0.5, 64, digit_steps, os.path.join(root, "digits"), 0, config)
        out["digits"] = run
        print(f"[digits] {digit_steps} steps in {run['seconds']:.1f} s; probe of {config.probe_size} of "
              f"{len(data)} images; alerts: {len(run['alerts'])}")
        for line in describe_digits(run["records"], data.tensors[1], window):
            print("  " + line)
        panels.append(("digits (scikit-learn)", pair_losses(run["run_dir"]), config.alarm))
    out["png"] = draw(os.path.join(root, "opposing_signals.png"), panels)
    print(f"logs: tensorboard --logdir {root}" + (f"; figure: {out['png']}" if out["png"] else ""))
    return out


if __name__ == "__main__":
    main()
