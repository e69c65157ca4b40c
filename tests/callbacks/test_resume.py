"""Resume through a Lightning checkpoint and through HF ``checkpoint-N``: every series continues with no step
written twice and none missing (TensorBoard read back across the two parts of the run), with the values of an
uninterrupted run, and the first sharpness estimate after the resume starts from the saved warm start: the same
Hessian-vector-product count (``sharpness/hvps``) as the uninterrupted run at that step, where a cold start
takes more.

Deterministic CPU runs with the same seeds; an AdamW (two warm starts: the Hessian's and the preconditioned
one); checkpoints at step 4 of 8, sharpness due at 1, 2, 4, 6, 8: the first estimate after the resume is at 6.

Hugging Face, both ways a user resumes: ``trainer.train(resume_from_checkpoint=path)`` (or ``=True``), and
``TrainingArguments(resume_from_checkpoint=path)``. ``Trainer.train`` never reads that field (transformers 5.x,
as 4.x: "not directly used by Trainer, intended for training/evaluation scripts"); HF's example scripts (and
users parsing ``--resume_from_checkpoint``) pass it on, ``trainer.train(resume_from_checkpoint=
args.resume_from_checkpoint)``, which resumes. Setting the field alone and calling ``trainer.train()`` starts
the Trainer at step 0 with fresh weights: gradwatch must then start afresh too (and say why) rather than
restore the checkpoint's counters and warm starts into a new run.
"""

from __future__ import annotations

import glob
import math
import shutil
import warnings
from typing import Any

import pytest
import torch
from _support.tensorboard import read_series

from gradwatch import SharpnessConfig, SpectraConfig
from gradwatch.metrics.sharpness import Sharpness

OURS = ("grad_spectrum/", "sharpness/", "gradwatch/")
DUE = [1, 2, 4, 6, 8]
FIRST_AFTER_RESUME = 6


def _config() -> dict[str, Any]:
    return dict(spectra=SpectraConfig(every=2, stats=["nuclear_norm", "frobenius_norm", "stable_rank"]),
                sharpness=SharpnessConfig(every=2, probe_size=32), max_overhead=None, on_error="raise")


def _assert_continues(resumed: dict[str, dict[int, float]], full: dict[str, dict[int, float]]) -> None:
    """Same tags, same steps (read_series already failed on a step written twice), same values."""
    assert set(resumed) == set(full)
    assert "sharpness/lambda_max_precond" in full and "grad_spectrum/nuclear_norm/net.2.weight" in full
    for tag, series in full.items():
        assert sorted(resumed[tag]) == sorted(series), tag
        if tag != "gradwatch/overhead":  # wall time
            for step, value in series.items():
                assert math.isclose(resumed[tag][step], value, rel_tol=1e-6) or (
                    math.isnan(value) and math.isnan(resumed[tag][step])), (tag, step, resumed[tag][step], value)
    assert sorted(full["sharpness/hvps"]) == DUE


# ---- Lightning ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_checkpoint_resume_continues_every_series_and_the_warm_start(tmp_path, monkeypatch):
    from _support.lit import Classifier, fit

    from gradwatch.callbacks.lightning import GradWatch

    def module() -> Classifier:
        return Classifier("adamw", lr=0.05)

    full_gw = GradWatch(**_config())
    _, full_model = fit(tmp_path / "full", [full_gw], max_steps=8, module=module())
    full = read_series(tmp_path / "full", OURS)

    ckpt_dir = tmp_path / "ckpt"
    fit(tmp_path / "run", [GradWatch(**_config())], max_steps=4, module=module(), checkpoint_dir=str(ckpt_dir),
        checkpoint_every=4)
    (ckpt,) = glob.glob(str(ckpt_dir / "*.ckpt"))
    resumed_gw = GradWatch(**_config())
    trainer, resumed_model = fit(tmp_path / "run", [resumed_gw], max_steps=8, module=module(), ckpt_path=ckpt)
    assert trainer.global_step == 8 and resumed_gw.watcher.steps_seen == full_gw.watcher.steps_seen == 8
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()))
    assert len(glob.glob(str(tmp_path / "run" / "tb" / "version_*"))) == 2  # the resumed part is a new version
    resumed = read_series(tmp_path / "run", OURS)
    _assert_continues(resumed, full)
    assert resumed["sharpness/hvps"][FIRST_AFTER_RESUME] == full["sharpness/hvps"][FIRST_AFTER_RESUME]

    # the same callback object resumed in a new Trainer (a notebook's second fit): its previous run's
    # diagnostics are replaced by new ones, which get the checkpoint's state
    again = tmp_path / "again"
    first_part = GradWatch(**_config())
    fit(again, [first_part], max_steps=4, module=module(), checkpoint_dir=str(again / "ckpt"), checkpoint_every=4)
    (again_ckpt,) = glob.glob(str(again / "ckpt" / "*.ckpt"))
    fit(again, [first_part], max_steps=8, module=module(), ckpt_path=again_ckpt)
    assert first_part.watcher.steps_seen == 8
    _assert_continues(read_series(again, OURS), full)

    # the check has teeth: resumed without the carried warm starts, Lanczos needs more products at step 6
    monkeypatch.setattr(Sharpness, "load_carried_state", lambda self, state: None)
    fit(tmp_path / "cold", [GradWatch(**_config())], max_steps=8, module=module(), ckpt_path=ckpt)
    cold = read_series(tmp_path / "cold", ["sharpness/"])
    assert cold["sharpness/hvps"][FIRST_AFTER_RESUME] > full["sharpness/hvps"][FIRST_AFTER_RESUME]


