"""Loading user chat data (JSONL / JSON / Parquet) into the built-in suite's schema, failing early and precisely;
and the row helpers every stage shares: `prompt_of` (a row's prompt), `drop_too_long` and `chat_length`.

A malformed row found mid-training costs the run; every row is checked at load time, and the error names the file,
the 1-based row (the line number for JSON lines files) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import datasets

ROLES = ("system", "user", "assistant")
# Columns the built-in tasks carry; user rows get these defaults so both mix in one Dataset.
DEFAULTS = {"task": "user", "answer": "", "harmful": False, "n_pairs": 0}
_TYPES = {"task": str, "answer": str, "harmful": bool, "n_pairs": int}


class DataError(ValueError):
    """A data file that cannot be used; the message names file, row and field."""


def _read_json_lines(path: Path) -> list[tuple[int, object]]:
    text = _read_utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of rows is accepted too
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON array: {e}") from None
    rows = []
    # split at "\n" only: str.splitlines also splits at U+2028, U+0085 and others, which JSON strings may hold
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {lineno}: invalid JSON: {e}") from None
    return rows


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are a DataError naming the row (line), column and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno, column = data.count(b"\n", 0, e.start) + 1, e.start - line_start + 1
        # rows of a JSON lines file are its lines; in a JSON array only the line is known
        array = path.suffix == ".json" and data.lstrip().startswith(b"[")
        where = f"{path} line {lineno}" if array else f"{path} row {lineno}"
        raise DataError(f"{where}: not valid UTF-8: byte 0x{data[e.start]:02x} at column {column} (byte offset "
                        f"{e.start} in the file; {e.reason}); save the file as UTF-8") from None


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    return list(enumerate(table.to_pylist(), start=1))


def _type_name(value) -> str:
    return type(value).__name__


def validate_row(row, where: str) -> dict:
    """Check one row and return it in the suite's schema: messages reduced to role/content (all the chat template
    renders), missing suite columns filled with DEFAULTS. `where` ("file row N") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {_type_name(row)}; expected an object")
    if "messages" not in row:
        raise DataError(f"{where}: messages is missing")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _type_name(messages)
        raise DataError(f"{where}: messages is {got}; expected a non-empty list of {{role, content}}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] is {_type_name(m)}; expected an object with role and content")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            got = "missing" if m.get("content") is None else _type_name(m["content"])
            raise DataError(f"{where}: messages[{i}].content is {got}; expected a string")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: messages has no assistant turn; nothing to train on")
    if clean[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: messages[{len(clean) - 1}].role is {clean[-1]['role']!r}; the last turn must be assistant"
        )
    # A null suite column (common in Parquet files with optional columns) counts as missing.
    given = {key: value for key, value in row.items() if not (key in DEFAULTS and value is None)}
    out = {**DEFAULTS, **given, "messages": clean}
    for key, kind in _TYPES.items():
        # bool is an int subclass: harmful=1 or n_pairs=True would slip through isinstance.
        if not isinstance(out[key], kind) or (kind is int and isinstance(out[key], bool)):
            raise DataError(f"{where}: {key} is {_type_name(out[key])}; expected {kind.__name__}")
    return out


READERS = {".jsonl": _read_json_lines, ".json": _read_json_lines, ".parquet": _read_parquet}


def read_rows(path: str | Path) -> list[tuple[int, object]]:
    """(1-based row, raw row) of a .jsonl / .json / .parquet file, unvalidated; the row of a JSON lines file is its
    line number. A missing file or another extension is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in READERS:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; expected one of {', '.join(READERS)}")
    return READERS[path.suffix](path)


def load_rows(path: str | Path) -> list[dict]:
    """Validated rows of a .jsonl / .json / .parquet file (see `validate_row`)."""
    path = Path(path)
    rows = [validate_row(row, f"{path} row {n}") for n, row in read_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def rows_to_dataset(rows: list[dict]) -> datasets.Dataset:
    """Dataset.from_list takes its columns from the first row only: give every row the union, None where absent."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def load_messages_file(path: str | Path) -> datasets.Dataset:
    """A user chat file as a Dataset in the built-in suite's schema; raises DataError on any bad row."""
    return rows_to_dataset(load_rows(path))


def prompt_of(row: dict) -> list[dict]:
    """The conversation up to (not including) its final assistant reply: what a policy is asked to continue. Reads
    `prompt` when the row has one (prompt pools, preference pairs), else `messages` (task-suite and chat rows).

    >>> prompt_of({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    [{'role': 'user', 'content': '2+2?'}]
    >>> prompt_of({"prompt": [{"role": "user", "content": "hi"}], "messages": None})
    [{'role': 'user', 'content': 'hi'}]
    """
    messages = row.get("prompt") or row["messages"]
    return list(messages[:-1]) if messages and messages[-1]["role"] == "assistant" else list(messages)


def chat_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of `messages` rendered by the tokenizer's chat template (no generation prompt)."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def drop_too_long(rows: datasets.Dataset | list[dict], length_of: Callable[[dict], int],
                  max_length: int) -> tuple[datasets.Dataset | list[dict], int]:
    """(`rows` without those whose `length_of(row)` exceeds `max_length`, how many were dropped); `rows` is a
    `datasets.Dataset` (returns `rows.select(kept indices)`) or a list of dicts (returns a list). Order is kept.

    Rows are dropped, never truncated (MiniMax-01 Table 7): a conversation cut at the length limit loses the end
    of its reply, so SFT would teach a reply that stops mid-way; a preference pair cut short may lose exactly the
    part where chosen and rejected differ, so it no longer says what was preferred.

    >>> drop_too_long([{"text": "short"}, {"text": "much too long"}], lambda row: len(row["text"]), 8)
    ([{'text': 'short'}], 1)
    """
    keep = [i for i, row in enumerate(rows) if length_of(row) <= max_length]
    kept = rows.select(keep) if isinstance(rows, datasets.Dataset) else [rows[i] for i in keep]
    return kept, len(rows) - len(keep)
