"""The Grafana dashboard and provisioning files: generated and committed forms agree, and every
query selects the dashboard's line. tests/test_prometheus.py runs the queries for real."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import yaml

GRAFANA = Path(__file__).parent.parent / "grafana"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("linectl_dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_json_is_what_dashboard_py_generates():
    gen = load_generator()
    committed = (GRAFANA / "dashboards" / "linectl-line.json").read_text()
    assert committed == gen.render(), "run: python grafana/dashboard.py"


def test_every_query_selects_the_line_variable_and_every_panel_has_a_unique_place():
    board = json.loads((GRAFANA / "dashboards" / "linectl-line.json").read_text())
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "line"]
    ids, cells = set(), set()
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                cell = (g["x"] + dx, g["y"] + dy)
                assert cell not in cells, f"panel '{panel['title']}' overlaps another"
                cells.add(cell)
        for t in panel["targets"]:
            assert 'line="$line"' in t["expr"], (panel["title"], t["expr"])


def test_the_provisioned_datasource_is_the_one_the_dashboard_defaults_to():
    board = json.loads((GRAFANA / "dashboards" / "linectl-line.json").read_text())
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "linectl.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert board["templating"]["list"][0]["current"]["value"] == source["uid"]
    provider = GRAFANA / "provisioning" / "dashboards" / "linectl.yaml"
    dashboards = yaml.safe_load(provider.read_text())
    assert dashboards["providers"][0]["type"] == "file"


def test_docs_describe_every_panel():
    board = json.loads((GRAFANA / "dashboards" / "linectl-line.json").read_text())
    docs = (GRAFANA.parent / "docs" / "metrics.md").read_text()
    missing = [p["title"] for p in board["panels"] if f"| {p['title']} |" not in docs]
    assert not missing, f"docs/metrics.md does not describe panels {missing}"