# ---- Hugging Face ---------------------------------------------------------------------------------------

HF_ARGS = dict(save_strategy="steps", save_steps=4, max_steps=8)


def _hf_run(output_dir, tb_dir, *, stop: int | None = None, call: Any = None, args_field: str | None = None):
    from _support.hf import StopAt, trainer, training_args

    from gradwatch.callbacks.transformers import GradWatch

    gw = GradWatch(**_config())
    with pytest.MonkeyPatch.context() as mp:  # where HF's TensorBoardCallback writes (read at Trainer init)
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(tb_dir))
        args = training_args(output_dir, resume_from_checkpoint=args_field, **HF_ARGS)
        t = trainer(args, [gw] + ([StopAt(stop)] if stop else []))
    t.train(**({} if call is None else {"resume_from_checkpoint": call(args)}))
    return t, gw


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """The uninterrupted run, and a run interrupted after its checkpoint at step 4."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_resume")
    full_trainer, _ = _hf_run(root / "full", root / "full" / "tb")
    _hf_run(root / "interrupted", root / "interrupted" / "tb" / "first", stop=4)
    assert sorted(p.rsplit("/", 1)[-1] for p in glob.glob(str(root / "interrupted" / "checkpoint-*"))) == ["checkpoint-4"]
    return dict(root=root, full=read_series(root / "full" / "tb", OURS),
                weights={k: v.clone() for k, v in full_trainer.model.state_dict().items()})


HOW = {
    "train(resume_from_checkpoint=path)": dict(call=lambda args: args.output_dir + "/checkpoint-4"),
    "train(resume_from_checkpoint=True)": dict(call=lambda args: True),
    # TrainingArguments(resume_from_checkpoint=path), passed on as HF's example scripts (and any script that
    # parses --resume_from_checkpoint) do
    "args.resume_from_checkpoint=path+train(resume_from_checkpoint=args.resume_from_checkpoint)":
        dict(args_field="checkpoint-4", call=lambda args: args.resume_from_checkpoint),
}


@pytest.mark.parametrize("how", list(HOW))
def test_hf_checkpoint_resume_continues_every_series_and_the_warm_start(hf_runs, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(hf_runs["root"] / "interrupted", run)
    kwargs = dict(HOW[how])
    if kwargs.get("args_field"):
        kwargs["args_field"] = str(run / kwargs["args_field"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, gw = _hf_run(run, run / "tb" / "second", **kwargs)
    assert not [w for w in caught if "gradwatch" in str(w.message)], [str(w.message) for w in caught]
    assert t.state.global_step == 8 and gw.watcher.steps_seen == 8
    assert all(torch.equal(v, hf_runs["weights"][k]) for k, v in t.model.state_dict().items())
    resumed = read_series(run / "tb", OURS)  # both parts of the run
    _assert_continues(resumed, hf_runs["full"])
    assert min(resumed["sharpness/hvps"]) == 1 and sorted(read_series(run / "tb" / "second", OURS)["sharpness/hvps"]) == [6, 8]
    assert resumed["sharpness/hvps"][FIRST_AFTER_RESUME] == hf_runs["full"]["sharpness/hvps"][FIRST_AFTER_RESUME]


def test_hf_resume_field_alone_is_not_read_by_the_trainer_and_gradwatch_starts_afresh_with_it(hf_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_runs["root"] / "interrupted", run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, gw = _hf_run(run, run / "tb" / "second", args_field=str(run / "checkpoint-4"))
    ours = [str(w.message) for w in caught if "gradwatch" in str(w.message)]
    assert len(ours) == 1 and "is not read by Trainer.train()" in ours[0] and "checkpoint-4" in ours[0], ours
    # the Trainer started over: step 1, fresh weights, the uninterrupted run's trajectory
    assert t.state.global_step == 8 and gw.watcher.steps_seen == 8
    assert all(torch.equal(v, hf_runs["weights"][k]) for k, v in t.model.state_dict().items())
    # and so did gradwatch: a fresh run's series, its first estimate cold, as the uninterrupted run's was
    _assert_continues(read_series(run / "tb" / "second", OURS), hf_runs["full"])


def test_hf_same_trainer_interrupted_then_resumed(hf_runs, tmp_path):
    """A notebook: ``trainer.train()`` stops after the checkpoint at step 4 (an interrupt), then
    ``trainer.train(resume_from_checkpoint=True)`` on the same Trainer and callback."""
    from _support.hf import StopAt, trainer, training_args

    from gradwatch.callbacks.transformers import GradWatch

    gw = GradWatch(**_config())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
        t = trainer(training_args(tmp_path, **HF_ARGS), [gw, StopAt(4)])
    t.train()
    assert t.state.global_step == 4 and gw.watcher.steps_seen == 4
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 8 and gw.watcher.steps_seen == 8
    resumed = read_series(tmp_path / "tb", OURS)
    _assert_continues(resumed, hf_runs["full"])
    assert resumed["sharpness/hvps"][FIRST_AFTER_RESUME] == hf_runs["full"]["sharpness/hvps"][FIRST_AFTER_RESUME]
