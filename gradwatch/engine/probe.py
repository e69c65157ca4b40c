"""The fixed probe set shared by every diagnostic that needs data (per-example spectra, sharpness, ...).

Drawn once at train start, seeded by a private generator (the user's RNG stream is untouched), from the
training dataset, with its dataset indices kept. Iterable datasets give their first examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import IterableDataset, default_collate

from gradwatch.engine.rng import preserved_rng

LossFn = Callable[[nn.Module, Any], Tensor]

class ProbeUnusable(ValueError):
    """The probe data cannot be used (no examples, every label ignored, no per-example loss to infer). The
    engine says so once and switches off, for the run, every diagnostic that raises it; training goes on."""


def unusable_cause(exc: BaseException | None) -> ProbeUnusable | None:
    """The :class:`ProbeUnusable` behind ``exc`` (itself or a cause), if any."""
    for _ in range(8):
        if exc is None or isinstance(exc, ProbeUnusable):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def probe_unusable(watcher: Any, unusable: Sequence[tuple[int, Exception]]) -> None:
    """Probe data the diagnostics ``unusable`` (index, error) cannot use: they are off for the run (the
    watcher's ``_off``), and one warning for the whole run says why."""
    if not unusable:
        return
    watcher._off.update(i for i, _ in unusable)
    names = ", ".join(watcher._describe(i) for i, _ in unusable)
    watcher._warn_once("probe-unusable", f"{str(unusable[0][1]).rstrip('.')}. Off for the rest of this run: "
                                         f"{names} (and, silently, any other diagnostic that needs this probe "
                                         "data); training goes on")


NO_LOSS_MESSAGE = (
    "gradwatch: cannot infer a per-example loss for {what}. gradwatch knows Hugging Face models called "
    "with a `labels` key (token, sequence-classification and regression heads) and batches of "
    "(inputs, targets) whose model output is class logits or regression values. Otherwise pass "
    "`loss_fn=lambda model, batch: <Tensor of shape [batch_size]>` to GradWatch(...) or WatchConfig."
)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (mappings become plain dicts)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(getattr(model, "config", None), "is_decoder", False) and "Causal" in name)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ProbeUnusable(f"gradwatch: the model's output on a probe batch ({_kind(output)}) holds no logits; "
                        "gradwatch expects a Tensor, a `logits` field or a tuple whose first item is the logits "
                        "(or pass loss_fn=...)")


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(dict.fromkeys(type(v).__name__ for v in value))})"
    return f"a {type(value).__name__}"


def per_example_loss_from_outputs(logits: Tensor, targets: Tensor, *, causal: bool = False,
                                  problem_type: str | None = None) -> Tensor:
    """Per-example loss, shape [B], of logits against targets.

    - token logits (B, T, V) with labels (B, T): mean cross-entropy over positions whose label is not
      -100 (shifted by one for causal LMs, as their own loss is);
    - class logits (B, C) with integer labels (B,): cross-entropy;
    - float targets: squared error, or binary cross-entropy for ``problem_type="multi_label_classification"``,
      averaged over the non-batch dimensions.
    """
    if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8) and problem_type != "regression":
        if logits.ndim == 3:
            if causal:
                logits, targets = logits[:, :-1], targets[:, 1:]
            tok = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
            valid = (targets != -100).to(tok.dtype)
            return (tok * valid).sum(1) / valid.sum(1).clamp_min(1)
        if logits.ndim == 2:
            return F.cross_entropy(logits.float(), targets.view(-1), reduction="none")
        raise ProbeUnusable(f"gradwatch: cannot score logits of shape {tuple(logits.shape)} against integer "
                            f"labels of shape {tuple(targets.shape)}; gradwatch expects (B, C) or (B, T, V) "
                            "logits (or pass loss_fn=...)")
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").flatten(1).mean(1)
    pred = logits.float().reshape(targets.shape) if logits.numel() == targets.numel() else logits.float()
    return (pred - targets.float()).square().reshape(pred.shape[0], -1).mean(1)


def infer_per_example_loss(model: nn.Module, batch: Any) -> Tensor:
    """The zero-config per-example loss for Hugging Face batches and (inputs, targets) batches."""
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        try:
            output = model(**inputs)
        except TypeError as exc:  # keys the forward does not take (strings, None, ...)
            raise ProbeUnusable(f"gradwatch: the model cannot be called with the probe batch's keys "
                                f"({', '.join(f'{k}: {_kind(v)}' for k, v in inputs.items())}): {exc}; gradwatch "
                                "expects a batch of the forward's keyword arguments plus `labels` (or pass "
                                "loss_fn=...)") from exc
        logits = _logits(output)
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        labels = batch["labels"]
        if problem is None and labels.is_floating_point() and getattr(getattr(model, "config", None), "num_labels", 0) == 1:
            problem = "regression"
        return per_example_loss_from_outputs(logits, labels, causal=_is_causal_lm(model), problem_type=problem)
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        x, y = batch
        return per_example_loss_from_outputs(_logits(model(x)), y)
    raise ProbeUnusable(NO_LOSS_MESSAGE.format(what=f"{type(model).__name__} with batches of type "
                                                 f"{type(batch).__name__}"))


