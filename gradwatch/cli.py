"""The ``gradwatch`` command: ``run`` (launch an unmodified training script), ``report``, ``compare``.

::

    gradwatch run [--spectra-every N ...] train.py ARGS...     # or: python -m gradwatch run ...
    torchrun --nproc_per_node 2 -m gradwatch run train.py ARGS...
    gradwatch report RUN_DIR [-o OUT]
    gradwatch compare RUN_A RUN_B [-o OUT]
    gradwatch score-data MODEL DATASET [-o OUT]                # per-example gradient spectra of a dataset
    gradwatch compare SCORES_A SCORES_B                        # RD per layer group of two scorings

``run`` sets every knob given as ``GRADWATCH_<NAME>`` in the environment (read by gradwatch in this process
and every process it starts) after checking it, makes ``report_to="gradwatch"`` known to transformers, and
runs the script as ``__main__`` with its own ``sys.argv``: its exit code and tracebacks are its own.
The reading of run directories and the drawing are in :mod:`gradwatch.integrations.report`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import runpy
import sys
import textwrap
import zipfile
from collections.abc import Sequence
from typing import Any

PROG = "gradwatch"

PRECEDENCE = ("Precedence, highest first (gradwatch.resolve): the script's own GradWatch(...) keywords or "
              "WatchConfig > its gradwatch_* TrainingArguments fields or --gradwatch_* flags > these options > "
              "GRADWATCH_<NAME> environment variables > defaults. They reach callbacks=[GradWatch()] in Lightning "
              "and the HF Trainer, LightningCLI and report_to=\"gradwatch\" alike.")


def _metavar(knob: Any) -> str:
    choices = getattr(knob, "choices", None)
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {int: "N", float: "X", bool: "{true,false}"}.get(getattr(knob, "type", str), "TEXT")


def build_parser(knob_list: Sequence[Any] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``gradwatch`` command (``run``'s options come from the knobs)."""
    from gradwatch.integrations.env_knobs import all_knobs, env_var, knob_text, option_flag

    knob_list = all_knobs() if knob_list is None else knob_list
    parser = argparse.ArgumentParser(
        prog=PROG, description="gradwatch: training-dynamics diagnostics for PyTorch Lightning and the "
                               "Hugging Face Trainer, in TensorBoard.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run", help="run an unmodified training script with gradwatch available",
        usage=f"{PROG} run [-h] [KNOB OPTIONS] (SCRIPT | -m MODULE) [ARGS ...]",
        description=textwrap.fill(
            "Run a training script unchanged, as `python SCRIPT ARGS` would, after importing gradwatch and "
            "registering report_to=\"gradwatch\" for the Hugging Face Trainer. Each option below is checked and "
            "set as the environment variable GRADWATCH_<NAME>, which gradwatch reads in this process and in every "
            "process the script starts. " + PRECEDENCE, width=100),
        epilog="positional arguments:\n"
               "  SCRIPT        the training script (a .py file), run as __main__\n"
               "  ARGS          the script's own arguments, passed unchanged (--help and -- included)\n\n"
               f"examples:\n  {PROG} run --spectra-every 10 train.py --report_to gradwatch --output_dir out\n"
               f"  GRADWATCH_SPECTRA_EVERY=10 {PROG} run train.py ...\n"
               f"  torchrun --nproc_per_node 2 -m gradwatch run train.py ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = run.add_argument_group("knob options")
    for knob in knob_list:
        group.add_argument(option_flag(knob.name), dest=f"knob_{knob.name}", metavar=_metavar(knob), default=None,
                           help=f"{knob.help} (env {env_var(knob.name)}; "
                                f"default: {knob_text(knob, knob.default) or repr('')})")
    run.add_argument("-m", dest="module", metavar="MODULE", default=None,
                     help="run a module as `python -m MODULE` does, instead of a script")
    run.set_defaults(handler=_cmd_run, knob_list=knob_list, script=None, args=[])

    report = commands.add_parser(
        "report", help="write a static HTML report of a run",
        description="Write a static HTML page (index.html and PNG figures) from a run directory's "
                    "TensorBoard event files and its signals.jsonl / alerts.jsonl: layer-by-step heatmaps "
                    "per statistic and layer family, sharpness against its threshold, opposing-signal pairs, "
                    "stability signals, alerts and overhead. Sections the run has no data for are left out.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the directory the trainer logged to")
    report.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="output directory (default: RUN_DIR/gradwatch-report)")
    report.set_defaults(handler=_cmd_report)

    compare = commands.add_parser(
        "compare", help="compare two runs' per-layer statistics",
        description="Compare two runs by per-layer gradient-spectrum statistics. For each statistic and layer "
                    "family: a_l and b_l are layer l's statistic averaged over all logged steps of run A and "
                    "run B, and RD = mean over layers l of |a_l - b_l| / |a_l| (over layers logged in both "
                    "runs with finite averages and a_l != 0). Prints a table and writes an HTML page of both "
                    "runs' per-layer curves. Given two `gradwatch score-data` output directories instead (two "
                    "datasets scored on one model), prints the same RD per layer group (q, k, v, o, mlp, depth "
                    "thirds) with both datasets' means.")
    compare.add_argument("run_a", metavar="RUN_A", help="the reference run (RD is relative to it); or a "
                                                        "`score-data` output directory, compared by layer group")
    compare.add_argument("run_b", metavar="RUN_B")
    compare.add_argument("-o", "--out", metavar="OUT", default=None,
                         help="output directory (default: ./gradwatch-compare)")
    compare.set_defaults(handler=_cmd_compare)
    from gradwatch.scoring.cli import add_score_data_parser

    add_score_data_parser(commands)
    return parser


