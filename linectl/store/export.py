"""Export rows as CSV or JSON Lines, for a quality team's spreadsheet or pipeline."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from linectl.store.records import ExportRow

FORMATS = ("csv", "jsonl")
COLUMNS = tuple(f.name for f in dataclasses.fields(ExportRow))


def _plain(value: Any) -> Any:
    # One format for every time, so a spreadsheet parses the whole column alike.
    return value.isoformat(timespec="microseconds") if isinstance(value, datetime) else value


class ExportWriter:
    """Writes pages of rows to ``out``; CSV gets its header before the first row."""

    def __init__(self, out: TextIO, fmt: str = "csv") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self._out = out
        self._fmt = fmt
        self.rows = 0
        self._csv = None
        if fmt == "csv":
            self._csv = csv.writer(out, lineterminator="\n")
            self._csv.writerow(COLUMNS)

    def write(self, rows: Iterable[ExportRow]) -> None:
        for row in rows:
            values = [_plain(getattr(row, name)) for name in COLUMNS]
            if self._csv is not None:
                self._csv.writerow(["" if v is None else v for v in values])
            else:
                self._out.write(json.dumps(dict(zip(COLUMNS, values, strict=True))) + "\n")
            self.rows += 1
