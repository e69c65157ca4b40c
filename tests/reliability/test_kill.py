"""``kill -9`` in the middle of a run, then a resume from the last checkpoint, through Lightning and Hugging Face.

A worker trains with spectra, signals and stability at every step and sharpness every 2 (budget off), a
checkpoint every 3 steps; at step 5 it flushes its writers and is killed (SIGKILL). The test then tears the
last line of each JSONL file (half a row, no newline), resumes from the step-3 checkpoint to step 6 in the
same run directory (in its own process) and trains the same run uninterrupted for reference. Both hosts'
workers start at once (a module fixture), so their start-up overlaps. Then every JSONL file parses line by
line, ``gradwatch report`` and ``gradwatch compare`` run on it, and every series has each step of the
uninterrupted run exactly once: JSONL rows past the checkpoint gave way to the resumed run's, TensorBoard
read back by gradwatch's reader takes the resumed run's values (Lightning: the host's writer keeps both), and
gradwatch's own writer (Hugging Face here, ``log_dir``) purges what the killed run wrote past the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from _support.launch import clean_environment

from gradwatch.cli import main
from gradwatch.integrations.jsonl import read_records
from gradwatch.integrations.report import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_kill_worker.py")
RUN_DIR = {"lightning": "tb/version_0", "hf": "gw"}
TORN = '{"step": 9, "changes": [{"layer": "net.0.we'


def worker():
    spec = importlib.util.spec_from_file_location("_kill_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = worker()
CHECKPOINT, KILLED_AT, END = W.EVERY, W.KILL_AT, W.END


def start(host: str, root: Path) -> subprocess.Popen:
    with open(root / "kill.log", "w") as log:
        return subprocess.Popen([sys.executable, WORKER, host, "kill", str(root)], cwd=HERE, env=clean_environment(),
                                stdout=log, stderr=subprocess.STDOUT)


def kill_mid_run(proc: subprocess.Popen, root: Path) -> None:
    """Wait until the worker is past step ``KILLED_AT``, then ``kill -9`` it."""
    deadline = time.monotonic() + 180
    while not (root / "progress").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and (root / "progress").exists(), (root / "kill.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Both hosts' killable runs, started at once: ``{host: (process, root)}``; any left running are killed."""
    out = {}
    for host in RUN_DIR:
        root = tmp_path_factory.mktemp(f"kill_{host}")
        out[host] = (start(host, root), root)
    yield out
    for proc, _ in out.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def event_steps(run_dir: Path, purge: bool) -> tuple[dict[str, list[int]], list[dict[str, dict[int, float]]]]:
    """``({tag: every step read, repeats kept}, [{tag: {step: value}} per event file, oldest first])`` of gradwatch's scalars,
    the directory read as TensorBoard reads it (``purge``: with its restart purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    ea.Reload()
    ours = [t for t in ea.Tags()["scalars"] if not t.startswith(("train_loss", "epoch"))]
    read = {t: [e.step for e in ea.Scalars(t)] for t in ours}
    files = []
    for path in run_dir.glob("events.out.tfevents.*"):
        one = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        one.Reload()
        files.append((one.FirstEventTimestamp(),
                      {t: {e.step: e.value for e in one.Scalars(t)} for t in one.Tags()["scalars"] if t in read}))
    # in the order written: two files opened in the same second sort by process id in their names
    return read, [f for _, f in sorted(files, key=lambda f: f[0])]


def jsonl_steps(run_dir: Path) -> dict[str, list[int]]:
    """``{file: [step of each row]}``; every line of every JSONL file parses and ends with a newline."""
    out = {}
    for path in sorted(run_dir.glob("*.jsonl")):
        text = path.read_text()
        assert text.endswith("\n"), path
        out[path.name] = [json.loads(line)["step"] for line in text.splitlines()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("host", ["lightning", "hf"])
def test_kill_9_mid_run_then_resume_continues_every_series_once(host: str, workers: dict) -> None:
    proc, tmp_path = workers[host]
    kill_mid_run(proc, tmp_path)
    run_dir, reference = tmp_path / RUN_DIR[host], tmp_path / "reference" / RUN_DIR[host]
    killed = jsonl_steps(run_dir)
    assert killed and max(max(s) for s in killed.values()) == KILLED_AT  # rows past the checkpoint were written
    for name in killed:  # a write cut short by the kill
        with open(run_dir / name, "a") as f:
            f.write(TORN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torn = {name: read_records(run_dir / name) for name in killed}
    assert {name: [r["step"] for r in rows] for name, rows in torn.items()} == killed
    assert len(caught) == len(killed) and all("(torn" in str(w.message) for w in caught)
    with pytest.warns(RuntimeWarning, match=r"signals.jsonl: skipped line \d+ \(torn"):
        assert load_run(run_dir).signals  # what `gradwatch report` reads: a torn run reads too

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker().HOSTS[host]("resume", str(tmp_path))
    said = [str(w.message) for w in caught if str(w.message).startswith("gradwatch:")]
    assert not said, said  # resumed with gradwatch's state: nothing starts afresh, nothing is torn any more

    # JSONL: clean, each row of the uninterrupted run once, in order
    resumed, expected = jsonl_steps(run_dir), jsonl_steps(reference)
    assert resumed == expected and "signals.jsonl" in expected
    rows = expected["signals.jsonl"]
    assert rows == sorted(set(rows)) and CHECKPOINT < rows[-2] < rows[-1] == END

    # gradwatch's reader: every series of the uninterrupted run, each step once
    run, ref = load_run(run_dir), load_run(reference)
    assert sorted(run.scalars) == sorted(ref.scalars) and len(ref.scalars) > 50
    for tag, series in ref.scalars.items():
        assert run.scalars[tag].steps.tolist() == series.steps.tolist(), tag
    assert ref.scalars["gradwatch/overhead"].steps.tolist() == list(range(1, END + 1))
    assert ref.scalars["sharpness/lambda_max"].steps.tolist() == [1, *range(2, END + 1, 2)]

    # TensorBoard as TensorBoard reads it
    read, files = event_steps(run_dir, purge=True)
    assert len(files) == 2  # the killed run's event file and the resumed run's
    twice = {t: sorted({s for s in steps if steps.count(s) > 1}) for t, steps in read.items()}
    tag = "grad_spectrum/frobenius_norm/net.0.weight"
    assert sorted(files[0][tag]) == list(range(1, KILLED_AT + 1))  # the killed run wrote past its checkpoint
    if host == "hf":  # gradwatch's own writer: its session start at step 4 purged the killed run's 4 and 5
        assert not any(twice.values()), {t: s for t, s in twice.items() if s}
    else:  # the host's writer (Lightning's logger) keeps both; gradwatch's reader takes the resumed run's
        assert set().union(*map(set, twice.values())) <= set(range(CHECKPOINT + 1, KILLED_AT + 1))
        assert twice[tag] == list(range(CHECKPOINT + 1, KILLED_AT + 1))
        assert run.scalars[tag].values[CHECKPOINT:KILLED_AT].tolist() == [files[1][tag][s] for s in twice[tag]]
        assert files[0][tag][KILLED_AT] != files[1][tag][KILLED_AT]  # Lightning restarts the epoch: other batches

    assert main(["report", str(run_dir), "-o", str(tmp_path / "report")]) == 0
    assert main(["compare", str(reference), str(run_dir), "-o", str(tmp_path / "compare")]) == 0
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "compare" / "index.html").is_file()