def split_run_argv(tokens: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """Split ``run``'s arguments into the launcher's options (``-m MODULE`` included), the script, and the
    script's own arguments, which are passed on verbatim (``--`` and ``--help`` included)."""
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            return tokens[:i], (tokens[i + 1] if i + 1 < len(tokens) else None), tokens[i + 2:]
        if token in ("-h", "--help") or (token.startswith("--") and "=" in token):
            i += 1
        elif token == "-m":
            return tokens[:i + 2], None, tokens[i + 2:]
        elif token.startswith("-"):
            i += 2  # every launcher option takes one value
        else:
            return tokens[:i], token, tokens[i + 1:]
    return tokens, None, []


def _error(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def ensure_report_to() -> None:
    """``import gradwatch``, which makes ``report_to="gradwatch"`` known to transformers as soon as transformers
    loads its integration table (scripts that never import transformers do not pay for it); the hook is
    installed again here in case anything removed it."""
    import gradwatch  # noqa: F401

    for module_name in ("gradwatch._report_to", "gradwatch.integrations"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        install = getattr(module, "install_report_to_hook", None)
        if install is not None:
            install()
            return


def _set_path_head(directory: str) -> None:
    """Make ``directory`` the first place imports look, replacing the launcher's own entry (the directory of
    the ``gradwatch`` executable, or the working directory under ``python -m gradwatch``)."""
    if sys.path:
        sys.path[0] = directory
    else:
        sys.path.insert(0, directory)


def _cmd_run(ns: argparse.Namespace) -> int:
    from gradwatch.integrations.env_knobs import (
        _WARNED,
        KnobValueError,
        check_knob_values,
        env_var,
        knob_text,
        knob_values_from_env,
        option_flag,
        parse_knob_text,
        unknown_env_message,
        unknown_env_vars,
    )

    if ns.module is None and ns.script is None:
        return _error(f"{PROG} run: expected a training script (or -m MODULE); see `{PROG} run --help`")
    knob_list = ns.knob_list
    try:
        values, sources = knob_values_from_env(os.environ, knob_list) if knob_list else ({}, {})
        given: dict[str, str] = {}
        for knob in knob_list:
            text = getattr(ns, f"knob_{knob.name}")
            if text is not None:
                values[knob.name] = parse_knob_text(knob, text, option_flag(knob.name))
                sources[knob.name] = option_flag(knob.name)
                given[env_var(knob.name)] = knob_text(knob, values[knob.name])
        if values:
            check_knob_values(values, sources)
    except KnobValueError as error:
        return _error(f"{PROG} run: {str(error).removeprefix('gradwatch: ')}")
    if knob_list:
        unknown = unknown_env_vars(os.environ, knob_list)
        if unknown:  # one warning, each with the closest knob; the script's gradwatch does not repeat it
            print(f"{PROG} run: warning: {unknown_env_message(unknown, knob_list).removeprefix('gradwatch: ')}",
                  file=sys.stderr)
            _WARNED.update(unknown)
    os.environ.update(given)  # launcher options beat the environment, here and in every child process
    ensure_report_to()

    if ns.module is not None:
        _set_path_head(os.getcwd())  # `python -m` looks in the working directory first
        try:
            found = importlib.util.find_spec(ns.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return _error(f"{PROG} run: no module named {ns.module!r}")
        sys.argv = [ns.module, *ns.args]  # runpy sets argv[0] to the module's file, as `python -m` does
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        _close_process_group()
        return 0
    script = ns.script
    if not os.path.exists(script):
        return _error(f"{PROG} run: can't open file {script!r}: no such file")
    sys.argv = [script, *ns.args]
    if os.path.isfile(script) and not zipfile.is_zipfile(script):
        _set_path_head(os.path.dirname(os.path.abspath(script)))  # `python script.py` looks beside it first
    # (a directory or zip with __main__.py: run_path puts it first on sys.path itself, as python does)
    runpy.run_path(script, run_name="__main__")
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """After a script that finished normally: destroy the default process group it left behind, as torch
    asks every program to. Scripts run under torchrun (the HF Trainer's among them) often exit with it alive,
    and then gloo's worker threads can abort the process at interpreter shutdown (``terminate called without
    an active exception``, exit code -6; pytorch/pytorch#179291): seen once in four runs of
    ``tests/test_launcher_e2e.py::test_unmodified_script_under_torchrun``. Not after an exception, when other
    ranks may still be inside a collective (destroying would hang them)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _needs_matplotlib(command: str) -> int | None:
    from gradwatch.integrations.figures import matplotlib_available

    if matplotlib_available():
        return None
    return _error(f"{PROG} {command}: the figures need matplotlib, which is not installed: "
                  f"pip install 'gradwatch[report]' (or pip install matplotlib)")


def _cmd_report(ns: argparse.Namespace) -> int:
    from gradwatch.integrations import report

    if (code := _needs_matplotlib("report")) is not None:
        return code
    try:
        run = report.load_run(ns.run_dir)
        out = ns.out if ns.out is not None else os.path.join(ns.run_dir, "gradwatch-report")
        index = report.write_report(run, out)
    except report.RunDirError as error:
        return _error(f"{PROG} report: {error}")
    except OSError as error:  # an output directory that cannot be written, an unreadable file
        return _error(f"{PROG} report: {error}")
    print(f"{PROG} report: wrote {index}")
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from gradwatch.scoring.cli import compare_scorings_command
    from gradwatch.scoring.compare import is_scoring

    if is_scoring(ns.run_a) or is_scoring(ns.run_b):  # two `score-data` outputs: RD per layer group
        return compare_scorings_command(ns)
    from gradwatch.integrations import report

    if (code := _needs_matplotlib("compare")) is not None:
        return code
    try:
        run_a, run_b = report.load_run(ns.run_a), report.load_run(ns.run_b)
        comparisons = report.compare_runs(run_a, run_b)
        index = report.write_comparison(run_a, run_b, comparisons, ns.out or "gradwatch-compare")
    except report.RunDirError as error:
        return _error(f"{PROG} compare: {error}")
    except OSError as error:  # an output directory that cannot be written, an unreadable file
        return _error(f"{PROG} compare: {error}")
    print(report.format_comparison_table(comparisons))
    print(f"\n{PROG} compare: wrote {index}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradwatch`` and ``python -m gradwatch``; returns the exit code.

    ``run`` returns 0 when the script finishes; the script's ``sys.exit(n)`` and its exceptions pass through
    unchanged (so the process exits as the script would have).
    """
    from gradwatch.integrations.env_knobs import ENV_PREFIX

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        options, script, script_args = split_run_argv(argv[1:])
        # The knobs (and the families behind them) are loaded only when there is something to check or show.
        needed = bool(options) or any(v.startswith(ENV_PREFIX) for v in os.environ)
        ns = build_parser(None if needed else []).parse_args(["run", *options])
        ns.script, ns.args = script, script_args
    else:
        ns = build_parser([]).parse_args(argv)  # other commands and the top-level help need no knobs
    return ns.handler(ns)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
