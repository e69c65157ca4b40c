"""Null controls and planted cases for the opposing-signals detector (issue 14), shared by the tests and
``benchmarks/signals.py``.

Every case trains a model with plain SGD in a hand-written loop driven through gradwatch's real engine
(``Watcher``: bursts through ``continues``, the probe's real extra passes, the head-input hook) with
``SignalsConfig(every=10)`` (a burst of 5 one-step changes every 10 steps), and returns what
the detector said: the steps that alarmed, the strongest pair of the run, the outliers and what was planted.
The probe is the whole training set unless ``probe_size`` is given.

Nulls (nothing is an opposing signal; none may alarm): ``memorise`` (a binary MLP that memorises 600 noisy
points in 32-D, of which one feature carries the label), ``memorise_multi`` (5 classes), ``label_noise``
(10% of labels flipped), ``imbalance`` (1:9), ``minilm`` (the real pretrained MiniLM fine-tuned on real
ChatterBot lines, two topics) and ``gpt2`` (a GPT-2-shaped language model trained on those lines).

Planted (two groups of different labels share a strong feature the rest lacks): ``planted_tabular`` (the
memorise data with a feature x31 = 16 on 30 + 30 points), ``planted_tabular_memorise`` (the same trained at
lr 0.2 until it memorises), ``planted_digits`` (scikit-learn's digits, a bright 3 x 3 patch on 40 threes and
40 eights) and ``planted_minilm`` (a rare word repeated in front of 30 + 30 lines of opposite topics).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

import gradwatch
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import Watcher

NULLS = ("memorise", "memorise_multi", "label_noise", "imbalance", "minilm", "gpt2")
PLANTED = ("planted_tabular", "planted_tabular_memorise", "planted_digits", "planted_minilm")


@dataclass
class Outcome:
    """What the detector said over one run."""

    case: str
    seed: int
    steps: int
    alarms: list[int]  # steps at which signals/alarm was 1
    best: dict[str, Any] | None  # the strongest pair of the run (its signals.jsonl entry, with "step")
    outliers: set[int]  # dataset indices that were outliers in at least half the alarmed rows
    named: set[int]  # dataset indices on a side of an alarming pair (any alarmed row)
    planted: tuple[set[int], set[int]] | None
    seconds: dict[str, float] = field(default_factory=dict)  # "train" (without the probe), "probe"
    probe_steps: int = 0  # steps at which the probe was evaluated

    def purity(self) -> float:
        """Of the strongest pair: the smaller share of a side that is its planted group (best matching)."""
        if self.best is None or self.planted is None:
            return math.nan
        a, b = set(self.best["a"]), set(self.best["b"])
        pa, pb = self.planted
        return max(min(len(a & pa) / len(a), len(b & pb) / len(b)), min(len(a & pb) / len(a), len(b & pa) / len(b)))

    def precision_recall(self, of: str = "named") -> tuple[float, float]:
        """Precision and recall against the planted examples of the examples the alarm names (``named``: the
        sides of the alarming pairs) or of the movement ``outliers`` (which include the followers)."""
        if self.planted is None:
            return math.nan, math.nan
        found = self.named if of == "named" else self.outliers
        planted = self.planted[0] | self.planted[1]
        hit = len(found & planted)
        return hit / max(1, len(found)), hit / len(planted)


class Recorder:
    """A sink that keeps what the engine writes."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.rows: list[dict[str, Any]] = []

    def open(self, charts: Any) -> None: ...

    def write(self, step: int, emission: Any) -> None:
        for tag, value in emission.scalars.items():
            self.scalars.setdefault(tag, {})[step] = value
        self.rows += list(emission.records.get("signals", ()))

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None: ...


# ---- data and models ----------------------------------------------------------------------------------


