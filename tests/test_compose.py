"""grafana/compose.yaml brings up Prometheus and Grafana provisioned with the shipped files.
Docker is not on these machines, so this proves the pieces fit: every mounted file exists, the
container paths are the ones the configs name, and the addresses match linectl's defaults.
(tests/test_prometheus.py runs every dashboard query on a real Prometheus.)"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from linectl.config import parse_config

ROOT = Path(__file__).parent.parent
GRAFANA = ROOT / "grafana"
COMPOSE = yaml.safe_load((GRAFANA / "compose.yaml").read_text())


def mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's read-only bind mounts."""
    out = {}
    for volume in COMPOSE["services"][service]["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro", volume
        out[target] = (GRAFANA / source).resolve()
    return out


def flag(service: str, name: str) -> str:
    (value,) = [
        a.split("=", 1)[1]
        for a in COMPOSE["services"][service]["command"]
        if a.startswith(f"--{name}=")
    ]
    return value


def default_endpoints() -> tuple[str, str]:
    line = parse_config(
        "line: l\nplcs: {p: {protocol: modbus, host: 127.0.0.1}}\n"
        "stations: {a: {plc: p, address: 0, cycle_s: 1}}\nflow: [a]\n"
    )
    return f"{line.metrics.host}:{line.metrics.port}", f"{line.api.host}:{line.api.port}"


def test_every_mounted_file_exists_and_both_services_share_the_hosts_loopback():
    for service in ("prometheus", "grafana"):
        assert COMPOSE["services"][service]["network_mode"] == "host"
        for target, source in mounts(service).items():
            assert source.exists(), f"{service}: {source} (mounted at {target}) is missing"
            assert GRAFANA in source.parents, source


def test_prometheus_reads_the_shipped_config_and_scrapes_linectls_default_metrics_address():
    config_path = flag("prometheus", "config.file")
    assert mounts("prometheus")[config_path] == GRAFANA / "prometheus.yml"
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = scrape
    assert job["static_configs"][0]["targets"] == [default_endpoints()[0]]
    assert flag("prometheus", "web.listen-address").startswith("127.0.0.1:")


def test_grafana_gets_the_datasource_the_dashboard_uses_and_the_provider_finds_the_dashboard():
    m = mounts("grafana")
    sources = m["/etc/grafana/provisioning/datasources"]
    (source,) = yaml.safe_load((sources / "linectl.yaml").read_text())["datasources"]
    # The datasource reaches the compose Prometheus, and the dashboard defaults to its uid.
    assert source["url"] == f"http://{flag('prometheus', 'web.listen-address')}"
    board_file = GRAFANA / "dashboards" / "linectl-line.json"
    board = json.loads(board_file.read_text())
    assert board["templating"]["list"][0]["current"]["value"] == source["uid"]

    providers = m["/etc/grafana/provisioning/dashboards"]
    (provider,) = yaml.safe_load((providers / "linectl.yaml").read_text())["providers"]
    path = provider["options"]["path"]
    assert m[path] == board_file.parent
    home = COMPOSE["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{path}/{board_file.name}"
    assert COMPOSE["services"]["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_the_readme_command_names_this_compose_file():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f grafana/compose.yaml up" in readme
    assert "docker compose -f grafana/compose.yaml up" in (GRAFANA / "compose.yaml").read_text()
