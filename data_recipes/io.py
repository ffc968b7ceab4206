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

ROLES = ("system", "user", "assistant", "tool")
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


def _check_call(call, where: str, at: str) -> dict:
    """One assistant tool call in transformers' format, {"type": "function", "function": {"name", "arguments"}}
    (the flat {"name", "arguments"} is accepted too), as {"type": "function", "function": {"name": str,
    "arguments": JSON text}} (+ "id" when given). Arguments stay JSON text in the data: a `datasets` column of
    argument mappings would merge every call's keys into one struct, filling the absent ones with None;
    `alignment.tokenizer.template_messages` parses them back for the chat template."""
    if not isinstance(call, dict):
        raise DataError(f"{where}: {at} is {_type_name(call)}; expected an object with a function name and arguments")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise DataError(f"{where}: {at}.function is {_type_name(fn)}; expected an object with name and arguments")
    key = f"{at}.function" if "function" in call else at
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        got = "missing" if fn.get("name") is None else repr(fn["name"])
        raise DataError(f"{where}: {key}.name is {got}; expected the tool's name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {key}.arguments is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise DataError(f"{where}: {key}.arguments is JSON {_type_name(parsed)}; expected a JSON object")
    elif isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    else:
        raise DataError(f"{where}: {key}.arguments is {_type_name(args)}; expected an object (or its JSON text)")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise DataError(f"{where}: {at}.id is {_type_name(call['id'])}; expected a string")
        out["id"] = call["id"]
    return out


def check_messages(messages, where: str, key: str = "messages") -> list[dict]:
    """A conversation checked and reduced to what a chat template renders: each message's `role` (system, user,
    assistant, tool) and string `content`; an assistant message's `tool_calls` (content may then be empty or
    absent, read as ""); a tool message's optional `name` and `tool_call_id`. Errors name `where` and the key, e.g.
    "f.jsonl row 3: messages[1].tool_calls[0].function.name is missing; expected the tool's name"."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _type_name(messages)
        raise DataError(f"{where}: {key} is {got}; expected a non-empty list of {{role, content}}")
    clean = []
    for i, m in enumerate(messages):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} is {_type_name(m)}; expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {at}.role is {role!r}; expected one of {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{where}: {at}.tool_calls: only assistant messages call tools (role is {role!r})")
            if not isinstance(calls, list) or not calls:
                got = "an empty list" if isinstance(calls, list) else _type_name(calls)
                raise DataError(f"{where}: {at}.tool_calls is {got}; expected a non-empty list of calls")
            calls = [_check_call(c, where, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls)]
        content = m.get("content")
        if content is None and calls:
            content = ""  # a turn that only calls tools
        if not isinstance(content, str):
            got = "missing" if content is None else _type_name(content)
            raise DataError(f"{where}: {at}.content is {got}; expected a string")
        out = {"role": role, "content": content}
        if calls:
            out["tool_calls"] = calls
        if role == "tool":
            for field in ("name", "tool_call_id"):
                if m.get(field) is not None:
                    if not isinstance(m[field], str):
                        raise DataError(f"{where}: {at}.{field} is {_type_name(m[field])}; expected a string")
                    out[field] = m[field]
        clean.append(out)
    return clean


def validate_row(row, where: str) -> dict:
    """Check one row and return it in the suite's schema: messages reduced to what the chat template renders
    (`check_messages`: roles, content, tool calls), missing suite columns filled with DEFAULTS. `where`
    ("file row N") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {_type_name(row)}; expected an object")
    if "messages" not in row:
        raise DataError(f"{where}: messages is missing")
    clean = check_messages(row["messages"], where)
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
    """Tokens of `messages` rendered by the tokenizer's chat template (no generation prompt; messages as
    `alignment.tokenizer.template_messages` hands them to it)."""
    from alignment.tokenizer import template_messages

    return len(tokenizer.apply_chat_template(template_messages(messages), tokenize=True,
                                             return_dict=True)["input_ids"])


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