def tabular(seed: int, *, n: int = 600, dim: int = 32, classes: int = 2, sep: float = 1.8, noise: float = 0.0,
            minority: float | None = None, plant: tuple[float, int] | None = None) -> tuple[TensorDataset, Any]:
    """x ~ N(0, I) in ``dim`` dimensions, x0 shifted by (y - (C-1)/2) * sep (the one feature that carries the
    label); ``minority``: the share of label 1 (imbalance); ``noise``: share of labels flipped; ``plant``:
    (strength, k) gives k points of label 1 and k of label 0 the feature x_{dim-1} = strength and no label
    feature."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < minority).long() if minority else torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += (y.float() - (classes - 1) / 2) * sep
    planted = None
    if plant is not None:
        strength, k = plant
        a, b = torch.nonzero(y == 1).reshape(-1)[:k], torch.nonzero(y == 0).reshape(-1)[:k]
        x[a, -1] = x[b, -1] = strength
        x[a, 0], x[b, 0] = 0.5 * torch.randn(k, generator=g), 0.5 * torch.randn(k, generator=g)
        planted = (set(a.tolist()), set(b.tolist()))
    if noise:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
    return TensorDataset(x, y), planted


def digits(seed: int, *, plant: bool) -> tuple[TensorDataset, Any]:
    """scikit-learn's digits (1,797 real 8 x 8 images, pixels in [0, 1]); with ``plant``, a bright 3 x 3 patch
    (value 12: a large-magnitude feature, as the paper's sky) in the top-left corner of 40 threes and 40
    eights (drawn by ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    planted = None
    if plant:
        g = torch.Generator().manual_seed(seed)
        threes, eights = torch.nonzero(y == 3).reshape(-1), torch.nonzero(y == 8).reshape(-1)
        a = threes[torch.randperm(len(threes), generator=g)[:40]]
        b = eights[torch.randperm(len(eights), generator=g)[:40]]
        x[a, :, :3, :3] = x[b, :, :3, :3] = 12.0
        planted = (set(a.tolist()), set(b.tolist()))
    return TensorDataset(x, y), planted


def mlp(inputs: int, width: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


class Lines(Dataset):
    """Tokenized lines as HF examples (``input_ids``, ``attention_mask``, ``labels``), padded to ``length``."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[Any], length: int) -> None:
        enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        self.ids, self.mask, self.labels = enc["input_ids"], enc["attention_mask"], labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        y = self.labels[i]
        if y is None:  # a language model: the labels are the tokens, padding ignored
            y = torch.where(self.mask[i] > 0, self.ids[i], torch.full_like(self.ids[i], -100))
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": torch.as_tensor(y)}


def minilm_lines(seed: int, plant: bool, per_topic: int = 120) -> tuple[Any, list[str], list[int], Any]:
    """Real ChatterBot lines of two topics (ai: 0, emotion: 1); with ``plant``, a rare word ("zeugma", several
    word pieces) repeated 12 times in front of 30 lines of each topic: a large feature the two groups share."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import random
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    from minilm_finetune import load_topics, model_dir
    from transformers import AutoTokenizer

    texts, labels = load_topics(("ai", "emotion"), per_topic=per_topic, seed=seed)
    planted = None
    if plant:
        rng = random.Random(seed)
        a = rng.sample([i for i, y in enumerate(labels) if y == 0], 30)
        b = rng.sample([i for i, y in enumerate(labels) if y == 1], 30)
        for i in a + b:
            texts[i] = " ".join(["zeugma"] * 12) + " " + texts[i]
        planted = (set(a), set(b))
    return AutoTokenizer.from_pretrained(model_dir()), texts, labels, planted


# ---- the cases ---------------------------------------------------------------------------------------------


def case(name: str, seed: int) -> tuple[Dataset, Callable[[], nn.Module], dict[str, Any], Any]:
    """(dataset, model factory, training options, planted groups or None) of a case."""
    if name in ("memorise", "memorise_multi", "label_noise", "imbalance", "planted_tabular",
                "planted_tabular_memorise"):
        options = {"memorise": {}, "memorise_multi": {"classes": 5}, "label_noise": {"noise": 0.1},
                   "imbalance": {"minority": 0.1}, "planted_tabular": {"plant": (16.0, 30)},
                   "planted_tabular_memorise": {"plant": (16.0, 30)}}[name]
        data, planted = tabular(seed, **options)
        classes = int(data.tensors[1].max()) + 1
        lr, batch = (0.05, 16) if name == "planted_tabular" else (0.2, 32)
        return data, lambda: mlp(32, 256, classes, seed), {"lr": lr, "batch": batch}, planted
    if name in ("planted_digits",):
        data, planted = digits(seed, plant=True)
        return data, lambda: mlp(64, 64, 10, seed), {"lr": 0.05, "batch": 64}, planted
    if name in ("minilm", "planted_minilm"):
        from transformers import BertForSequenceClassification

        tokenizer, texts, labels, planted = minilm_lines(seed, plant=name == "planted_minilm")
        data = Lines(tokenizer, texts, labels, 24)
        path = tokenizer.name_or_path

        def model() -> nn.Module:
            torch.manual_seed(seed)
            return BertForSequenceClassification.from_pretrained(path, num_labels=2)

        return data, model, {"lr": 0.05, "batch": 16}, planted
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer, texts, _, _ = minilm_lines(seed, plant=False, per_topic=100)
        data = Lines(tokenizer, texts, [None] * len(texts), 16)
        used = torch.unique(data.ids)  # a small vocabulary: the word pieces these lines use
        data.ids = torch.searchsorted(used, data.ids)
        config = GPT2Config(vocab_size=len(used), n_positions=16, n_embd=32, n_layer=2, n_head=2)

        def model() -> nn.Module:
            torch.manual_seed(seed)
            return GPT2LMHeadModel(config)

        return data, model, {"lr": 0.1, "batch": 16}, None
    raise ValueError(f"unknown case {name!r}; expected one of {NULLS + PLANTED}")


def _loss(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(name: str, seed: int, steps: int = 300, *, probe_size: int | None = None, lr: float | None = None,
        batch: int | None = None, **signals: Any) -> Outcome:
    """Train case ``name`` for ``steps`` SGD steps (its learning rate and batch size unless ``lr``, ``batch``
    are given) with the signals family on (every 10 steps, a burst of 5 one-step changes, unless ``signals``
    says otherwise) and return what it found."""
    import time

    from torch.utils.data import default_collate

    data, make_model, train, planted = case(name, seed)
    train = {**train, **({"lr": lr} if lr else {}), **({"batch": batch} if batch else {})}
    model = make_model()
    options = {"every": 10, "probe_size": probe_size or len(data), **signals}  # default: the whole set
    watcher = Watcher(gradwatch.WatchConfig(spectra=False, signals=gradwatch.SignalsConfig(**options),
                                            max_overhead=None))
    recorder = Recorder()
    watcher.attach(model, sinks=[recorder], probe_source=lambda size: ProbeSet.from_dataset(
        data, size, seed=seed, device=torch.device("cpu"), batch_size=256))
    opt = torch.optim.SGD(model.parameters(), lr=train["lr"])
    g = torch.Generator().manual_seed(seed)
    order, at = torch.randperm(len(data), generator=g), 0
    spent, probed = {"train": 0.0, "probe": 0.0}, 0
    model.train()
    for step in range(1, steps + 1):
        if at + train["batch"] > len(data):
            order, at = torch.randperm(len(data), generator=g), 0
        batch = default_collate([data[int(i)] for i in order[at:at + train["batch"]]])
        at += train["batch"]
        t0 = time.perf_counter()
        watcher.on_step_start(step)
        probed += bool(watcher._running)
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        watcher.on_gradients_ready(step, optimizer=opt)
        opt.step()
        t1 = time.perf_counter()
        watcher.on_step_end(step, loss=loss.detach())
        t2 = time.perf_counter()
        spent["train"] += t1 - t0
        spent["probe"] += t2 - t1
    watcher.close()
    alarm = recorder.scalars.get("signals/alarm", {})
    best = None
    for row in recorder.rows:
        for p in row["pairs"]:
            if best is None or p["score"] > best["score"]:
                best = {**p, "step": row["step"]}
    # what the detector says when it speaks: the outliers of at least half the alarmed rows (no alarm: of the
    # rows with pairs), and every example it names on a side of an alarming pair
    chosen = [r for r in recorder.rows if any(p["alarm"] for p in r["pairs"])] or [r for r in recorder.rows if r["pairs"]]
    counts: dict[int, int] = {}
    named: dict[int, int] = {}
    for row in chosen:
        for i in row["outliers"]:
            counts[i] = counts.get(i, 0) + 1
        for i in {i for p in row["pairs"] if p["alarm"] for i in (*p["a"], *p["b"])}:
            named[i] = named.get(i, 0) + 1
    outliers = {i for i, c in counts.items() if c >= len(chosen) / 2}
    named_often = set(named)
    return Outcome(name, seed, steps, sorted(s for s, v in alarm.items() if v == 1.0), best, outliers, named_often,
                   planted, spent, probed)
