"""The traceability store: which stations handled which unit, when, with what result.

Only this package imports SQLModel and SQLAlchemy; everything else sees the records below.
"""

from linectl.store.records import (
    ExportRow,
    QuarantineRecord,
    StationEventRecord,
    StepRecord,
    StoreStatistics,
    UnitRecord,
    UnitTrace,
)
from linectl.store.trace_store import TraceStore

__all__ = [
    "ExportRow",
    "QuarantineRecord",
    "StationEventRecord",
    "StepRecord",
    "StoreStatistics",
    "TraceStore",
    "UnitRecord",
    "UnitTrace",
]
