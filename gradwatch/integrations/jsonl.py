"""JSONL files: the sink writing records (``signals.jsonl``, ...) and alerts (``alerts.jsonl``), one JSON object
per line, in the run directory; and :func:`iter_records`, the one reader every JSONL reader of gradwatch goes
through (``gradwatch report`` and ``compare``, ``score-data``'s resume and its dataset).

A run killed mid-write (``kill -9``) can leave a torn last line: readers skip it with one warning naming the
file and the line, and the sink cuts it off before it appends again."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # annotations only: the readers import without torch
    from gradwatch.engine.sinks import Emission
    from gradwatch.metrics.base import Chart


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and numpy values as Python numbers or lists, non-finite floats as null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def iter_records(path: str | os.PathLike, *, strict: bool = False,
                 torn_last: str = "skip") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every line of ``path`` that parses as JSON (blank lines skipped).

    A line that does not parse raises ``ValueError`` naming the file and the line with ``strict``; else it is
    skipped, and one warning (after the last line) names the file and the lines skipped. The last line when
    torn (no newline at the end, and it does not parse: a write cut short) is skipped, with that warning,
    even with ``strict``, unless ``torn_last="raise"`` (then it is a bad line like any other)."""
    if torn_last not in ("skip", "raise"):
        raise ValueError(f"gradwatch: iter_records expected torn_last 'skip' or 'raise', got {torn_last!r}")
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    torn_at = len(lines) if lines[-1].strip() else None  # the last line has no newline after it
    skipped: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            torn = number == torn_at
            if strict and not (torn and torn_last == "skip"):
                why = (f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError)
                       else "not UTF-8")
                raise ValueError(f"{path} line {number}: not valid JSON ({why})") from None
            skipped.append(f"{number} (torn: the file ends mid-line)" if torn else str(number))
            continue
        yield number, value
    if skipped:
        warnings.warn(f"gradwatch: {path}: skipped line {', '.join(skipped)}, which does not parse as JSON (a "
                      f"write cut short, as a killed run leaves it)", RuntimeWarning, stacklevel=2)


def read_records(path: str | os.PathLike, *, strict: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line, through :func:`iter_records` (a torn last line skipped
    with a warning; other lines that do not parse, or are not objects, too, or with ``strict`` they raise)."""
    out = []
    for number, value in iter_records(path, strict=strict):
        if isinstance(value, dict):
            out.append(value)
        elif strict:
            raise ValueError(f"{path} line {number}: a JSON {type(value).__name__}, expected an object")
        else:
            warnings.warn(f"gradwatch: {path}: skipped line {number}, a JSON {type(value).__name__}, not an "
                          f"object", RuntimeWarning, stacklevel=2)
    return out


_TORN = object()  # a line that does not parse


def _step_of(line: bytes) -> Any:
    """The ``step`` of a JSONL row: an int, None (no integer step), or ``_TORN`` (the line does not parse)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _TORN
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def cut_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a torn last line (no newline after it, and it does not parse: a write cut short) from ``path``
    (one that parses gets its newline); whether there was one."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        if _step_of(data[start:]) is _TORN:
            f.truncate(start)
            return True
        f.write(b"\n")
    return False


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Rewrite ``path`` without its rows past ``step`` and without lines that do not parse, so that a run
    resumed at ``step`` continues it as one clean series; how many lines went. A file with a row that has no
    integer ``step`` is not one of gradwatch's step-keyed files and is left alone (0)."""
    data = Path(path).read_bytes()
    lines = [line for line in data.split(b"\n") if line.strip()]
    steps = [_step_of(line) for line in lines]
    if any(s is None for s in steps):
        return 0
    kept = [line for line, s in zip(lines, steps) if s is not _TORN and s <= step]
    if len(kept) == len(lines) and (not data or data.endswith(b"\n")):
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


class JsonlSink:
    """Writes ``<stem>.jsonl`` files under ``run_dir``.

    Resumed at step ``s`` (:meth:`resume`, before the first write) into a run directory that already holds
    its files, it continues them as one clean series: rows past ``s`` that the interrupted run wrote after
    its checkpoint are dropped, so the resumed run's rows replace them, and a torn last line is cut. A plain
    reopen (no resume) appends, after cutting a torn last line."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._files: dict[str, TextIO] = {}

    def _file(self, stem: str) -> TextIO:
        if stem not in self._files:
            os.makedirs(self.run_dir, exist_ok=True)
            path = self.path(stem)
            if os.path.isfile(path):
                cut_torn_tail(path)  # else the first new row would be glued onto the fragment
            self._files[stem] = open(path, "a", encoding="utf-8")
        return self._files[stem]

    def resume(self, step: int) -> None:
        """The run resumes at ``step``: drop the rows past it from this run directory's JSONL files."""
        if not os.path.isdir(self.run_dir):
            return
        for name in sorted(os.listdir(self.run_dir)):
            if name.endswith(".jsonl") and name[:-len(".jsonl")] not in self._files:
                drop_rows_after(os.path.join(self.run_dir, name), step)

    def path(self, stem: str) -> str:
        return os.path.join(self.run_dir, f"{stem}.jsonl")

    def open(self, charts: Sequence[Chart]) -> None:
        pass

    def write(self, step: int, emission: Emission) -> None:
        for stem, rows in emission.records.items():
            f = self._file(stem)
            for row in rows:
                f.write(json.dumps(_plain(row)) + "\n")
        if emission.alerts:
            f = self._file("alerts")
            for alert in emission.alerts:
                f.write(json.dumps(_plain(alert.as_record())) + "\n")

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
