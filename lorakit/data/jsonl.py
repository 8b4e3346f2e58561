"""Reading a JSONL data file into validated records.

One JSON object per line; blank lines are ignored. The format is detected once per file, from
the first valid record, unless it is forced; every record must then have that format.
A bad line (invalid JSON, a missing key, a wrong type, an empty answer) either stops the load
with an error naming the file, the 1-based line number and the problem, or, with
``skip_bad=True``, is skipped and listed in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, get_args

from lorakit.data.records import (
    Format,
    Record,
    RecordError,
    describe_formats,
    detect_format,
    json_kind,
    parse_record,
)

FormatChoice: TypeAlias = Literal["auto", "chat", "alpaca", "completion", "text"]


class DataFileError(ValueError):
    """A data file, or one line of it, cannot be used."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class BadLine:
    """A skipped line of a data file."""

    line: int
    """1-based line number."""
    reason: str
    """What is wrong with it."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_records` read."""

    path: str
    """The file read."""
    format: Format
    """The format of its records (detected or forced)."""
    num_records: int
    """Records returned."""
    skipped: tuple[BadLine, ...] = ()
    """Bad lines skipped because ``skip_bad=True``; empty otherwise."""

    @property
    def num_skipped(self) -> int:
        """How many bad lines were skipped."""
        return len(self.skipped)


def load_records(
    path: str | Path, format: FormatChoice = "auto", skip_bad: bool = False
) -> tuple[list[Record], LoadReport]:
    """Read a JSONL file of training records.

    Args:
        path: The ``.jsonl`` file.
        format: "auto" to detect the format from the first valid record, or one of "chat",
            "alpaca", "completion", "text" to require it.
        skip_bad: Skip bad lines (and list them in the report) instead of raising.

    Returns:
        The records in file order, and a report with the format and the skipped lines.

    Raises:
        DataFileError: If the file is missing or holds no valid record, or (without ``skip_bad``)
            at the first bad line; the message reads ``"<path>:<line>: <what is wrong>"``.
        ValueError: If ``format`` is not one of the accepted names.

    Example:
        >>> records, report = load_records("train.jsonl")  # doctest: +SKIP
        >>> report.format, report.num_records, report.num_skipped  # doctest: +SKIP
        ('chat', 1200, 0)
    """
    if format not in get_args(FormatChoice):
        raise ValueError(f"format={format!r} is not accepted; use one of {', '.join(get_args(FormatChoice))}")
    path = Path(path)
    if path.is_dir():
        raise DataFileError(path, None, "is a folder; give a JSONL file (one record per line)")
    if not path.exists():
        raise DataFileError(path, None, "no such file")
    if not path.is_file():
        raise DataFileError(path, None, "is not a regular file (a device or a pipe); give a JSONL file")

    fmt: Format | None = None if format == "auto" else format
    records: list[Record] = []
    skipped: list[BadLine] = []
    # Bytes, decoded line by line, so that one badly encoded line is a bad line like any other.
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                line = _decode(raw, first=number == 1)
                record, fmt = _parse_line(line, fmt, origin=f"{path}:{number}")
            except RecordError as error:
                if not skip_bad:
                    raise DataFileError(path, number, str(error)) from None
                skipped.append(BadLine(number, str(error)))
                continue
            records.append(record)

    if fmt is None or not records:
        reason = "no valid records"
        if skipped:
            reason += (
                f" ({len(skipped)} bad lines skipped; the first, line {skipped[0].line}: {skipped[0].reason})"
            )
        raise DataFileError(path, None, reason)
    return records, LoadReport(str(path), fmt, len(records), tuple(skipped))


def _decode(raw: bytes, first: bool) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"not valid UTF-8 (byte {error.start + 1} of the line)") from None
    # Editors on Windows may start the file with a byte-order mark, which JSON does not allow.
    return line.removeprefix("\ufeff") if first else line


def _parse_line(line: str, fmt: Format | None, origin: str) -> tuple[Record, Format]:
    """Parse one non-blank line; with ``fmt`` None, detect it. Returns the record and its format."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if fmt is None:
        detected = detect_format(value)
        if detected is None:
            if not isinstance(value, dict):
                raise RecordError(f"expected a JSON object, found {json_kind(value)}")
            found = ", ".join(repr(k) for k in value) or "none"
            raise RecordError(
                f"unknown record format: expected keys {describe_formats()}; keys found: {found}"
            )
        # Validate before committing, so that with skip_bad a broken first record does not fix
        # the format for the whole file.
        return parse_record(value, detected, origin), detected
    return parse_record(value, fmt, origin), fmt
