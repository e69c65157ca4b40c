"""The ``gradwatch`` command: ``run`` launches unmodified scripts (argv, exit code, tracebacks, knobs from
options and the environment, ``torchrun``), every command has ``--help``, and bad input gets a clear message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from gradwatch import cli
from gradwatch.integrations import env_knobs

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.fixture
def knob_module() -> ModuleType:
    import gradwatch.knobs

    return gradwatch.knobs


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``run`` in-process changes sys.argv, sys.path[0] and os.environ as a launcher must: undo that."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = dict(os.environ)
    for var in [v for v in os.environ if v.startswith(env_knobs.ENV_PREFIX)]:
        del os.environ[var]
    yield
    os.environ.clear()
    os.environ.update(saved)


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


REPORTER = """
    import json, os, sys
    report = json.dumps({"argv": sys.argv, "name": __name__, "file": __file__,
                         "env": {k: v for k, v in os.environ.items() if k.startswith("GRADWATCH_")},
                         "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
                         "marker": os.environ.get("MARKER")})
    if "REPORT_DIR" in os.environ:  # one file per process: ranks' stdout lines can interleave
        with open(os.path.join(os.environ["REPORT_DIR"], f"report_{os.environ.get('RANK')}.json"), "w") as f:
            f.write(report)
    print("REPORT " + report)
    if "EXIT_CODE" in os.environ:
        sys.exit(int(os.environ["EXIT_CODE"]))
