"""Worker of tests/reliability/test_kill.py: ``python _kill_worker.py HOST kill ROOT`` (HOST: ``lightning`` or
``hf``) trains with every family on, a checkpoint every ``EVERY`` steps; at the end of step ``KILL_AT`` it
flushes every writer, writes ``ROOT/progress`` and waits to be killed (``kill -9`` from the test). The test
then calls ``HOST("resume", ROOT)`` in its own process: resume the run in ROOT from its last checkpoint to
step ``END``, then train the same run uninterrupted to ``END`` in ``ROOT/reference``.

Lightning: gradwatch writes with the TensorBoardLogger's writer (``ROOT/tb/version_0``, one run directory for
both parts). Hugging Face: gradwatch's own writer in ``ROOT/gw`` (``log_dir``), so it purges on resume.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _support

EVERY, KILL_AT, END = 3, 5, 6  # checkpoints at 3 (and 6); killed at the end of 5; resumed from 3 to 6


def config(log_dir: str | None = None) -> Any:
    from gradwatch import SharpnessConfig, SignalsConfig, SpectraConfig, StabilityConfig, WatchConfig

    return WatchConfig(spectra=SpectraConfig(every=1), sharpness=SharpnessConfig(every=2, probe_size=16, max_iter=6),
                       signals=SignalsConfig(every=1, burst=2, window=5, probe_size=16),
                       stability=StabilityConfig(every=1), max_overhead=None, on_alert=lambda alert: None,
                       log_dir=log_dir)


def wait_to_be_killed(root: str, flush: Any) -> None:
    flush()
    with open(os.path.join(root, "progress.tmp"), "w") as f:
        f.write(str(KILL_AT))
    os.replace(os.path.join(root, "progress.tmp"), os.path.join(root, "progress"))
    time.sleep(120)  # killed here, in the middle of the run
    raise SystemExit("not killed")


def lightning(mode: str, root: str) -> None:
    import lightning as L
    from _support.lit import Classifier, fit
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.callbacks.lightning import GradWatch

    class Killable(L.Callback):
        def __init__(self, gw: GradWatch) -> None:
            self.gw = gw

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == KILL_AT:
                def flush() -> None:
                    trainer.logger.experiment.flush()
                    for sink in self.gw.watcher.sinks:
                        sink.flush()
                wait_to_be_killed(root, flush)

    def run(where: str, parts: list, **kwargs: Any) -> None:
        logger = TensorBoardLogger(save_dir=where, name="tb", version=0)
        fit(where, parts, module=Classifier("adamw"), logger=logger, **kwargs)

    if mode == "kill":
        gw = GradWatch(config())
        run(root, [gw, Killable(gw)], max_steps=END + 100, checkpoint_every=EVERY,
            checkpoint_dir=os.path.join(root, "ckpt"))
    else:  # from the last checkpoint written
        last = max(glob.glob(os.path.join(root, "ckpt", "*.ckpt")), key=os.path.getmtime)
        run(root, [GradWatch(config())], max_steps=END, ckpt_path=last)
        run(os.path.join(root, "reference"), [GradWatch(config())], max_steps=END)


def hf(mode: str, root: str) -> None:
    from _support.hf import trainer, training_args
    from transformers import TrainerCallback

    from gradwatch.callbacks.transformers import GradWatch

    class Killable(TrainerCallback):
        def __init__(self, gw: GradWatch) -> None:
            self.gw = gw

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == KILL_AT:
                wait_to_be_killed(root, lambda: [sink.flush() for sink in self.gw.watcher.sinks])

    def run(where: str, kill: bool, **train: Any) -> None:
        gw = GradWatch(config(os.path.join(where, "gw")))
        args = training_args(os.path.join(where, "out"), max_steps=END + 100 if kill else END, report_to="none",
                             save_strategy="steps" if kill else "no", save_steps=EVERY)
        trainer(args, [gw] + ([Killable(gw)] if kill else [])).train(**train)

    if mode == "kill":
        run(root, True)
    else:
        run(root, False, resume_from_checkpoint=True)
        run(os.path.join(root, "reference"), False)


HOSTS = {"lightning": lightning, "hf": hf}

if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    HOSTS[sys.argv[1]](sys.argv[2], sys.argv[3])
