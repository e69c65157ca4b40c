"""Reading the examples to score: JSONL files and ``datasets`` folders, in the formats post-training data uses.

One example is a prompt and a response; the loss is taken on the response only. Accepted records:

- instruction + response: ``{"instruction": ..., "response": ...}``; the aliases ``prompt``/``question`` for the
  instruction and ``output``/``completion``/``answer`` for the response are read too, and an Alpaca-style
  ``input`` is appended to the instruction after a blank line;
- chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}``: the
  last assistant turn is the response, every turn before it is the prompt (``conversations`` with
  ``from``/``value`` keys, as ShareGPT writes them, is read the same way).

A record that does not parse raises one :class:`ValueError` naming the file and the line (or row) and saying
what was expected; nothing is scored before the whole dataset has been read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwatch.integrations.jsonl import iter_records

INSTRUCTION_KEYS = ("instruction", "prompt", "question")
RESPONSE_KEYS = ("response", "output", "completion", "answer")
ID_KEYS = ("id", "uid", "example_id")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

EXPECTED = ("expected an object with 'instruction' and 'response' (or prompt/question and output/completion/answer) "
            "strings, or 'messages': a list of {'role', 'content'} turns ending with an assistant turn")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One example to score.

    Attributes:
        index: its position in the dataset (0-based); identifies it in the output and on resume.
        id: the record's own id field when it has one, else ``None``.
        prompt: the turns before the response (one user turn for instruction + response records).
        response: the text the loss is taken on.
    """

    index: int
    id: str | None
    prompt: tuple[Message, ...]
    response: str

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text (the turns' contents, one per paragraph)."""
        return "\n\n".join(m.content for m in self.prompt)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _from_messages(turns: Any, where: str, role_key: str, content_key: str) -> tuple[tuple[Message, ...], str]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: '{'messages' if role_key == 'role' else 'conversations'}' must be a non-empty list "
                         f"of turns; {EXPECTED}")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            raise ValueError(f"{where}: turn {k} is not a {{'{role_key}': str, '{content_key}': str}} object; {EXPECTED}")
        role = _ROLE_ALIASES.get(turn[role_key], turn[role_key])
        messages.append(Message(role, turn[content_key]))
    last = max((k for k, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{where}: the conversation has no assistant turn to take the loss on; {EXPECTED}")
    if not messages[last].content.strip():
        raise ValueError(f"{where}: the last assistant turn is empty; {EXPECTED}")
    return tuple(messages[:last]), messages[last].content


def parse_record(record: Any, index: int, where: str) -> Example:
    """One record (a decoded JSON object or a dataset row) as an :class:`Example`.

    Raises:
        ValueError: the record has none of the accepted layouts; the message starts with ``where``.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: got a JSON {type(record).__name__}, not an object; {EXPECTED}")
    ident = next((str(record[k]) for k in ID_KEYS if record.get(k) is not None), None)
    if record.get("messages") is not None:
        prompt, response = _from_messages(record["messages"], where, "role", "content")
        return Example(index, ident, prompt, response)
    if record.get("conversations") is not None:
        prompt, response = _from_messages(record["conversations"], where, "from", "value")
        return Example(index, ident, prompt, response)
    instruction = next((record[k] for k in INSTRUCTION_KEYS if k in record), None)
    response = next((record[k] for k in RESPONSE_KEYS if k in record), None)
    if _text(instruction) is None or _text(response) is None:
        keys = ", ".join(sorted(map(str, record))) or "none"
        bad = [k for k in (*INSTRUCTION_KEYS, *RESPONSE_KEYS) if k in record and not isinstance(record[k], str)]
        detail = f"'{bad[0]}' is a {type(record[bad[0]]).__name__}, not a string" if bad else f"found keys: {keys}"
        raise ValueError(f"{where}: {detail}; {EXPECTED}")
    if not response.strip():
        raise ValueError(f"{where}: the response is empty; {EXPECTED}")
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    return Example(index, ident, (Message("user", instruction),), response)


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file, one record a line (blank lines skipped; a line that does not parse, a
    torn last one included, raises naming it: :func:`gradwatch.integrations.jsonl.iter_records`)."""
    path = Path(path)
    out: list[Example] = []
    records = iter_records(path, strict=True, torn_last="raise")
    try:
        for number, record in records:
            if limit is not None and len(out) >= limit:
                break
            out.append(parse_record(record, len(out), f"{path} line {number}"))
    except ValueError as error:
        if str(error).startswith(f"{path} line") and "not valid JSON" in str(error):
            raise ValueError(f"{error}; {EXPECTED}") from None
        raise
    finally:
        records.close()
    if not out:
        raise ValueError(f"{path}: no examples (the file is empty); {EXPECTED}")
    return out


def _rows(dataset: Any) -> Iterator[Mapping[str, Any]]:
    for i in range(len(dataset)):
        yield dataset[i]


def read_dataset_folder(path: str | os.PathLike, split: str | None = None, limit: int | None = None) -> list[Example]:
    """The examples of a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict and a split)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a folder, read as a `datasets` save_to_disk folder, which needs the datasets "
                         f"package: pip install datasets (or give a JSONL file)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError or its own errors for a folder it did not write
        raise ValueError(f"{path}: not a `datasets` save_to_disk folder ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if "train" not in loaded and len(splits) != 1:
                raise ValueError(f"{path} holds the splits {splits}; choose one with --split")
            split = "train" if "train" in loaded else splits[0]
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r}; its splits are {splits}")
        loaded = loaded[split]
    elif split is not None and split != "train":
        raise ValueError(f"{path} is a single Dataset, not a DatasetDict: --split {split!r} does not apply")
    out: list[Example] = []
    for number, row in enumerate(_rows(loaded)):
        if limit is not None and len(out) >= limit:
            break
        out.append(parse_record(row, len(out), f"{path} row {number}"))
    if not out:
        raise ValueError(f"{path}: no examples (the dataset is empty); {EXPECTED}")
    return out


def load_examples(path: str | os.PathLike, split: str | None = None, limit: int | None = None) -> list[Example]:
    """The examples of ``path``: a JSONL file, or a ``datasets`` save_to_disk folder.

    Raises:
        ValueError: the path does not exist, or a record does not parse (the message names its line or row).
    """
    p = Path(path)
    if p.is_dir():
        return read_dataset_folder(p, split, limit)
    if not p.is_file():
        raise ValueError(f"{path}: no such file or folder (expected a JSONL file or a `datasets` save_to_disk folder)")
    if split is not None:
        raise ValueError(f"--split applies to a `datasets` folder, not to the file {path}")
    return read_jsonl(p, limit)


def write_jsonl(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write records one a line (a helper for tests and examples that build datasets)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
