"""Rows from files: read JSONL, CSV and Parquet, validate each row against its format, split, find labels.

Every row remembers its file and line, so any later error can point at it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("instruction", "chat", "text", "classification")
OVERFLOWS = ("truncate", "error")
SUFFIXES = (".jsonl", ".csv", ".parquet")
REQUIRED = {"instruction": ("instruction", "output"), "chat": ("messages",), "text": ("text",),
            "classification": ("text", "label")}  # fmt: skip


class DataError(ValueError):
    """Data lorafit cannot train on; the message names the file and line (or config field) and what to do."""


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token sequences."""

    train: str  # path of the training file (.jsonl, .csv, .parquet)
    validation: str | None = None  # path of a validation file; None: hold out val_fraction of train
    val_fraction: float = 0.1  # share of train rows held out (seeded) when no validation file is given
    format: str = "auto"  # instruction | chat | text | classification | auto (from the first row's fields)
    max_length: int = 256  # most tokens per example (exactly this many per row when packing)
    overflow: str = "truncate"  # longer examples: "truncate" (see the module docstring) or "error"
    mask_prompt: bool = True  # loss on answer tokens only (prompt tokens get label -100)
    packing: bool = False  # concatenate LM examples into rows of exactly max_length tokens
    skip_bad_rows: bool = False  # skip malformed rows (and say how many) instead of raising DataError

    def __post_init__(self) -> None:
        for key in ("train", "validation"):
            value = getattr(self, key)
            if value is None and key == "validation":
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise DataError(f"{key} must be a file path, got {value!r}")
            if Path(value).suffix.lower() not in SUFFIXES:
                raise DataError(f"{key}={str(value)!r}: unsupported file type; use one of {', '.join(SUFFIXES)}")
            setattr(self, key, str(value))
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.format not in (*FORMATS, "auto"):
            raise DataError(f"format must be one of {(*FORMATS, 'auto')}, got {self.format!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.overflow not in OVERFLOWS:
            raise DataError(f"overflow must be one of {OVERFLOWS}, got {self.overflow!r}")
        for key in ("mask_prompt", "packing", "skip_bad_rows"):
            if not isinstance(getattr(self, key), bool):
                raise DataError(f"{key} must be true or false, got {getattr(self, key)!r}")


@dataclass
class Row:
    """One validated row and where it came from."""

    fields: dict  # the fields its format needs (strings; chat: "messages", a list of {role, content})
    source: str  # the file it was read from
    line: int  # 1-based line for JSONL and CSV (the CSV header is line 1), 0-based row index for Parquet

    @property
    def where(self) -> str:
        """"train.jsonl line 3" or "train.parquet row 2", for error messages."""
        return _where(self.source, self.line)


class Rows(list):
    """A list of Row that also says how many bad rows `read_rows` skipped to get it."""

    skipped: int = 0


def _where(source: str | Path, line: int) -> str:
    return f"{source} {'row' if str(source).lower().endswith('.parquet') else 'line'} {line}"


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line, object) per non-blank line; a string instead of the object says why the line is unreadable."""
    with path.open("rb") as f:  # bytes, so one bad byte spoils one line, not the file
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                yield line, f"not UTF-8 text ({err.reason} at byte {err.start})"
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield line, f"not valid JSON ({err.msg} at column {err.colno})"
                continue
            yield line, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"


def _csv_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line, {column: value}) per CSV record under the header; line counts the header as line 1."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            start = reader.line_num + 1  # where the next record begins (a quoted field may span lines)
            for values in reader:
                line, start = start, reader.line_num + 1
                if not values:
                    continue
                if len(values) > len(header):
                    yield line, f"{len(values)} values but the header has {len(header)} columns"
                    continue
                yield line, dict(zip(header, values, strict=False))  # a short row simply lacks the last fields
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); save the CSV as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{_where(path, reader.line_num)}: malformed CSV ({err})") from None


def _parquet_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(row index, {column: value}) per Parquet row; nulls read as missing fields."""
    try:
        import pyarrow.parquet as pq  # heavy: only Parquet files need it
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for index, record in enumerate(table.to_pylist()):
        yield index, {k: v for k, v in record.items() if v is not None}


