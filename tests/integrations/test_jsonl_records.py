"""The one JSONL reader (``iter_records`` / ``read_records``) and the JSONL sink's repair on reopen and resume:
a torn last line (half an object, no newline, as ``kill -9`` leaves it) and a torn line in the middle."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from gradwatch.engine.sinks import Emission
from gradwatch.integrations.jsonl import JsonlSink, cut_torn_tail, drop_rows_after, iter_records, read_records
from gradwatch.integrations.report import read_jsonl
from gradwatch.scoring.data import read_jsonl as read_examples
from gradwatch.scoring.score import read_scores


def rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "value": s * 1.5}) + "\n" for s in steps)


def torn_file(tmp_path: Path) -> Path:
    """Rows 1, 2, a torn line 3, rows 4, 5 and a torn last line 6 (half an object, no newline)."""
    path = tmp_path / "signals.jsonl"
    path.write_text(rows(1, 2) + '{"step": 3, "val\n' + rows(4, 5) + '{"step": 6, "value": [1.0, 2')
    return path


def caught(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in seen]


def test_torn_lines_are_skipped_with_one_warning_naming_the_file_and_lines(tmp_path: Path) -> None:
    path = torn_file(tmp_path)
    for reader in (read_records, read_jsonl):
        got, said = caught(reader, path)
        assert [r["step"] for r in got] == [1, 2, 4, 5]
        assert [r["value"] for r in got] == [1.5, 3.0, 6.0, 7.5]
        assert len(said) == 1, said
        assert str(path) in said[0] and "line 3, 6 (torn" in said[0]


def test_strict_raises_on_a_middle_line_but_skips_a_torn_last_one(tmp_path: Path) -> None:
    path = torn_file(tmp_path)
    with pytest.raises(ValueError, match=r"signals.jsonl line 3: not valid JSON"):
        read_records(path, strict=True)
    last_only = tmp_path / "last.jsonl"
    last_only.write_text(rows(1, 2) + '{"step": 3, "va')
    got, said = caught(read_records, last_only, strict=True)
    assert [r["step"] for r in got] == [1, 2] and len(said) == 1 and "line 3 (torn" in said[0]
    with pytest.raises(ValueError, match=r"last.jsonl line 3: not valid JSON"):
        list(iter_records(last_only, strict=True, torn_last="raise"))


def test_a_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(rows(1) + json.dumps({"step": 2}))
    got, said = caught(read_records, path)
    assert [r["step"] for r in got] == [1, 2] and not said


def test_score_data_readers_go_through_it(tmp_path: Path) -> None:
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "lo')
    got, said = caught(read_scores, scores, repair=True)
    assert [r["index"] for r in got] == [0, 1] and scores.read_text() == '{"index": 0}\n{"index": 1}\n'
    scores.write_text('{"index": 0}\n{"ind\n{"index": 1}\n')
    with pytest.raises(ValueError, match=r"scores.jsonl line 2: not valid JSON.*delete it to start over"):
        read_scores(scores)
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "resp')
    with pytest.raises(ValueError, match=r"data.jsonl line 2: not valid JSON"):
        read_examples(data)


def test_cut_torn_tail(tmp_path: Path) -> None:
    path = torn_file(tmp_path)
    assert cut_torn_tail(path) and path.read_text().endswith(rows(5))
    assert not cut_torn_tail(path)
    path.write_text(rows(1) + json.dumps({"step": 2}))  # whole, its newline not yet written: kept
    assert not cut_torn_tail(path) and path.read_text() == rows(1) + json.dumps({"step": 2}) + "\n"


def test_sink_reopened_cuts_the_torn_tail_before_appending(tmp_path: Path) -> None:
    (tmp_path / "signals.jsonl").write_text(rows(1, 2) + '{"step": 3, "val')
    sink = JsonlSink(str(tmp_path))
    sink.write(3, Emission(records={"signals": [{"step": 3, "value": 4.5}]}))
    sink.close()
    got, said = caught(read_records, tmp_path / "signals.jsonl")
    assert [(r["step"], r["value"]) for r in got] == [(1, 1.5), (2, 3.0), (3, 4.5)] and not said


def test_sink_resumed_drops_rows_past_the_checkpoint(tmp_path: Path) -> None:
    """Killed at step 5 after a checkpoint at step 3: rows 4, 5 and the torn 6 give way to the resumed run's."""
    torn_file(tmp_path)
    (tmp_path / "alerts.jsonl").write_text(rows(2, 5))
    (tmp_path / "user.jsonl").write_text('{"note": "not ours"}\n{"step": 9}\n')
    sink = JsonlSink(str(tmp_path))
    sink.resume(3)
    sink.write(4, Emission(records={"signals": [{"step": 4, "value": 40.0}]}))
    sink.close()
    got, said = caught(read_records, tmp_path / "signals.jsonl")
    assert [(r["step"], r["value"]) for r in got] == [(1, 1.5), (2, 3.0), (4, 40.0)] and not said
    assert [r["step"] for r in read_records(tmp_path / "alerts.jsonl")] == [2]
    assert (tmp_path / "user.jsonl").read_text() == '{"note": "not ours"}\n{"step": 9}\n'  # left alone
    assert drop_rows_after(tmp_path / "alerts.jsonl", 3) == 0
