"""Generate grafana/dashboards/linectl-line.json, the line overview dashboard.

Run ``python grafana/dashboard.py`` after editing; tests/test_dashboard.py fails while the
committed JSON differs from what this produces, and tests/test_prometheus.py runs every query
below against a real Prometheus scraping a running line. docs/metrics.md describes the panels.

Plain dicts on purpose, not Grafana's grafana-foundation-sdk: tried on the state timeline, the
SDK took as many lines per panel (its mappings and thresholds are nested model objects), left
refId empty and the per-target datasource unset, emitted an older schemaVersion (36), and
would make a 5 MB package with epoch-pinned versions a test dependency. Most of this file is
the panels' titles, descriptions and queries, which either way would be the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "linectl-line.json"
UID = "linectl-line"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
L = 'line="$line"'  # every query selects the chosen line

# linectl_station_condition codes (linectl/metrics.py CONDITION_CODES), with shop-floor colours.
CONDITIONS = [
    ("0", "working", "green"),
    ("1", "starved", "yellow"),
    ("2", "blocked", "orange"),
    ("3", "faulted", "red"),
    ("4", "disconnected", "purple"),
    ("5", "out of service", "text"),
]
PACKML = [
    ("0", "Undefined", "text"),
    ("1", "Clearing", "blue"),
    ("2", "Stopped", "text"),
    ("3", "Starting", "blue"),
    ("4", "Idle", "yellow"),
    ("5", "Suspended", "orange"),
    ("6", "Execute", "green"),
    ("7", "Stopping", "blue"),
    ("8", "Aborting", "red"),
    ("9", "Aborted", "red"),
    ("10", "Holding", "blue"),
    ("11", "Held", "orange"),
    ("12", "Unholding", "blue"),
    ("13", "Suspending", "blue"),
    ("14", "Unsuspending", "blue"),
    ("15", "Resetting", "blue"),
    ("16", "Completing", "blue"),
    ("17", "Complete", "light-green"),
]


def target(expr: str, legend: str, ref: str, exemplar: bool = False) -> dict[str, Any]:
    out = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}
    if exemplar:
        out["exemplar"] = True  # points carrying the unit serial (docs/metrics.md, Exemplars)
    return out


def panel(
    kind: str,
    title: str,
    description: str,
    grid: tuple[int, int, int, int],
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    minmax: tuple[float | None, float | None] = (None, None),
    mappings: list[tuple[str, str, str]] | None = None,
    options: dict[str, Any] | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
    exemplars: bool = False,
) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {"unit": unit}
    if minmax[0] is not None:
        defaults["min"] = minmax[0]
    if minmax[1] is not None:
        defaults["max"] = minmax[1]
    if mappings:
        defaults["mappings"] = [
            {
                "type": "value",
                "options": {
                    value: {"text": text, "color": color, "index": i}
                    for i, (value, text, color) in enumerate(mappings)
                },
            }
        ]
        defaults["color"] = {"mode": "thresholds"}
    if thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"value": v, "color": c} for v, c in thresholds],
        }
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
        "targets": [
            target(expr, legend, chr(ord("A") + i), exemplars)
            for i, (expr, legend) in enumerate(targets)
        ],
    }


RATIO_STEPS = [(None, "red"), (0.6, "orange"), (0.85, "green")]
UTIL_STEPS = [(None, "green"), (0.7, "yellow"), (0.9, "red")]


def panels() -> list[dict[str, Any]]:
    finished_rate = f"sum(rate(linectl_units_finished_total{{{L}}}[$__rate_interval]))"
    # Wall seconds per line second: turns a per-wall-second rate into the line's own rate, so
    # a simulated line (time_scale 0.1) shows its plant throughput, not ten times it.
    scale = f"scalar(linectl_time_scale{{{L}}})"
    busy = (
        f"rate(linectl_station_busy_seconds_total{{{L}}}[$__rate_interval]) * {scale}"
        f" / on(line, station) linectl_station_capacity_units{{{L}}}"
    )

    def share(condition: str) -> str:
        return (
            f"rate(linectl_station_{condition}_seconds_total{{{L}}}[$__rate_interval]) * {scale}"
        )

    def quantile(q: float, metric: str) -> str:
        return (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{L}}}[$__rate_interval])))"
        )

    stat = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    return [
        # --- row 1: what the line delivers -------------------------------------------------
        panel(
            "timeseries",
            "Throughput vs predicted",
            "Finished units per line hour (rates times time_scale: the line's own throughput, "
            "also for a sped-up simulation), against the flow analysis' prediction for "
            "nominal cycle times.",
            (0, 0, 12, 8),
            [
                (f"{finished_rate} * {scale} * 3600", "measured"),
                (
                    f"linectl_predicted_throughput_units_per_second{{{L}}} * 3600",
                    "predicted",
                ),
            ],
            unit="short",
        ),
        panel(
            "stat",
            "OEE",
            "Line OEE since the supervisor started = availability × performance × quality "
            "(docs/metrics.md).",
            (12, 0, 12, 4),
            [
                (f"linectl_line_oee_ratio{{{L}}}", "OEE"),
                (f"linectl_line_availability_ratio{{{L}}}", "availability"),
                (f"linectl_line_performance_ratio{{{L}}}", "performance"),
                (f"linectl_line_quality_ratio{{{L}}}", "quality"),
            ],
            unit="percentunit",
            minmax=(0, 1),
            thresholds=RATIO_STEPS,
            options=stat,
        ),
        panel(
            "stat",
            "WIP and quarantine",
            "Units in the line now; units in quarantine now; quarantinings in the time range.",
            (12, 4, 12, 4),
            [
                (f"linectl_wip_units{{{L}}}", "WIP"),
                (f"linectl_quarantine_units{{{L}}}", "in quarantine"),
                (
                    f"increase(linectl_units_quarantined_total{{{L}}}[$__range])",
                    "quarantined in range",
                ),
            ],
            options=stat,
        ),
        panel(
            "timeseries",
            "Interval between finished units",
            "Measured mean time between finished units (1 / throughput) against the predicted "
            "interval, in line seconds.",
            (0, 8, 8, 8),
            [
                (f"1 / ({finished_rate} * {scale})", "measured"),
                (f"linectl_predicted_interval_seconds{{{L}}}", "predicted"),
            ],
            unit="s",
        ),
        panel(
            "timeseries",
            "Lead time",
            "Release to finish of finished units: p50 and p95 from the histogram, against the "
            "predicted lead time through an empty line. Exemplar points name a unit: "
            "linectl trace SERIAL shows its path.",
            (8, 8, 8, 8),
            [
                (quantile(0.5, "linectl_unit_lead_time_seconds"), "p50"),
                (quantile(0.95, "linectl_unit_lead_time_seconds"), "p95"),
                (f"linectl_predicted_lead_time_seconds{{{L}}}", "predicted"),
            ],
            unit="s",
            exemplars=True,
        ),
        panel(
            "timeseries",
            "WIP",
            "Units in the line (released, not yet finished or quarantined).",
            (16, 8, 8, 8),
            [(f"linectl_wip_units{{{L}}}", "WIP")],
        ),
        panel(
            "timeseries",
            "OEE and its factors",
            "Line OEE and availability, performance, quality since the supervisor started.",
            (0, 16, 12, 8),
            [
                (f"linectl_line_oee_ratio{{{L}}}", "OEE"),
                (f"linectl_line_availability_ratio{{{L}}}", "availability"),
                (f"linectl_line_performance_ratio{{{L}}}", "performance"),
                (f"linectl_line_quality_ratio{{{L}}}", "quality"),
            ],
            unit="percentunit",
            minmax=(0, 1),
        ),
        panel(
            "bargauge",
            "OEE per station",
            "Each station's OEE since start. Starved and blocked time count as performance "
            "loss, so only the bottleneck can come close to 100 %.",
            (12, 16, 12, 8),
            [(f"linectl_station_oee_ratio{{{L}}}", "{{station}}")],
            unit="percentunit",
            minmax=(0, 1),
            thresholds=RATIO_STEPS,
            options={"orientation": "horizontal", "displayMode": "gradient"},
        ),
        # --- row 2: where the time goes ----------------------------------------------------
        panel(
            "state-timeline",
            "Station condition",
            "What each station was doing: working, starved, blocked, faulted, disconnected, "
            "out of service.",
            (0, 24, 24, 8),
            [(f"linectl_station_condition{{{L}}}", "{{station}}")],
            mappings=CONDITIONS,
            options={"mergeValues": True, "showValue": "auto"},
        ),
        panel(
            "state-timeline",
            "PackML state",
            "PackML state of each station's slot 0 as its PLC reports it.",
            (0, 32, 24, 8),
            [(f"linectl_station_state{{{L}}}", "{{station}}")],
            mappings=PACKML,
            options={"mergeValues": True, "showValue": "auto"},
        ),
        panel(
            "bargauge",
            "Utilization per station",
            "Share of slot-time spent executing a unit over the rate window. The station "
            "nearest 100 % is the bottleneck.",
            (0, 40, 8, 9),
            [(busy, "{{station}}")],
            unit="percentunit",
            minmax=(0, 1),
            thresholds=UTIL_STEPS,
            options={"orientation": "horizontal", "displayMode": "gradient"},
        ),
        panel(
            "stat",
            "Bottleneck",
            "The constraint measured by the blocked/starved method (the station least often "
            "blocked or starved over the last 600 line seconds) with its active share, next "
            "to the one the flow analysis predicts; and how often the constraint moved.",
            (8, 40, 4, 9),
            [
                (
                    f"linectl_line_bottleneck_info{{{L}}} * on(line, station) group_left "
                    f"linectl_station_active_ratio{{{L}}}",
                    "{{station}} (predicted {{predicted}})",
                ),
                (
                    f"increase(linectl_line_constraint_moves_total{{{L}}}[$__range])",
                    "moves in range",
                ),
            ],
            options={**stat, "textMode": "value_and_name"},
        ),
        panel(
            "timeseries",
            "Blocked and starved time",
            "Share of time each station was blocked (done, nowhere to go) or starved "
            "(nothing to do).",
            (12, 40, 12, 9),
            [
                (share("blocked"), "{{station}} blocked"),
                (share("starved"), "{{station}} starved"),
            ],
            unit="percentunit",
            minmax=(0, 1),
        ),
        panel(
            "timeseries",
            "Cycle time p95 per station",
            "95th percentile of the cycle times the PLCs measured, in wall seconds. Exemplar "
            "points name the last unit in each bucket.",
            (0, 49, 12, 8),
            [
                (
                    "histogram_quantile(0.95, sum by (station, le) "
                    f"(rate(linectl_station_cycle_seconds_bucket{{{L}}}[$__rate_interval])))",
                    "{{station}}",
                ),
            ],
            unit="s",
            exemplars=True,
        ),
        panel(
            "timeseries",
            "Handover latency",
            "Station done to the next station's START confirmed: p50 and p95.",
            (12, 49, 12, 8),
            [
                (quantile(0.5, "linectl_handover_seconds"), "p50"),
                (quantile(0.95, "linectl_handover_seconds"), "p95"),
            ],
            unit="s",
        ),
        # --- row 3: PLC health -------------------------------------------------------------
        panel(
            "timeseries",
            "PLC request latency",
            "Mean latency of requests to each PLC over the rate window.",
            (0, 57, 8, 8),
            [
                (
                    f"rate(linectl_plc_request_seconds_sum{{{L}}}[$__rate_interval])"
                    f" / rate(linectl_plc_request_seconds_count{{{L}}}[$__rate_interval])",
                    "{{plc}}",
                )
            ],
            unit="s",
        ),
        panel(
            "timeseries",
            "PLC errors and reconnects",
            "Failed requests per second, and reconnects in the time range, per PLC.",
            (8, 57, 8, 8),
            [
                (
                    f"rate(linectl_plc_request_errors_total{{{L}}}[$__rate_interval])",
                    "{{plc}} errors/s",
                ),
                (
                    f"increase(linectl_plc_reconnects_total{{{L}}}[$__range])",
                    "{{plc}} reconnects",
                ),
            ],
        ),
        panel(
            "state-timeline",
            "PLC connected",
            "Whether each PLC's connection is up.",
            (16, 57, 8, 8),
            [(f"linectl_plc_connected{{{L}}}", "{{plc}}")],
            mappings=[("0", "down", "red"), ("1", "up", "green")],
            options={"mergeValues": True, "showValue": "never"},
        ),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "linectl line overview",
        "description": "Throughput, OEE, station conditions and PLC health of one linectl line.",
        "tags": ["linectl"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "linectl Prometheus", "value": "linectl-prometheus"},
                    "hide": 0,
                },
                {
                    "name": "line",
                    "label": "Line",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(linectl_units_released_total, line)",
                        "refId": "line",
                    },
                    "definition": "label_values(linectl_units_released_total, line)",
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": [{**p, "id": i} for i, p in enumerate(panels(), start=1)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == render() else "dashboard JSON is out of date")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