"""


def reports(text: str) -> list[dict]:
    return [json.loads(line[len("REPORT "):]) for line in text.splitlines() if line.startswith("REPORT ")]


def run_module(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m gradwatch ARGS`` in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(env_knobs.ENV_PREFIX)}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


# --- run: the script's own argv, exit code and traceback ------------------------------------------------------


def test_run_passes_argv_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = write_script(tmp_path / "train.py", REPORTER)
    os.environ["EXIT_CODE"] = "3"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(script), "--lr", "0.1", "--", "-h", "--help", "x"])
    assert exit_info.value.code == 3
    (seen,) = reports(capsys.readouterr().out)
    assert seen["argv"] == [str(script), "--lr", "0.1", "--", "-h", "--help", "x"]
    assert seen["name"] == "__main__" and seen["file"] == str(script)
    assert sys.path[0] == str(tmp_path)  # imports look beside the script first, as `python train.py` does


def test_run_returns_zero_and_separates_launcher_options(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         knob_module: ModuleType) -> None:
    script = write_script(tmp_path / "train.py", REPORTER)
    assert cli.main(["run", "--spectra-every", "7", "--", str(script), "--spectra-every", "9"]) == 0
    (seen,) = reports(capsys.readouterr().out)
    assert seen["argv"] == [str(script), "--spectra-every", "9"]  # the script's own flag is the script's
    assert seen["env"]["GRADWATCH_SPECTRA_EVERY"] == "7"


def test_run_as_a_process(tmp_path: Path) -> None:
    """``python -m gradwatch run``: the script's exit code, its imports beside it, and its traceback."""
    (tmp_path / "scripts").mkdir()
    write_script(tmp_path / "scripts" / "helper.py", "VALUE = 41\n")
    script = write_script(tmp_path / "scripts" / "train.py", """
        import sys
        import helper

        def step():
            raise RuntimeError("boom from the script")

        print("helper", helper.VALUE + 1, sys.argv[1:])
        if sys.argv[1:] == ["--exit", "3"]:
            sys.exit(3)
        step()
    """)
    proc = run_module(["run", "scripts/train.py", "--exit", "3"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "helper 42 ['--exit', '3']" in proc.stdout and proc.stderr == ""
    proc = run_module(["run", "scripts/train.py"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert f'File "{script.relative_to(tmp_path)}", line 6, in step' in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: boom from the script")


def test_run_a_module(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    write_script(tmp_path / "mytrain.py", REPORTER)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "-m", "mytrain", "--x", "1"]) == 0
    (seen,) = reports(capsys.readouterr().out)
    assert seen["argv"] == [str(tmp_path / "mytrain.py"), "--x", "1"] and seen["name"] == "__main__"


def test_run_missing_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["run", str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["run", "-m", "no_such_module_here.train"]) == 2
    assert "no module named 'no_such_module_here.train'" in capsys.readouterr().err
    assert cli.main(["run"]) == 2
    assert "expected a training script" in capsys.readouterr().err


def test_run_registers_report_to(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    script = write_script(tmp_path / "train.py", """
        from transformers.integrations import integration_utils
        print("REGISTERED", "gradwatch" in integration_utils.INTEGRATION_TO_CALLBACK)
    """)
    assert cli.main(["run", str(script)]) == 0
    assert "REGISTERED True" in capsys.readouterr().out


@pytest.mark.slow
def test_run_under_torchrun(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    write_script(tmp_path / "train.py", REPORTER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(env_knobs.ENV_PREFIX)}
    # No GRADWATCH_* variable: each worker would load the knobs to check it (seconds per process on 2 cores);
    # that path is the in-process tests'. Here: argv, ranks and the exit status through torchrun.
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MARKER="from-the-launcher", REPORT_DIR=str(tmp_path))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "0", "-m", "gradwatch", "run",
                           "train.py", "--per_device_train_batch_size", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report_*.json"))]
    assert sorted(s["rank"] for s in seen) == ["0", "1"] and {s["world"] for s in seen} == {"2"}
    for s in seen:
        assert s["argv"] == ["train.py", "--per_device_train_batch_size", "2"]
        assert s["marker"] == "from-the-launcher"


# --- knobs: precedence and bad values --------------------------------------------------------------------------


def test_knob_options_are_generated_from_the_knobs(knob_module: ModuleType) -> None:
    flags = {a.option_strings[0] for a in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions
             if a.option_strings}
    for knob in knob_module.knobs():
        assert env_knobs.option_flag(knob.name) in flags
    assert env_knobs.option_flag("spectra_every") == "--spectra-every"
    assert env_knobs.env_var("spectra_every") == "GRADWATCH_SPECTRA_EVERY"


@pytest.mark.parametrize("env, option, expected", [
    (None, None, None),  # nothing set: the variable stays unset and the default applies
    ("10", None, "10"),  # the environment
    ("10", "7", "7"),  # the launcher option beats the environment
    (None, "7", "7"),
])
def test_precedence_option_over_environment(tmp_path: Path, capsys: pytest.CaptureFixture, knob_module: ModuleType,
                                            env: str | None, option: str | None, expected: str | None) -> None:
    script = write_script(tmp_path / "train.py", REPORTER)
    if env is not None:
        os.environ["GRADWATCH_SPECTRA_EVERY"] = env
    assert cli.main(["run", *(["--spectra-every", option] if option else []), str(script)]) == 0
    (seen,) = reports(capsys.readouterr().out)
    assert seen["env"].get("GRADWATCH_SPECTRA_EVERY") == expected


def test_resolve_explicit_over_environment(knob_module: ModuleType) -> None:
    environ = {"GRADWATCH_SPECTRA_EVERY": "7", "GRADWATCH_MAX_OVERHEAD": "0.2"}
    assert env_knobs.resolve_knob_values({"spectra_every": 3}, environ) == {"spectra_every": 3, "max_overhead": 0.2}
    assert env_knobs.resolve_knob_values({}, {}) == {}


@pytest.mark.parametrize("args, env, needles", [
    (["--spectra-every", "abc"], {}, ["--spectra-every='abc'", "an integer"]),
    (["--spectra-every", "2.5"], {}, ["--spectra-every='2.5'", "an integer"]),
    (["--max-overhead", "lots"], {}, ["--max-overhead='lots'", "a number"]),
    ([], {"GRADWATCH_SPECTRA_EVERY": "ten"}, ["GRADWATCH_SPECTRA_EVERY='ten'", "an integer"]),
    (["--spectra-every", "-3"], {}, ["--spectra-every=-3", "spectra_every"]),  # rejected by config_from_knobs
    ([], {"GRADWATCH_ON_ERROR": "explode"}, ["GRADWATCH_ON_ERROR='explode'", "on_error", "warn"]),
])
def test_bad_knob_values_fail_at_start_up(tmp_path: Path, capsys: pytest.CaptureFixture, knob_module: ModuleType,
                                          args: list[str], env: dict[str, str], needles: list[str]) -> None:
    script = write_script(tmp_path / "train.py", "open(__file__ + '.ran', 'w').close()\n")
    os.environ.update(env)
    assert cli.main(["run", *args, str(script)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err and not (tmp_path / "train.py.ran").exists()  # the script never started


def test_unknown_environment_variable_warns(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            knob_module: ModuleType) -> None:
    script = write_script(tmp_path / "train.py", "pass\n")
    os.environ["GRADWATCH_SPECTRA_EVRY"] = "5"
    assert cli.main(["run", str(script)]) == 0
    err = capsys.readouterr().err
    assert "GRADWATCH_SPECTRA_EVRY is not a gradwatch knob" in err and "GRADWATCH_SPECTRA_EVERY" in err


def test_parse_knob_text_by_type() -> None:
    from dataclasses import dataclass

    @dataclass
    class K:
        name: str
        type: type
        default: object = None
        help: str = "h"

    flag = K("flag", bool)
    assert [env_knobs.parse_knob_text(flag, t, "X") for t in ("1", "True", " yes ", "off", "0")] == \
        [True, True, True, False, False]
    with pytest.raises(env_knobs.KnobValueError, match=r"X='maybe' is not valid: expected a boolean \(1/0, true/false"):
        env_knobs.parse_knob_text(flag, "maybe", "X")
    assert env_knobs.parse_knob_text(K("n", int), " 12 ", "X") == 12
    assert env_knobs.parse_knob_text(K("f", float), "1e-2", "X") == 0.01
    with pytest.raises(env_knobs.KnobValueError, match="expected a number"):
        env_knobs.parse_knob_text(K("f", float), "inf", "X")
    assert env_knobs.parse_knob_text(K("s", str), "*attn*,*mlp*", "X") == "*attn*,*mlp*"
    assert env_knobs.knob_text(flag, True) == "true"
    values, sources = env_knobs.knob_values_from_env({"GRADWATCH_FLAG": "on", "GRADWATCH_N": ""},
                                                     [flag, K("n", int)])
    assert values == {"flag": True} and sources == {"flag": "GRADWATCH_FLAG"}  # empty counts as unset


def test_split_run_argv() -> None:
    assert cli.split_run_argv(["--a", "1", "--b=2", "t.py", "--a", "3"]) == (["--a", "1", "--b=2"], "t.py",
                                                                            ["--a", "3"])
    assert cli.split_run_argv(["--", "t.py", "--", "x"]) == ([], "t.py", ["--", "x"])
    assert cli.split_run_argv(["-m", "pkg.mod", "-h"]) == (["-m", "pkg.mod"], None, ["-h"])
    assert cli.split_run_argv(["-h"]) == (["-h"], None, [])


# --- help and entry points --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"], ["report"], ["compare"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture, knob_module: ModuleType) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gradwatch")
    if command == ["run"]:
        assert "--spectra-every N" in out and "GRADWATCH_SPECTRA_EVERY" in out and "Precedence" in out
        assert "torchrun --nproc_per_node 2 -m gradwatch run" in out
    if command == ["compare"]:
        assert "|a_l - b_l| / |a_l|" in out
    if not command:
        assert all(name in out for name in ("run", "report", "compare"))


def test_help_after_the_script_is_the_scripts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = write_script(tmp_path / "train.py", REPORTER)
    assert cli.main(["run", str(script), "--help"]) == 0
    assert reports(capsys.readouterr().out)[0]["argv"] == [str(script), "--help"]


def test_python_dash_m_and_console_script(tmp_path: Path) -> None:
    proc = run_module(["--help"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gradwatch")
    proc = run_module(["report", str(tmp_path)], cwd=tmp_path)  # nothing of gradwatch's: a message, no traceback
    assert proc.returncode == 2 and "no gradwatch data" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module(["frobnicate"], cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\ngradwatch = "gradwatch.cli:main"' in pyproject
    executable = shutil.which("gradwatch") or str(Path(sys.executable).with_name("gradwatch"))
    if os.path.exists(executable):  # installed (pip install -e .): the console script is the same command
        proc = subprocess.run([executable, "compare", "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: gradwatch compare")


def test_every_minus_one_is_the_familys_own_default_cadence() -> None:
    from gradwatch.config import Cadence
    from gradwatch.knobs import config_from_knobs, knobs

    config = config_from_knobs({"signals_every": -1, "signals_window": 7, "stability_every": -1})
    assert config.signals.every == Cadence.within_budget(minimum=10) and config.signals.window == 7
    assert config.stability.every == Cadence.every(10)  # the default StabilityConfig's
    assert config_from_knobs({"signals_every": 25}).signals.every == Cadence.every(25)
    assert "-1: its default cadence, Cadence.within_budget(minimum=10)" in \
        next(k for k in knobs() if k.name == "signals_every").help
    with pytest.raises(ValueError, match="an int >= -1"):
        config_from_knobs({"signals_every": -2})
