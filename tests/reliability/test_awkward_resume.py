"""Resume, the awkward ways, through Lightning and Hugging Face: from a checkpoint written without gradwatch,
from one written with other gradwatch settings (a family added, a family removed, other layers watched), and
twice in a row. Each continues with no crash and one clear warning saying what started afresh or was dropped
(none where nothing was), and every series continues: TensorBoard read back across the parts of the run,
steps increasing, none written twice (``read_series`` fails on a duplicate).

Checkpoints at step 4 of 8 (and 6 for the second resume); spectra and sharpness due every 2 steps.
"""

from __future__ import annotations

import glob
import shutil
import warnings
from typing import Any

import pytest
from _support.tensorboard import read_series

from gradwatch import SharpnessConfig, SpectraConfig

OURS = ("grad_spectrum/", "sharpness/")
SPECTRA = SpectraConfig(every=2, stats=["nuclear_norm"], mad=False)
SHARPNESS = SharpnessConfig(every=2, probe_size=16, max_iter=8)
BOTH = dict(spectra=SPECTRA, sharpness=SHARPNESS)
FULL, FIRST = [1, 2, 4, 6, 8], [1, 2, 4]  # due at step 1, then every 2
NUCLEAR = "grad_spectrum/nuclear_norm/net.{}.weight"

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")


def ours(caught: list) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("gradwatch:")]


def steps(series: dict, tag: str) -> list[int]:
    return sorted(series[tag])


# ---- Lightning ------------------------------------------------------------------------------------------


def lit_fit(root: Any, settings: dict | None, *, max_steps: int, ckpt_path: str | None = None,
            checkpoint_every: int | None = None) -> tuple[Any, list[str]]:
    from _support.lit import Classifier, fit

    from gradwatch.callbacks.lightning import GradWatch

    gw = GradWatch(**settings, max_overhead=None) if settings is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(root, [gw] if gw else [], max_steps=max_steps, module=Classifier("adamw"), ckpt_path=ckpt_path,
            checkpoint_dir=str(root / "ckpt"), checkpoint_every=checkpoint_every)
    return gw, ours(caught)


def lit_ckpt(root: Any, step: int) -> str:
    (path,) = glob.glob(str(root / "ckpt" / f"*step={step}.ckpt"))
    return path


@pytest.fixture(scope="module")
def lit_first(tmp_path_factory):
    """First parts to step 4: with spectra and sharpness, with spectra only, and without gradwatch."""
    out = {}
    for name, settings in (("both", BOTH), ("spectra", dict(spectra=SPECTRA)), ("none", None)):
        root = tmp_path_factory.mktemp(f"lit_{name}")
        _, said = lit_fit(root, settings, max_steps=4, checkpoint_every=4)
        assert not said, said
        out[name] = root
    return out


def lit_resume(first: Any, tmp: Any, settings: dict) -> tuple[Any, list[str], dict]:
    """Resume ``first``'s step-4 checkpoint to step 8 in a copy of its run (so its TensorBoard run continues)."""
    run = tmp / "run"
    shutil.copytree(first, run)
    gw, said = lit_fit(run, settings, max_steps=8, ckpt_path=lit_ckpt(run, 4))
    return gw, said, read_series(run, OURS)


def test_lightning_resume_from_a_checkpoint_written_without_gradwatch(lit_first, tmp_path):
    gw, said, series = lit_resume(lit_first["none"], tmp_path, BOTH)
    assert gw.watcher.steps_seen == 4
    (message,) = said
    assert "without gradwatch state" in message and "resumes at step 4" in message
    assert steps(series, NUCLEAR.format(0)) == steps(series, "sharpness/lambda_max") == [6, 8]


def test_lightning_resume_with_a_family_added(lit_first, tmp_path):
    gw, said, series = lit_resume(lit_first["spectra"], tmp_path, BOTH)
    (message,) = said
    assert "other gradwatch settings" in message and "started fresh (not in the checkpoint): sharpness" in message
    assert "grad_spectrum" not in message  # restored, not started afresh
    assert steps(series, NUCLEAR.format(2)) == FULL
    assert steps(series, "sharpness/lambda_max") == [6, 8]


def test_lightning_resume_with_a_family_removed(lit_first, tmp_path):
    gw, said, series = lit_resume(lit_first["both"], tmp_path, dict(spectra=False, sharpness=SHARPNESS))
    (message,) = said
    assert "dropped (not in this run's settings): grad_spectrum" in message and "started fresh" not in message
    assert steps(series, "sharpness/lambda_max") == FULL  # restored although its index moved
    assert steps(series, NUCLEAR.format(2)) == FIRST
    assert gw.watcher.diagnostics[0]._warm is not None


