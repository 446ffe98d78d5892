"""SIGHUP: take what can change safely from an edited config while the line runs.

Safe, because the dispatcher reads them afresh at every decision: the release settings
(``interval_s``, ``count``, ``max_wip``), ``retry``, route policies and weights (the branches
themselves unchanged), and the ``drain`` list. Anything else (PLCs, stations, the flow's
shape, storage, endpoints, ``time_scale``) needs a restart: the reload refuses it with one log
line naming each changed setting and keeps running with the rest applied.

``diff`` is pure; ``apply`` touches a running supervisor through ``line``, ``max_wip``, the
compiled routes' ``route`` and ``set_in_service``, then asks for a dispatch pass.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linectl.config import Line, RouteStep, load_config, walk
from linectl.errors import ConfigError
from linectl.flow import compile_flow
from linectl.service import wait_pass

log = logging.getLogger("linectl.reload")

_SAFE = ("release", "retry", "drain")


@dataclass(frozen=True)
class Change:
    """What a reload does: the config to run with, and what it applies and refuses."""

    line: Line  # the running config with the safe changes made
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    drain: frozenset[str] = frozenset()  # stations newly out of service
    restore: frozenset[str] = frozenset()  # stations back in service


def _strip_policies(flow: list[Any]) -> list[Any]:
    """The flow's shape: its dump without route policies and weights."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if not ("branches" in value and k in ("policy", "weights"))
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip([getattr(s, "model_dump", lambda s=s: s)() for s in flow])


def _paths(old: Any, new: Any, path: str) -> list[str]:
    """The settings (dotted paths) where two dumps differ, as coarse as one line each."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(sub)
            elif old[key] != new[key]:
                out.extend(_paths(old[key], new[key], sub))
        return out
    return [path] if old != new else []


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


def diff(old: Line, new: Line) -> Change:
    """What reloading ``new`` over the running ``old`` applies and refuses (pure)."""
    applied: list[str] = []
    update: dict[str, Any] = {}
    for name in ("release", "retry"):
        before, after = getattr(old, name).model_dump(), getattr(new, name).model_dump()
        for key in before:
            if before[key] != after[key]:
                applied.append(f"{name}.{key} {_show(before[key])} -> {_show(after[key])}")
        if before != after:
            update[name] = getattr(new, name)
    if old.drain != new.drain:
        applied.append(f"drain {old.drain} -> {new.drain}")
        update["drain"] = new.drain
    shape_same = _strip_policies(old.flow) == _strip_policies(new.flow)
    if shape_same and old.flow != new.flow:
        routes_old = {p: s.route for p, s in walk(old.flow) if isinstance(s, RouteStep)}
        for p, s in walk(new.flow):
            if isinstance(s, RouteStep) and s.route != routes_old[p]:
                was = routes_old[p]
                applied.append(
                    f"{p}.route.policy {was.policy} -> {s.route.policy}"
                    + (f" (weights {s.route.weights})" if s.route.weights else "")
                )
        update["flow"] = new.flow
    refused: list[str] = []
    rest_old = old.model_dump(exclude={*_SAFE, "flow"})
    rest_new = new.model_dump(exclude={*_SAFE, "flow"})
    refused.extend(_paths(rest_old, rest_new, ""))
    if not shape_same:
        refused.append("flow (its stations, routes or forks)")
    running = old.model_copy(update=update)
    return Change(
        line=running,
        applied=applied,
        refused=refused,
        drain=frozenset(new.drain) - frozenset(old.drain) if "drain" in update else frozenset(),
        restore=frozenset(old.drain) - frozenset(new.drain) if "drain" in update else frozenset(),
    )


def apply(sup: Any, change: Change) -> None:
    """Make ``change`` take effect on a running supervisor."""
    line = change.line
    if line.flow is not sup.line.flow:
        routes = {r.path: r.route for r in compile_flow(line).routes}
        for node in sup.flow.routes:
            node.route = routes[node.path]
    sup.line = line
    sup.max_wip = line.release.max_wip or sum(s.capacity for s in line.stations.values())
    for station in sorted(change.drain):
        sup.set_in_service(station, False, detail="config reload")
    for station in sorted(change.restore):
        sup.set_in_service(station, True, detail="config reload")
    sup.kick()


def log_change(change: Change, source: str) -> None:
    if change.applied:
        log.warning("%s: reloaded: %s", source, "; ".join(change.applied))
    elif not change.refused:
        log.info("%s: reloaded: nothing changed", source)
    if change.refused:
        log.error(
            "%s: reload refused for %s: they need a restart (systemctl restart); "
            "running on with the rest applied",
            source,
            ", ".join(change.refused),
        )


async def reload_config(sup: Any, path: Path) -> Change | None:
    """Read ``path`` again and apply what is safe; a config with errors changes nothing."""
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error("%s: reload refused, the config has errors: %s", path, "; ".join(exc.problems))
        return None
    change = diff(sup.line, new)
    apply(sup, change)
    log_change(change, str(path))
    return change


async def drain_at_start(sup: Any) -> None:
    """Take the config's ``drain`` stations out of service once the supervisor runs (after
    its restart recovery, which restores the operator's own actions)."""
    await wait_pass(sup, 0)
    for station in sup.line.drain:
        if sup.stations[station].in_service:
            sup.set_in_service(station, False, detail="config drain")