EMPTY_MESSAGE = "gradwatch: the training dataset is empty; probe diagnostics need examples"
ONE_SHOT_MESSAGE = ("gradwatch: the training dataset is a one-shot stream (iter(dataset) returns the dataset "
                    "itself), so drawing probe examples from it would take them from training; probe diagnostics "
                    "need a dataset that can be iterated again (an IterableDataset whose __iter__ starts anew)")
IGNORE_INDEX = -100


def _targets(batch: Any) -> Tensor | None:
    """The integer labels of a batch whose loss gradwatch infers (``batch["labels"]`` or ``batch[1]``)."""
    target = batch.get("labels") if isinstance(batch, Mapping) else (
        batch[1] if isinstance(batch, (list, tuple)) and len(batch) == 2 else None)
    if isinstance(target, Tensor) and not target.is_floating_point() and target.dtype != torch.bool:
        return target
    return None


def _say_smaller(size: int, n: int) -> None:
    warnings.warn(f"gradwatch: the probe set asks for {size} examples but the training dataset has {n}; "
                  f"using all {n}", RuntimeWarning, stacklevel=3)


class ProbeSet:
    """A fixed set of training examples, with the losses diagnostics evaluate on it.

    Args:
        examples: the raw examples (as the dataset returns them).
        indices: their dataset indices.
        collate_fn: how the training loader builds a batch from examples.
        device: where batches go.
        loss_fn: user per-example loss ``loss_fn(model, batch) -> Tensor[B]`` (None: inferred).
        training_loss_fn: the loss the optimizer minimizes on a batch, as the host computes it
            (Lightning's ``training_step``, HF's ``compute_loss``); None: mean of the per-example loss.
        batch_size: largest probe batch.
        decode: ``decode(example) -> str``, how a person reads one example (a tokenizer's decode of its
            ``input_ids``), for tables of examples; None where the host has none.
        drawn: each example's place in the draw (0 first; default: the order given), so that
            :meth:`first` can hand a diagnostic that asks for fewer examples a seeded sample of its own size.
    """

    def __init__(self, examples: Sequence[Any], indices: Sequence[int], collate_fn: Callable[[list], Any] | None,
                 device: torch.device, loss_fn: LossFn | None = None, training_loss_fn: LossFn | None = None,
                 batch_size: int = 64, decode: Callable[[Any], str] | None = None,
                 drawn: Sequence[int] | None = None) -> None:
        self.decode = decode
        self.examples = list(examples)
        self.indices = list(indices)
        self.collate_fn = collate_fn or default_collate
        self.device = device
        self.loss_fn = loss_fn
        self.training_loss_fn = training_loss_fn
        self.batch_size = batch_size
        self.drawn = list(range(len(self.examples))) if drawn is None else list(drawn)
        self._cache: dict[tuple, list[Any]] = {}
        self._all_ignored: bool | None = None
        self._first: dict[int, ProbeSet] = {}

    @classmethod
    def from_dataset(cls, dataset: Any, size: int, *, seed: int = 0, collate_fn: Callable | None = None,
                     **kwargs: Any) -> ProbeSet:
        """Draw ``size`` examples without replacement, seeded; the first ``size`` of an iterable dataset. A
        dataset smaller than ``size`` is used whole, and a RuntimeWarning says so."""
        if size < 1:
            raise ValueError(f"gradwatch: probe size expected an int >= 1, got {size!r}")
        with preserved_rng():  # a dataset that augments draws from the user's generators
            return cls._draw(dataset, size, seed, collate_fn, **kwargs)

    @classmethod
    def _draw(cls, dataset: Any, size: int, seed: int, collate_fn: Callable | None, **kwargs: Any) -> ProbeSet:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            stream = iter(dataset)  # type: ignore[call-overload]
            if stream is dataset:  # an iterator: what the probe takes, training would never see
                raise ProbeUnusable(ONE_SHOT_MESSAGE)
            examples = []
            for ex in stream:
                examples.append(ex)
                if len(examples) == size:
                    break
            if not examples:
                raise ProbeUnusable(EMPTY_MESSAGE)
            if len(examples) < size:
                _say_smaller(size, len(examples))
            return cls(examples, list(range(len(examples))), collate_fn, **kwargs)
        n = len(dataset)
        if n == 0:
            raise ProbeUnusable(EMPTY_MESSAGE)
        if size > n:
            _say_smaller(size, n)
            size = n
        gen = torch.Generator().manual_seed(seed)
        draw = torch.randperm(n, generator=gen)[:size].tolist()
        place = {i: k for k, i in enumerate(draw)}
        indices = sorted(draw)
        return cls([dataset[i] for i in indices], indices, collate_fn, drawn=[place[i] for i in indices], **kwargs)

    def __len__(self) -> int:
        return len(self.examples)

    def first(self, size: int) -> ProbeSet:
        """The ``size`` examples drawn first (in dataset order; cached): itself a seeded uniform sample, and the
        one probe of a diagnostic that asks for ``size`` when another family made the shared set larger (a
        sharpness estimate on 8 examples must not run on the 512 that signals asked for)."""
        if size >= len(self.examples):
            return self
        if size not in self._first:
            keep = [k for k, d in enumerate(self.drawn) if d < size]
            self._first[size] = ProbeSet([self.examples[k] for k in keep], [self.indices[k] for k in keep],
                                         self.collate_fn, self.device, self.loss_fn, self.training_loss_fn,
                                         self.batch_size, self.decode, [self.drawn[k] for k in keep])
        return self._first[size]

    def _collate(self, chunk: list[Any]) -> Any:
        with preserved_rng():  # a collator that masks or pads at random draws from the user's generators
            return move_to_device(self.collate_fn(chunk), self.device)

    def batches(self, limit: int | None = None, batch_size: int | None = None, drop_last: bool = False) -> list[Any]:
        """The probe set (or its first ``limit`` examples) as collated batches on the device (cached).

        With ``drop_last`` a smaller last batch is left out (unless it is the only one), so that every
        batch has the training batch size and a sum-reduced loss keeps its scale.
        """
        n = len(self.examples) if limit is None else min(limit, len(self.examples))
        bs = batch_size or self.batch_size
        if drop_last and n > bs:
            n -= n % bs
        key = (n, bs)
        if key not in self._cache:
            self._cache[key] = [self._collate(self.examples[i:i + bs]) for i in range(0, n, bs)]
        return self._cache[key]

    def example_batches(self, limit: int | None = None) -> list[Any]:
        """The first ``limit`` probe examples, each collated alone (batch size 1)."""
        return self.batches(limit, batch_size=1)

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Loss of each example of ``batch``, shape [B]."""
        if self.loss_fn is not None:
            out = self.loss_fn(model, batch)
            if not isinstance(out, Tensor) or out.ndim != 1:
                raise ValueError(f"gradwatch: loss_fn expected to return a 1-D Tensor[batch_size], got "
                                 f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
            return out
        if self._all_ignored is None:
            targets = [_targets(b) for b in self.batches()]
            self._all_ignored = bool(targets) and all(t is not None and bool((t == IGNORE_INDEX).all())
                                                      for t in targets)
        if self._all_ignored:
            raise ProbeUnusable(f"gradwatch: every label of the {len(self)} probe examples is {IGNORE_INDEX} "
                                "(ignored), so their loss is undefined; gradwatch expects labels it can score "
                                "(or pass loss_fn=...)")
        return infer_per_example_loss(model, batch)

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar loss the optimizer minimizes on ``batch``, as the trainer computes it."""
        if self.training_loss_fn is not None:
            return self.training_loss_fn(model, batch)
        return self.per_example_loss(model, batch).mean()