def _check(record: dict, fmt: str) -> dict | str:
    """The fields `fmt` needs from `record`, or a message saying what is wrong with it."""
    if fmt == "chat":
        return _check_messages(record.get("messages"))
    fields = {}
    for key in REQUIRED[fmt]:
        value = record.get(key)
        if value is None:
            found = ", ".join(map(repr, record)) or "none"
            return f"missing field {key!r} (format {fmt} needs {', '.join(REQUIRED[fmt])}; found {found})"
        if key == "label" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return f"field {key!r} must be a string, got {type(value).__name__} {value!r:.60}"
        if not value.strip():
            return f"field {key!r} is empty"
        fields[key] = value.strip() if key == "label" else value  # "a " and "a" must not become two classes
    if fmt == "instruction":
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            return f"field 'input' must be a string, got {type(extra).__name__} {extra!r:.60}"
        fields["input"] = extra
    return fields


def _check_messages(messages: object) -> dict | str:
    if messages is None:
        return "missing field 'messages' (format chat needs a list of {role, content} objects)"
    if not isinstance(messages, list) or not messages:
        return f"field 'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.60}"
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string 'role' and 'content', got {m!r:.60}"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"messages[{i}] is an empty assistant turn"
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        return "messages has no 'assistant' turn to train on"
    return {"messages": clean}


