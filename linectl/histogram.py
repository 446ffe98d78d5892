"""A histogram with fixed buckets, cheap enough to observe on the dispatch path."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# Wide, roughly logarithmic buckets (seconds): from a fast handover to a slow lead time.
SECONDS_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    buckets: tuple[float, ...]  # upper bounds; +Inf is implied
    counts: tuple[int, ...]  # per bucket, not cumulative; one more for +Inf
    sum: float
    count: int
    # Per bucket, the last observation's label (a unit serial) and value, or None: Prometheus
    # exemplars, so a spike on a dashboard leads to a unit.
    exemplars: tuple[tuple[str, float] | None, ...] = ()


class Histogram:
    """Cumulative counts for Prometheus, kept by the supervisor at the cost of one bisect."""

    __slots__ = ("buckets", "count", "counts", "exemplars", "sum")

    def __init__(self, buckets: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self.exemplars: list[tuple[str, float] | None] = [None] * (len(buckets) + 1)

    def observe(self, value: float, exemplar: str | None = None) -> None:
        i = bisect.bisect_left(self.buckets, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if exemplar is not None:
            self.exemplars[i] = (exemplar, value)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(
            self.buckets, tuple(self.counts), self.sum, self.count, tuple(self.exemplars)
        )