DEFAULT_PROBE_BATCH_SIZE = 64


@dataclass
class ProbeSource:
    """Where the probe set is drawn from, as a host adapter finds it; ``source(size)`` draws it.

    Attributes:
        dataset: the training dataset (map-style or iterable).
        collate_fn: the training loader's collate function.
        device: where probe batches go.
        batch_size: the training batch size (probe batches match it, so a summed loss keeps its scale).
        seed: the draw's seed.
        loss_fn: the user's per-example loss, if any.
        training_loss_fn: the host's training loss on a batch (Lightning's ``training_step``, HF's
            ``compute_loss``).
    """

    dataset: Any
    collate_fn: Callable | None
    device: torch.device
    batch_size: int | None
    seed: int = 0
    loss_fn: LossFn | None = None
    training_loss_fn: LossFn | None = None
    decode: Callable[[Any], str] | None = None

    def __call__(self, size: int) -> ProbeSet:
        if self.dataset is None:
            raise ProbeUnusable("gradwatch: probe diagnostics need the training dataset; the trainer has no "
                             "training DataLoader with a dataset")
        return ProbeSet.from_dataset(self.dataset, size, seed=self.seed, collate_fn=self.collate_fn,
                                     device=self.device, loss_fn=self.loss_fn,
                                     training_loss_fn=self.training_loss_fn,
                                     batch_size=self.batch_size or DEFAULT_PROBE_BATCH_SIZE, decode=self.decode)