def _detect(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "classification" if "label" in record else "text"
    return None


def read_rows(path: str | os.PathLike, fmt: str = "auto", skip_bad_rows: bool = False,
              log: Callable[[str], object] = print) -> tuple[Rows, str]:
    """Read and validate every row of a .jsonl, .csv or .parquet file; return the rows and their format.

    A malformed row raises DataError naming the file and line, unless `skip_bad_rows`: then it is skipped, the
    count is logged and kept in `rows.skipped`. No usable rows at all is always a DataError.
    """
    source = Path(path)
    readers = {".jsonl": _jsonl_records, ".csv": _csv_records, ".parquet": _parquet_records}
    if source.suffix.lower() not in readers:
        raise DataError(f"{source}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    if fmt not in (*FORMATS, "auto"):
        raise DataError(f"format must be one of {(*FORMATS, 'auto')}, got {fmt!r}")
    rows, bad = Rows(), []
    for line, record in readers[source.suffix.lower()](source):
        if isinstance(record, dict) and fmt == "auto":
            fmt = _detect(record) or ""
            if not fmt:
                raise DataError(f"{_where(source, line)}: cannot tell the format from fields {sorted(record)}; "
                                f"rows need {REQUIRED} (or set data.format: --data.format NAME)")
        problem = record if isinstance(record, str) else _check(record, fmt)
        if isinstance(problem, str):
            message = f"{_where(source, line)}: {problem}"
            if not skip_bad_rows:
                raise DataError(f"{message}. Fix the row, or skip bad rows with --data.skip_bad_rows true "
                                "(skip_bad_rows=True in Python)")
            bad.append(message)
            continue
        rows.append(Row(problem, str(source), line))
    rows.skipped = len(bad)
    if not rows:  # the error says it all: no note about skipping first
        why = f"all {len(bad)} rows are bad; first: {bad[0]}" if bad else "the file holds no rows"
        raise DataError(f"{source}: no data to use ({why})")
    if bad:
        log(f"{source}: skipped {len(bad)} bad row(s), kept {len(rows)}; first: {bad[0]}")
    return rows, fmt


INPUT_SUFFIXES = (".txt", ".jsonl", ".csv")


def _input_fields(record: dict | str) -> dict | str:
    """The text (or instruction and input) of one prediction input record, or what is wrong with it."""
    if isinstance(record, str):
        return record
    keys = ("text",) if "text" in record else ("instruction", "input") if "instruction" in record else ()
    if not keys:
        return f"needs a 'text' field (or 'instruction' and 'input'); found {', '.join(map(repr, record)) or 'none'}"
    fields = {key: record.get(key) or "" for key in keys}
    bad = next((key for key, value in fields.items() if not isinstance(value, str)), None)
    if bad:
        return f"field {bad!r} must be a string, got {type(fields[bad]).__name__} {fields[bad]!r:.60}"
    return fields


def read_inputs(path: str | os.PathLike) -> list[Row]:
    """Texts to predict on: a .txt file (one text per non-blank line), .jsonl (a `text` field, or `instruction`
    and `input`) or .csv (a `text` column, or `instruction` and `input` columns). Every row keeps its line."""
    source = Path(path)
    if source.suffix.lower() not in INPUT_SUFFIXES:
        raise DataError(f"{source}: unsupported input file; use one of {', '.join(INPUT_SUFFIXES)}")
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    if source.suffix.lower() == ".txt":
        try:
            lines = source.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{source}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
        records = ((i, {"text": text}) for i, text in enumerate(lines, 1) if text.strip())
    else:
        records = _jsonl_records(source) if source.suffix.lower() == ".jsonl" else _csv_records(source)
    rows = []
    for line, record in records:
        fields = _input_fields(record)
        if isinstance(fields, str):
            raise DataError(f"{_where(source, line)}: {fields}")
        rows.append(Row(fields, str(source), line))
    if not rows:
        raise DataError(f"{source}: the file holds no texts")
    return rows


def load_splits(cfg: DataConfig, seed: int = 0, log: Callable[[str], object] = print) -> tuple[list, list, str]:
    """Train and validation rows and their format, as `cfg` says.

    Without a validation file, a seeded `val_fraction` of train is held out (the same rows for the same seed;
    both splits keep file order). Classification rows held out that way whose label then never occurs in train
    go back to train, so the split itself cannot cause a label mismatch; a validation *file* with unknown
    labels is a DataError (or, with skip_bad_rows, those rows are skipped).
    """
    train, fmt = read_rows(cfg.train, cfg.format, cfg.skip_bad_rows, log)
    if cfg.validation is not None:
        val, _ = read_rows(cfg.validation, fmt, cfg.skip_bad_rows, log)
        if fmt == "classification" and cfg.skip_bad_rows:
            known = {r.fields["label"] for r in train}
            kept = [r for r in val if r.fields["label"] in known]
            if len(kept) < len(val):
                log(f"{cfg.validation}: skipped {len(val) - len(kept)} row(s) whose label never occurs in train")
            if not kept:
                raise DataError(f"{cfg.validation}: no validation rows left after dropping unknown labels")
            val = kept
        return list(train), list(val), fmt
    train, val = _split(list(train), cfg.val_fraction, seed, cfg.train)
    if fmt == "classification":
        known = {r.fields["label"] for r in train}
        back = [r for r in val if r.fields["label"] not in known]
        if back:
            log(f"{cfg.train}: {len(back)} held-out row(s) had labels absent from train; moved back to train")
            train = sorted(train + back, key=lambda r: r.line)
            val = [r for r in val if r.fields["label"] in known]
    return train, val, fmt


def _split(rows: list[Row], fraction: float, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """Hold out round(fraction * n) rows (at least 1 when fraction > 0), chosen by a seeded permutation."""
    if fraction == 0:
        return rows, []
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise DataError(f"{source}: {len(rows)} row(s) are too few to hold out val_fraction={fraction}; "
                        "add rows, or pass a validation file")
    held = set(np.random.default_rng(seed).permutation(len(rows))[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def label_set(train: list[Row], val: list[Row]) -> list[str]:
    """The sorted labels of the training rows (class index = position); DataError if validation has others."""
    if any("label" not in r.fields for r in train):
        raise DataError("label_set needs classification rows (fields text, label)")
    labels = sorted({r.fields["label"] for r in train})
    known = set(labels)
    for row in val:
        if row.fields["label"] not in known:
            shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise DataError(f"{row.where}: validation label {row.fields['label']!r} never occurs in the training "
                            f"data, whose {len(labels)} labels are {shown}. Fix the label, add training rows "
                            "with it, or skip such rows with --data.skip_bad_rows true (skip_bad_rows=True in Python)")
    return labels
