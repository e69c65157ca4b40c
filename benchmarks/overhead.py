"""Training wall time with and without gradwatch's callback (Lightning's, or the Hugging Face Trainer's).

A small GPT-2 (built from a config; nothing is downloaded) trains on synthetic random tokens on the
CPU. Runs come in pairs (``--pairs``), after one short warm-up pair, each from the same seed on the same data
with the same TensorBoard logging (so the logging cost is equal). How a pair runs:

- by default one after the other, baseline first in even pairs and gradwatch first in odd ones (ABBA, so an
  order effect does not favour one side); the time of ``trainer.fit`` is measured;
- ``--lockstep``: both at once, in two processes that take turns one optimizer step each, both training
  threads on the same core; a run's time is the sum of its own steps. Drift of the machine (other jobs, the
  host's other guests, clock changes), which moves whole runs by 5-10% here, then falls on both runs step by
  step: the steadiest mode, and the one to compare gradwatch's clock with;
- ``--concurrent``: both at once, each pinned to its own core.

The report gives each pair's ratio, their median, gradwatch's own ``gradwatch/overhead`` estimate, its share
without the one-off first runs (what ``max_overhead`` bounds), and whether the gradwatch run ended with
bitwise the same weights as its baseline (it must: gradwatch only observes).

Beside the wall-time ratio it reports gradwatch's self-measured share (its own clock, which runs from entering
any of its callback methods to leaving it, plus its hooks inside the user's forward and backward, divided by
the run's wall time) and the wall share (1 - baseline / gradwatch), so the two can be compared: their
difference is what gradwatch costs outside its own clock, or noise. The summary gives the mean difference
over pairs with its 95% t-interval, and says whether that interval lies within 1 percentage point.

    python benchmarks/overhead.py                 # 300 steps, 2 pairs, batch 16 x 64
    python benchmarks/overhead.py --lockstep --suite --pairs 20 --steps 100   # default, stability nothing due, all
    python benchmarks/overhead.py --host transformers --lockstep --suite --pairs 16 --steps 100
    python benchmarks/overhead.py --all-families                     # every family at its defaults
    python benchmarks/overhead.py --families stability --nothing-due # stability, nothing due after step 1

Without ``transformers`` the model is ``lightning.pytorch.demos.Transformer`` of similar size.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.callbacks.lightning import GradWatch

DROPOUT = {"p": 0.1}  # the models' dropout (0 with --lockstep threads: two runs in one process share torch's RNG)


def build_model(kind: str, vocab: int, seq: int) -> nn.Module:
    p = DROPOUT["p"]
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=4, n_embd=192, n_head=4, n_positions=seq, vocab_size=vocab,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
        return GPT2LMHeadModel(config)
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=vocab, ninp=192, nhead=4, nhid=768, nlayers=2, dropout=p)


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


class _ThreadPrimitives:
    """What :class:`Turns` takes from a multiprocessing context, for two threads of one process."""

    Semaphore = threading.Semaphore
    Barrier = threading.Barrier
    Lock = threading.Lock

    @staticmethod
    def Value(typecode: str, value: int) -> Any:  # noqa: N802 (multiprocessing's name)
        return types.SimpleNamespace(value=value)


class Turns:
    """Two runs taking turns, one optimizer step each (``--lockstep``): a run waits at each
    ``on_train_batch_start`` until the other has finished its step, so the baseline's and gradwatch's steps
    alternate on the same machine within a fraction of a second of each other and the machine's drift (other
    jobs, clock changes, the host's other guests) falls on both alike. Only the two training threads are
    pinned, both to the same core; background threads (TensorBoard's writer) run on whichever core is free.

    ``ctx``: a multiprocessing context (two processes), or :class:`_ThreadPrimitives` (two threads of this
    process: then what differs between processes, such as where the allocator put things, is the same for
    both runs too; their set-ups, which seed torch's global RNG and build the model, run one after the other)."""

    def __init__(self, ctx: Any, first: int) -> None:
        self.sems = [ctx.Semaphore(1 if k == first else 0) for k in (0, 1)]
        self.done = [ctx.Value("b", 0) for _ in (0, 1)]
        self.barrier = ctx.Barrier(2)
        self.setup = ctx.Lock() if ctx is _ThreadPrimitives else None
        self.holding = False
        self.core = min(os.sched_getaffinity(0))
        self.me = 0

    def mine(self, me: int) -> Turns:
        """This pair's turns as seen by run ``me`` (0 or 1)."""
        view = copy.copy(self)
        view.me = me
        return view

    def set_up(self) -> None:
        """Before a run's set-up (seeding, building the model): one set-up at a time, for threads."""
        if self.setup is not None:
            self.setup.acquire()
            self.holding = True

    def _set_up_done(self) -> None:
        if self.holding:
            self.holding = False
            self.setup.release()

    def wait(self, first: bool) -> None:
        """Hand the turn to the other run (unless ``first``) and wait for it to come back, unless that run ended."""
        other = 1 - self.me
        if first:
            # both training threads on one core (only this thread: background threads, started earlier, stay
            # free), so a difference between the cores does not fall on one run
            os.sched_setaffinity(0, {self.core})
            self._set_up_done()
            self.barrier.wait()  # both set up; the run given the first turn goes first
        else:
            self.sems[other].release()
        if first or not self.done[other].value:
            self.sems[self.me].acquire()

    def finish(self) -> None:
        """This run ended (or failed): the other one no longer waits for it."""
        self._set_up_done()
        self.done[self.me].value = 1
        self.sems[1 - self.me].release()


class StepTimer(pl.Callback):
    """The time of each optimizer step, from one ``on_train_batch_start`` to the next (every callback of the
    step included: put it first), and gradwatch's own clock read at the same points when it is attached. With
    ``turns`` (:class:`Turns`), each step runs from getting the turn to handing it on."""

    def __init__(self, gradwatch: GradWatch | None, turns: Turns | None = None) -> None:
        self.gradwatch, self.turns = gradwatch, turns
        self.starts: list[float] = []
        self.own: list[float] = []
        self.ends: list[float] = []
        self.own_ends: list[float] = []

    def _own(self) -> float:
        return float(self.gradwatch.watcher.budget.engine_seconds) if self.gradwatch is not None else 0.0

    def _end(self) -> None:
        self.ends.append(time.perf_counter())
        self.own_ends.append(self._own())

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.turns is not None:
            if self.starts:
                self._end()
            self.turns.wait(first=not self.starts)
        self.starts.append(time.perf_counter())
        self.own.append(self._own())

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.turns is not None:
            self._end()
            self.turns.finish()

    def steps(self, skip: int = 5) -> tuple[list[float], list[float]]:
        """(wall, own) seconds of each step after the first ``skip`` (without turns, the last step, which has no
        next start, is left out)."""
        if self.ends:  # timed with turns
            return ([e - s for s, e in zip(self.starts, self.ends)][skip:],
                    [e - s for s, e in zip(self.own, self.own_ends)][skip:])
        wall = [b - a for a, b in zip(self.starts, self.starts[1:])][skip:]
        own = [b - a for a, b in zip(self.own, self.own[1:])][skip:]
        return wall, own

    def total(self) -> tuple[float, float]:
        """(wall, own) seconds summed over every timed step (with turns: the run's time, the waits left out)."""
        wall, own = self.steps(skip=0)
        return sum(wall), sum(own)


def hidden_share(base: StepTimer, ours: StepTimer) -> tuple[float, float]:
    """(hidden, self) per-step shares, robust to the bursts a shared machine adds: hidden = the median over steps
    of (gradwatch step - gradwatch's own seconds in it - the same step of the baseline) / the median gradwatch
    step, i.e. what a typical step costs outside gradwatch's clock; self = median own seconds / median step."""
    (bw, _), (gw, own) = base.steps(), ours.steps()
    n = min(len(bw), len(gw))
    if n == 0:
        return float("nan"), float("nan")
    step = statistics.median(gw[:n])
    return (statistics.median(g - o - b for g, o, b in zip(gw[:n], own[:n], bw[:n])) / step,
            statistics.median(own[:n]) / step)


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


HOST = {"name": "lightning"}  # the trainer the runs use (--host; set in main)


def timed(train: Callable[[], Any]) -> tuple[float, tuple[float, float]]:
    """``train()``'s wall seconds and (process CPU seconds, this thread's CPU seconds)."""
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    train()
    return time.perf_counter() - t0, (time.process_time() - c0, time.thread_time() - m0)


def final_weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_timer(timer: StepTimer) -> Any:
    """``timer`` as a transformers ``TrainerCallback``: a step runs from one ``on_step_begin`` to the next."""
    from transformers import TrainerCallback

    class HFStepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            timer.on_train_batch_start(None)

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            timer.on_train_end(None)

    return HFStepTimer()


def hf_per_example_loss(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy of each sequence of an HF batch (``input_ids``)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def train_once_hf(with_gradwatch: bool, data: TensorDataset, steps: int, batch: int, seed: int, root: str,
                  name: str, turns: Turns | None = None
                  ) -> tuple[float, tuple[float, float], dict[str, Tensor], Any, StepTimer]:
    """:func:`train_once` through the Hugging Face ``Trainer``: the same GPT-2, data, AdamW and learning rate,
    HF's own TensorBoard logging on in both runs, the gradwatch callback in one."""
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from gradwatch.callbacks.transformers import GradWatch as HFGradWatch

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            (ids,) = data[i]
            return {"input_ids": ids, "labels": ids}

    if turns is not None:
        turns.set_up()
    set_seed(seed)
    model = build_model("gpt2", vocab=int(data.tensors[0].max()) + 1, seq=data.tensors[0].shape[1])
    callback = HFGradWatch(**FAMILIES, loss_fn=hf_per_example_loss) if with_gradwatch else None
    timer = StepTimer(callback, turns)
    hf_args = TrainingArguments(
        output_dir=os.path.join(root, name), report_to=["tensorboard"],
        max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-4, lr_scheduler_type="constant",
        optim="adamw_torch", weight_decay=0.01, logging_steps=50, save_strategy="no", use_cpu=True, seed=seed,
        data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, full_determinism=False)
    trainer = Trainer(model=model, args=hf_args, train_dataset=Sequences(),
                      callbacks=[hf_timer(timer)] + ([callback] if callback else []))
    trainer.remove_callback(PrinterCallback)  # its dict of metrics at each logging step, in both runs alike
    seconds, cpu_seconds = timed(trainer.train)
    return seconds, cpu_seconds, final_weights(model), callback, timer


def train_once(with_gradwatch: bool, kind: str, data: TensorDataset, steps: int, batch: int, seed: int,
               root: str, name: str, turns: Turns | None = None
               ) -> tuple[float, tuple[float, float], dict[str, Tensor], GradWatch | None, StepTimer]:
    """One seeded run; returns fit()'s wall seconds, (process CPU seconds, this thread's CPU seconds), the final
    weights, the callback, the step timer. Process CPU time counts every thread (also those that ended: the TensorBoard writer's)."""
    if HOST["name"] == "transformers":
        return train_once_hf(with_gradwatch, data, steps, batch, seed, root, name, turns)
    if turns is not None:
        turns.set_up()
    pl.seed_everything(seed, verbose=False)
    module = LanguageModel(kind, vocab=int(data.tensors[0].max()) + 1, seq=data.tensors[0].shape[1])
    callback = GradWatch(**FAMILIES, loss_fn=per_example_loss) if with_gradwatch else None
    timer = StepTimer(callback, turns)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
        logger=TensorBoardLogger(root, name=name), callbacks=[timer] + ([callback] if callback else []),
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=50, num_sanity_val_steps=0, deterministic=True,
    )
    loader = DataLoader(data, batch_size=batch, shuffle=False, num_workers=0)
    seconds, cpu_seconds = timed(lambda: trainer.fit(module, loader))
    return seconds, cpu_seconds, final_weights(module), callback, timer


def family_settings(chosen: Sequence[str], nothing_due: bool) -> dict[str, Any]:
    """GradWatch keywords: each registered family on (its defaults) iff in ``chosen``; with ``nothing_due`` every
    cadence of a chosen family (``every`` and each ``*_every``) is step 1 only."""
    import dataclasses

    from gradwatch.config import Cadence
    from gradwatch.registry import families

    out: dict[str, Any] = {f.key: f.key in chosen for f in families()}
    if nothing_due:
        for f in families():
            if out[f.key]:
                cfg = f.config_class()
                out[f.key] = dataclasses.replace(cfg, **{x.name: Cadence.at([1]) for x in dataclasses.fields(cfg)
                                                         if x.name == "every" or x.name.endswith("_every")})
    return out


@dataclass
class Run:
    """What one run gives the report (picklable: a concurrent run comes back from a child process)."""

    seconds: float
    cpu: tuple[float, float]
    weights: dict[str, Tensor]
    timer: StepTimer
    own: float = 0.0  # every second inside gradwatch's callback methods and hooks
    overhead: float = 0.0
    budgeted: float = 0.0
    postponed: int = 0
    runs: dict[str, int] = field(default_factory=dict)


def run_once(with_gradwatch: bool, kind: str, data: TensorDataset, steps: int, batch: int, seed: int, root: str,
             name: str, cpu: int | None = None, barrier: Any = None, turns: Turns | None = None) -> Run:
    """:func:`train_once`, summarised; ``cpu``: pinned to that core; ``barrier``: fit starts when the other
    concurrent run's does; ``turns``: steps taken in turn with the other run, whose seconds and gradwatch's
    own are then summed over this run's turns only."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if barrier is not None:
        barrier.wait()
    try:
        seconds, cpu_s, weights, cb, timer = train_once(with_gradwatch, kind, data, steps, batch, seed, root, name,
                                                        turns)
    except BaseException:
        if turns is not None:
            turns.finish()  # the other run goes on alone
        raise
    timer.gradwatch, timer.turns = None, None
    own = float(cb.watcher.budget.engine_seconds) if cb is not None else 0.0
    if turns is not None:
        seconds, own = timer.total()
    if cb is None:
        return Run(seconds, cpu_s, weights, timer)
    w = cb.watcher
    runs = {w._key(j).split(":", 2)[2]: b["runs"] for j, b in w._budgeted.items()}
    return Run(seconds, cpu_s, weights, timer, own, float(w.overhead()), float(w.budgeted_overhead()),
               int(w.postponed_steps), {k: int(v) for k, v in runs.items()})


def _child(conn: Any, *args: Any, **kwargs: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(run_once(*args, **kwargs), buf)  # bytes, not tensors shared by file descriptor (this process ends)
    conn.send_bytes(buf.getvalue())
    conn.close()


def paired_runs(kind: str, data: TensorDataset, args: argparse.Namespace, root: str, label: str,
                i: int) -> tuple[Run, Run]:
    """The baseline and the gradwatch run at the same time, so that what the machine does meanwhile (other
    jobs, clock changes) falls on both alike instead of on whichever ran at a worse moment. ``--concurrent``:
    two forked processes, each pinned to its own core (swapped every other pair), ``fit`` started together.
    ``--lockstep``: taking turns, one step each (:class:`Turns`; who goes first swaps every other pair), in two
    forked processes or (``--lockstep threads``) two threads of this one."""
    import io
    import multiprocessing as mp

    names = [f"{label}_{'gradwatch' if gw else 'baseline'}_{i}" for gw in (False, True)]
    if args.lockstep == "threads":
        turns = Turns(_ThreadPrimitives, first=i % 2)
        out: list[Any] = [None, None]

        def go(k: int) -> None:
            torch.set_num_threads(1)  # in this thread too: OpenMP keeps the thread count per thread
            try:
                out[k] = run_once(bool(k), kind, data, args.steps, args.batch, args.seed, root, names[k],
                                  turns=turns.mine(k))
            except BaseException as exc:  # reported below; the other run must not wait for this one
                out[k] = exc

        threads = [threading.Thread(target=go, args=(k,), name=names[k]) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out[0], out[1]
    ctx = mp.get_context("fork")
    barrier, turns, cores = None, None, [None, None]
    if args.lockstep:
        turns = Turns(ctx, first=i % 2)
    else:
        barrier = ctx.Barrier(2)
        cores = sorted(os.sched_getaffinity(0))[:2]
        if i % 2:
            cores.reverse()
    procs, pipes = [], []
    for k, (gw, core) in enumerate(zip((False, True), cores)):
        here, there = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(there, gw, kind, data, args.steps, args.batch, args.seed, root,
                                                 names[k], core, barrier),
                           kwargs={"turns": turns.mine(k) if turns is not None else None})
        proc.start()
        procs.append(proc)
        pipes.append(here)
    runs = [torch.load(io.BytesIO(pipe.recv_bytes()), weights_only=False) for pipe in pipes]
    for proc in procs:
        proc.join()
    return runs[0], runs[1]


def measure(args: argparse.Namespace, kind: str, data: TensorDataset, root: str, label: str) -> list[tuple]:
    """The timed pairs of one configuration (``FAMILIES``), each printed as it ends; returns their rows."""
    rows = []
    warm = min(args.warmup_steps, args.steps)
    train_once(False, kind, data, warm, args.batch, args.seed, root, f"{label}_warmup_baseline")
    train_once(True, kind, data, warm, args.batch, args.seed, root, f"{label}_warmup_gradwatch")
    for i in range(args.pairs):
        if args.concurrent or args.lockstep:
            base, ours = paired_runs(kind, data, args, root, label, i)
        else:
            # ABBA: every other pair runs gradwatch first, so an order effect (caches, allocator, the machine
            # warming) falls on both sides of the median instead of one
            order = (False, True) if i % 2 == 0 else (True, False)
            runs_i = {gw: run_once(gw, kind, data, args.steps, args.batch, args.seed, root,
                                   f"{label}_{'gradwatch' if gw else 'baseline'}_{i}") for gw in order}
            base, ours = runs_i[False], runs_i[True]
        base_s, gw_s, base_c, gw_c = base.seconds, ours.seconds, base.cpu, ours.cpu
        same = base.weights.keys() == ours.weights.keys() and all(torch.equal(base.weights[k], ours.weights[k])
                                                                  for k in base.weights)
        rows.append((base_s, gw_s, gw_s / base_s, 1 - base_s / gw_s, ours.own / gw_s, base_c[1], gw_c[1],
                     base_c[0] - base_c[1], gw_c[0] - gw_c[1], 1 - base_c[1] / gw_c[1], ours.overhead, same,
                     *hidden_share(base.timer, ours.timer)))
        print(f"  {label} pair {i}: baseline {base_s:.2f} s, gradwatch {gw_s:.2f} s; gradwatch/overhead without the "
              f"one-off first runs (what max_overhead bounds) {ours.budgeted:.2%}; postponed steps "
              f"{ours.postponed}" + (f"; runs of budgeted cadences {ours.runs}" if ours.runs else "")
              + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
    return rows


HEADER = (f"{'pair':>4} {'base s':>7} {'gw s':>7} {'ratio':>6} {'wall share':>10} {'self share':>10} "
          f"{'diff pp':>7} | {'main cpu b':>10} {'main cpu g':>10} {'cpu share':>9} {'diff pp':>7} | "
          f"{'other b':>7} {'other g':>7} | {'overhead()':>10} {'same w':>6} | {'step self':>9} {'hidden':>7}")


def line(label: str, r: Sequence[Any]) -> str:
    return (f"{label:>4} {r[0]:>7.2f} {r[1]:>7.2f} {r[2]:>6.3f} {r[3]:>10.2%} {r[4]:>10.2%} "
            f"{100 * (r[3] - r[4]):>+7.2f} | {r[5]:>10.2f} {r[6]:>10.2f} {r[9]:>9.2%} {100 * (r[9] - r[4]):>+7.2f} | "
            f"{r[7]:>7.2f} {r[8]:>7.2f} | {r[10]:>10.2%} {str(r[11]):>6} | {r[13]:>9.2%} {r[12]:>+7.2%}")


def agreement(diffs_pp: Sequence[float], tolerance_pp: float = 1.0) -> tuple[float, float, str]:
    """(mean, half-width of its 95% t-interval, verdict) of per-pair differences in percentage points.

    The verdict says what the pairs can tell: "yes" when the whole interval lies within +-``tolerance_pp``,
    "NO" when it lies wholly outside, otherwise "unresolved, ~N pairs" with N the pairs whose interval, at the
    same spread and mean, would fit inside the tolerance (a rough guide), or "mean outside" when it cannot."""
    from scipy import stats

    n = len(diffs_pp)
    mean = statistics.fmean(diffs_pp)
    if n < 2:
        return mean, float("inf"), "unresolved, 1 pair"
    sd = statistics.stdev(diffs_pp)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5
    if abs(mean) + half <= tolerance_pp:
        return mean, half, "yes"
    if abs(mean) - half > tolerance_pp:
        return mean, half, "NO"
    room = tolerance_pp - abs(mean)
    if room <= 0:
        return mean, half, "unresolved, mean outside"
    return mean, half, f"unresolved, ~{math.ceil((1.96 * sd / room) ** 2)} pairs"


def table(rows: list[tuple]) -> list[Any]:
    """Print the rows and their medians; returns the median row."""
    print(HEADER)
    print("-" * len(HEADER))
    for i, r in enumerate(rows):
        print(line(str(i), r))
    print("-" * len(HEADER))
    med = ([statistics.median(r[j] for r in rows) for j in range(11)] + [all(r[11] for r in rows)]
           + [statistics.median(r[j] for r in rows) for j in (12, 13)])
    print(line("med", med))
    if len(rows) > 1:
        print(f"wall share over pairs ranges {min(r[3] for r in rows):.2%} .. {max(r[3] for r in rows):.2%}: "
              "differences within this spread are run-to-run noise (more pairs: --pairs)")
    return med


EXPLAIN = """columns: base s / gw s = wall seconds of trainer.fit without / with gradwatch; ratio = gw s / base s;
wall share = 1 - base s / gw s, the share of the gradwatch run's wall time that the baseline did not need;
self share = gradwatch's own clock (every second from entering one of its callback methods to leaving it, and
its hooks inside the user's forward and backward) / gw s; diff pp = wall share - self share, in percentage
points: time the run lost outside gradwatch's clock (positive) or noise. main cpu b / g = CPU seconds of the
thread that trains (baseline / gradwatch), cpu share = 1 - b / g: with --threads 1 the same comparison without
the time the thread waited for a core, so much steadier than wall time on a loaded machine (cache and
frequency effects remain). other b / g = CPU seconds of every other thread (TensorBoard's writer thread,
worker pools), which the training thread need not wait for on a free core. overhead() =
gradwatch/overhead as logged (its clock over the wall time since on_train_start). same w = bitwise the same
final weights as the baseline (gradwatch only observes). Per step (each step timed from one
on_train_batch_start to the next, the first 5 left out): step self = median of gradwatch's own seconds in a
step / median step; hidden = median over steps of (gradwatch step - its own seconds - the same baseline
step) / median step: what a typical step costs outside gradwatch's clock, robust to the bursts of a shared
machine that the whole-run columns take in (steps with a diagnostic due are in the whole-run columns, not
in the medians). Medians over pairs."""


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
    parser.add_argument("--all-families", action="store_true", help="every registered family on, at its defaults")
    parser.add_argument("--sharpness-probe", type=int, default=None,
                        help="SharpnessConfig.probe_size where sharpness is on (default: the suite uses 8, else "
                             "the family default 256). At 256 the one-off estimate at step 1 (50 Lanczos steps, "
                             "twice with the Adam preconditioner: up to 100 Hessian-vector products on 16 training "
                             "batches' worth of tokens) costs more than a whole 300-step baseline run on this model, "
                             "a one-off that swamps what the comparison is about")
    parser.add_argument("--concurrent", action="store_true",
                        help="run each pair's baseline and gradwatch run at the same time, each pinned to its own "
                             "core (needs 2 free cores; implies --threads 1): the machine's drift falls on both alike")
    parser.add_argument("--host", choices=["lightning", "transformers"], default="lightning",
                        help="the trainer: Lightning's (default) or the Hugging Face Trainer (GPT-2 only)")
    parser.add_argument("--lockstep", nargs="?", const="processes", choices=["processes", "threads"], default=None,
                        help="run each pair's baseline and gradwatch run at the same time, taking turns one "
                             "optimizer step each (implies --threads 1); each run's time is the sum of its own "
                             "steps, so the machine's drift falls on both alike, step by step. In two processes "
                             "(default), or in two threads of one process ('threads': then what differs from one "
                             "process to the next falls on both alike too; the models' dropout is off, as the "
                             "two runs share torch's global RNG)")
    parser.add_argument("--cpu", type=int, default=None, metavar="CORE",
                        help="pin the whole process to this core (implies --threads 1): TensorBoard's writer thread "
                             "then shares the training's core, so its work shows in the wall time, and other work on "
                             "the machine's remaining cores disturbs the runs less")
    parser.add_argument("--suite", action="store_true",
                        help="three configurations in one run, with a summary: default settings, stability alone "
                             "with nothing due after step 1, every family on")
    args = parser.parse_args(argv)
    from gradwatch.registry import families

    known = [f.key for f in families()]
    chosen = known if args.all_families else [f.strip() for f in args.families.split(",") if f.strip()]
    if not chosen or any(f not in known for f in chosen):
        parser.error(f"--families expected a comma-separated subset of {known}, got {args.families!r}")
    for flag in ("steps", "pairs", "batch", "seq", "vocab", "sharpness_probe"):
        if flag == "sharpness_probe" and args.sharpness_probe is None:
            continue
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.suite:
        configs = [("default", family_settings(["spectra"], False)),
                   ("stability, nothing due", family_settings(["stability"], True)),
                   ("all families", family_settings(known, False))]
    else:
        configs = [(",".join(chosen) + (" (nothing due)" if args.nothing_due else ""),
                    family_settings(chosen, args.nothing_due))]
    probe_size = args.sharpness_probe if args.sharpness_probe is not None else (8 if args.suite else None)
    if probe_size is not None:
        import dataclasses

        from gradwatch.config import SharpnessConfig
        for _, settings in configs:
            if settings.get("sharpness") is True:
                settings["sharpness"] = SharpnessConfig(probe_size=probe_size)
            elif isinstance(settings.get("sharpness"), SharpnessConfig):
                settings["sharpness"] = dataclasses.replace(settings["sharpness"], probe_size=probe_size)
    HOST["name"] = args.host
    if args.host == "transformers" and args.model == "demo":
        parser.error("--host transformers trains the GPT-2; --model demo is Lightning's demo Transformer")
    if args.host == "transformers" and args.lockstep == "threads":
        # measured: two HF Trainers in one process put gradwatch's run 2.7 pp above its own clock (12 pairs),
        # where two processes show none; they share accelerate's process-wide state (a likely cause, not traced)
        parser.error("--lockstep threads runs two Trainers in one process, and two HF Trainers share accelerate's "
                     "process-wide state: with --host transformers use --lockstep (two processes)")
    if args.lockstep:
        if args.concurrent:
            parser.error("--lockstep and --concurrent are two ways to pair runs: give one")
        args.threads = 1
        if args.lockstep == "threads":
            DROPOUT["p"] = 0.0
    if args.cpu is not None:
        if args.concurrent:
            parser.error("--cpu pins one process; --concurrent pins each of its two runs itself")
        if args.cpu not in os.sched_getaffinity(0):
            parser.error(f"--cpu expected one of the cores {sorted(os.sched_getaffinity(0))}, got {args.cpu}")
        os.sched_setaffinity(0, {args.cpu})
        args.threads = 1
    if args.concurrent:
        if len(os.sched_getaffinity(0)) < 2:
            parser.error("--concurrent needs 2 cores")
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kind = "gpt2" if args.host == "transformers" else args.model
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
    load0 = os.getloadavg()[0]
    print(f"host: {args.host}; model: {kind} ({n_params / 1e6:.2f}M parameters), synthetic tokens, batch {args.batch} x {args.seq}, "
          f"vocab {args.vocab}, AdamW; CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load0:.1f} on {os.cpu_count()} CPUs; steps {args.steps}, {args.pairs} pairs "
          f"({f'lock-step, {args.lockstep}' if args.lockstep else 'side by side' if args.concurrent else 'ABBA order'}"
          f"{', dropout off' if DROPOUT['p'] == 0 else ''})")
    summary = []
    with tempfile.TemporaryDirectory() as root:
        for label, settings in configs:
            FAMILIES.clear()
            FAMILIES.update(settings)
            cadences = ", ".join(f"{k} every {getattr(v, 'every', None) or next(f.config_class().every for f in families() if f.key == k)!r}"
                                 for k, v in settings.items() if v)
            print(f"\n[{label}] GradWatch({', '.join(f'{k}={v is not False}' for k, v in settings.items())}) "
                  f"({cadences}; {'TensorBoardLogger' if args.host == 'lightning' else 'report_to tensorboard'} in both runs)")
            rows = measure(args, kind, data, root, label.split(",")[0].replace(" ", "_"))
            print()
            summary.append((label, table(rows), rows))
    print("\n" + EXPLAIN)
    print(f"\n{'configuration':>24} {'ratio':>6} {'wall share':>10} {'self share':>10} {'diff pp':>7} "
          f"{'cpu share':>9} {'diff pp':>7} {'hidden/step':>11}  (medians over pairs)")
    for label, m, _ in summary:
        print(f"{label:>24} {m[2]:>6.3f} {m[3]:>10.2%} {m[4]:>10.2%} {100 * (m[3] - m[4]):>+7.2f} {m[9]:>9.2%} "
              f"{100 * (m[9] - m[4]):>+7.2f} {m[12]:>+11.2%}")
    print("\nwall share - self share, per pair (pp): mean +- half-width of its 95% t-interval; agree within 1 pp?")
    print(f"{'configuration':>24} {'pairs':>5} {'wall - self':>15} {'verdict':<28} {'cpu - self':>15} {'verdict':<28} "
          f"{'hidden/step':>15} verdict")
    for label, _, rows in summary:
        cells = []
        for diffs in ([100 * (r[3] - r[4]) for r in rows], [100 * (r[9] - r[4]) for r in rows],
                      [100 * r[12] for r in rows]):
            mean, half, verdict = agreement(diffs)
            cells.append((f"{mean:+.2f} +- {half:.2f}", verdict))
        print(f"{label:>24} {len(rows):>5} {cells[0][0]:>15} {cells[0][1]:<28} {cells[1][0]:>15} {cells[1][1]:<28} "
              f"{cells[2][0]:>15} {cells[2][1]}")
    print(f"(load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} now, on {os.cpu_count()} CPUs: above "
          "about 0.5 per CPU other work shares the cores and the wall columns are noise-dominated)")


if __name__ == "__main__":
    main()
