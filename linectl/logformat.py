"""Log lines for machines: one JSON object per line, for journald or a log shipper.

Every object has ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``; a log call that
passes ``extra={"station": ..., "unit": ..., "plc": ...}`` adds those keys, and the formatter
adds ``line`` (the process runs one line). A traceback goes in ``exc`` as one string.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

# Keys a log call may add with extra=; anything else in extra stays out of the object.
FIELDS = ("line", "station", "unit", "plc", "slot", "address")


class JsonFormatter(logging.Formatter):
    def __init__(self, line: str | None = None) -> None:
        super().__init__()
        self.line = line

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.line is not None:
            entry["line"] = self.line
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