def test_lightning_resume_with_other_layers_watched(lit_first, tmp_path):
    gw, said, series = lit_resume(lit_first["both"], tmp_path, dict(BOTH, include=["net.2.*", "net.4.*"]))
    (message,) = said
    assert "started fresh (its layers or shapes changed): grad_spectrum" in message
    assert "sharpness" not in message
    assert steps(series, NUCLEAR.format(0)) == FIRST
    assert steps(series, NUCLEAR.format(2)) == FULL
    assert steps(series, NUCLEAR.format(4)) == FULL
    assert steps(series, "sharpness/lambda_max") == FULL


def test_lightning_resume_twice_in_a_row(lit_first, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lit_first["both"], run)
    _, said_first = lit_fit(run, BOTH, max_steps=6, ckpt_path=lit_ckpt(run, 4), checkpoint_every=6)
    gw, said_second = lit_fit(run, BOTH, max_steps=8, ckpt_path=lit_ckpt(run, 6))
    assert not said_first and not said_second, (said_first, said_second)
    assert gw.watcher.steps_seen == 8
    series = read_series(run, OURS)
    assert len(glob.glob(str(run / "tb" / "version_*"))) == 3
    for tag in (NUCLEAR.format(0), NUCLEAR.format(4), "sharpness/lambda_max", "sharpness/hvps"):
        assert steps(series, tag) == FULL, tag


# ---- Hugging Face ---------------------------------------------------------------------------------------


def hf_train(output_dir: Any, tb_dir: Any, settings: dict | None, *, stop: int | None = None,
             resume: str | None = None) -> tuple[Any, list[str]]:
    from _support.hf import StopAt, trainer, training_args

    from gradwatch.callbacks.transformers import GradWatch

    gw = GradWatch(**settings, max_overhead=None) if settings is not None else None
    callbacks = ([gw] if gw else []) + ([StopAt(stop)] if stop else [])
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(tb_dir))
        t = trainer(training_args(output_dir, save_strategy="steps", save_steps=2, max_steps=8), callbacks)
        t.train(resume_from_checkpoint=resume)
    return gw, ours(caught)


@pytest.fixture(scope="module")
def hf_first(tmp_path_factory):
    """Runs interrupted after their checkpoint at step 4: with spectra and sharpness, and without gradwatch."""
    out = {}
    for name, settings in (("both", BOTH), ("none", None)):
        root = tmp_path_factory.mktemp(f"hf_{name}")
        _, said = hf_train(root, root / "tb" / "first", settings, stop=4)
        assert not said, said
        out[name] = root
    return out


def hf_resume(first: Any, tmp: Any, settings: dict, step: int = 4, stop: int | None = None,
              part: str = "second") -> tuple[Any, list[str], Any]:
    run = tmp / "run"
    if not run.exists():
        shutil.copytree(first, run)
    gw, said = hf_train(run, run / "tb" / part, settings, resume=str(run / f"checkpoint-{step}"), stop=stop)
    return gw, said, run


def test_hf_resume_from_a_checkpoint_written_without_gradwatch(hf_first, tmp_path):
    gw, said, run = hf_resume(hf_first["none"], tmp_path, BOTH)
    (message,) = said
    assert "without gradwatch state" in message and "resumes at step 4" in message
    series = read_series(run / "tb", OURS)
    assert gw.watcher.steps_seen == 4
    assert steps(series, NUCLEAR.format(0)) == steps(series, "sharpness/lambda_max") == [6, 8]


def test_hf_resume_with_other_settings(hf_first, tmp_path):
    gw, said, run = hf_resume(hf_first["both"], tmp_path, dict(spectra=SpectraConfig(every=2, stats=["nuclear_norm"],
                                                                                      mad=False, per_example=True,
                                                                                      per_example_every=2,
                                                                                      per_example_size=4),
                                                               sharpness=False, include=["net.4.*"]))
    (message,) = said
    assert "started fresh (not in the checkpoint): grad_spectrum" in message  # the per-example spectra
    assert "started fresh (its layers or shapes changed): grad_spectrum" in message
    assert "dropped (not in this run's settings): sharpness" in message
    series = read_series(run / "tb", OURS)
    assert steps(series, NUCLEAR.format(4)) == FULL
    assert steps(series, NUCLEAR.format(0)) == steps(series, "sharpness/lambda_max") == FIRST
    assert steps(series, "grad_spectrum/per_example/nuclear_norm/net.4.weight") == [6, 8]


def test_hf_resume_twice_in_a_row(hf_first, tmp_path):
    _, said_first, run = hf_resume(hf_first["both"], tmp_path, BOTH, stop=6)
    gw, said_second, _ = hf_resume(hf_first["both"], tmp_path, BOTH, step=6, part="third")
    assert not said_first and not said_second, (said_first, said_second)
    assert gw.watcher.steps_seen == 8
    series = read_series(run / "tb", OURS)
    for tag in (NUCLEAR.format(0), NUCLEAR.format(4), "sharpness/lambda_max", "sharpness/hvps"):
        assert steps(series, tag) == FULL, tag
