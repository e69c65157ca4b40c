"""Reading TensorBoard event files back."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable


def event_files(root: str | os.PathLike) -> list[str]:
    return sorted(glob.glob(os.path.join(str(root), "**", "events.out.tfevents.*"), recursive=True))


def read_series(root: str | os.PathLike, prefixes: Iterable[str] = ("",)) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in every event file under ``root`` whose tag starts with one of
    ``prefixes``. A (tag, step) written twice, in one file or across the files of a resumed run, fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefixes = tuple(prefixes)
    out: dict[str, dict[int, float]] = {}
    for path in event_files(root):
        ea = EventAccumulator(path, size_guidance={"scalars": 0}, purge_orphaned_data=False)
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            if not tag.startswith(prefixes):
                continue
            for event in ea.Scalars(tag):
                series = out.setdefault(tag, {})
                assert event.step not in series, f"{tag} written twice at step {event.step} (under {root})"
                series[event.step] = event.value
    return out


def read_texts(root: str | os.PathLike, tag: str) -> list[tuple[int, str]]:
    """(step, text) of every TensorBoard text entry ``tag`` under ``root`` (``SummaryWriter.add_text`` stores it
    as ``<tag>/text_summary``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in event_files(root):
        ea = EventAccumulator(path, size_guidance={"tensors": 0}, purge_orphaned_data=False)
        ea.Reload()
        for stored in (tag, f"{tag}/text_summary"):
            if stored in ea.Tags()["tensors"]:
                out.extend((e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(stored))
    return sorted(out)
