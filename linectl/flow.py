"""The flow of a line compiled into a tree the dispatcher walks. Pure: no I/O, no clock.

A unit moves through the tree as one or more *tokens*. A token stands at a station; when it is
done there, ``next_after`` says where it goes: the next step of its sequence, out of a route
branch (routes end where their branch ends), or into a fork's join, where the unit waits until
every branch of the fork is done. Entering a route asks a balancing policy for a branch;
entering a fork splits the token into one per branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from linectl.config import ForkStep, Line, Route, RouteStep


@dataclass(eq=False)
class Node:
    path: str
    parent: Seq | None = field(default=None, repr=False)
    index: int = 0  # position in the parent sequence


@dataclass(eq=False)
class StationNode(Node):
    station: str = ""
    on_reject: StationNode | None = None  # where a unit rejected here goes for rework
    rework_of: StationNode | None = None  # for a rework station: the station it serves


@dataclass(eq=False)
class Seq:
    """A sequence of steps; ``owner`` is the route or fork it is a branch of (None: the flow)."""

    steps: list[Node]
    owner: RouteNode | ForkNode | None = None
    branch: int = 0
    path: str = "flow"
    _stations: list[str] | None = field(default=None, repr=False)

    def stations(self) -> list[str]:
        """Every station in this sequence, nested ones included (computed once)."""
        if self._stations is None:
            self._stations = [name for node in self.steps for name in stations_in(node)]
        return self._stations


@dataclass(eq=False)
class RouteNode(Node):
    route: Route | None = None
    branches: list[Seq] = field(default_factory=list)

    @property
    def policy(self) -> str:
        assert self.route is not None
        return self.route.policy

    @property
    def label(self) -> str:
        return f"route@{self.path}"


@dataclass(eq=False)
class ForkNode(Node):
    branches: list[Seq] = field(default_factory=list)


def stations_in(node: Node) -> list[str]:
    if isinstance(node, StationNode):
        return [node.station]
    out: list[str] = []
    for branch in getattr(node, "branches", []):
        out.extend(branch.stations())
    return out


@dataclass
class CompiledFlow:
    root: Seq
    stations: dict[str, StationNode]  # station name -> its node
    routes: list[RouteNode]
    forks: list[ForkNode]

    def route_of(self, station: str) -> tuple[RouteNode, int] | None:
        """The innermost route whose branch holds ``station``, and which branch."""
        seq = self.stations[station].parent
        while seq is not None:
            if isinstance(seq.owner, RouteNode):
                return seq.owner, seq.branch
            seq = seq.owner.parent if seq.owner is not None else None
        return None


def compile_flow(line: Line) -> CompiledFlow:
    stations: dict[str, StationNode] = {}
    routes: list[RouteNode] = []
    forks: list[ForkNode] = []

    def seq(steps: list, path: str, owner=None, branch: int = 0) -> Seq:
        s = Seq([], owner, branch, path)
        for i, step in enumerate(steps):
            here = f"{path}[{i}]"
            if isinstance(step, str):
                node: Node = StationNode(here, s, i, station=step)
                stations[step] = node  # type: ignore[assignment]
            elif isinstance(step, RouteStep):
                node = RouteNode(here, s, i, route=step.route)
                node.branches = [
                    seq(b, f"{here}.route.branches[{j}]", node, j)
                    for j, b in enumerate(step.route.branches)
                ]
                routes.append(node)  # type: ignore[arg-type]
            elif isinstance(step, ForkStep):
                node = ForkNode(here, s, i)
                node.branches = [
                    seq(b, f"{here}.fork[{j}]", node, j) for j, b in enumerate(step.fork)
                ]
                forks.append(node)  # type: ignore[arg-type]
            else:  # pragma: no cover - config validation rules this out
                raise TypeError(f"{here}: unknown step {step!r}")
            s.steps.append(node)
        return s

    root = seq(line.flow, "flow")
    for name, node in list(stations.items()):
        rework = line.stations[name].on_reject
        if rework is not None:
            # Off the flow: no parent; next_after sends its units on after the station it serves.
            node.on_reject = StationNode(f"{node.path}.on_reject", None, 0, station=rework)
            node.on_reject.rework_of = node
            stations[rework] = node.on_reject
    return CompiledFlow(root, stations, routes, forks)


@dataclass(frozen=True)
class Join:
    """A token reached the end of a fork branch: the unit waits there for its siblings."""

    fork: ForkNode


@dataclass(frozen=True)
class Exit:
    """A token left the end of the flow: the unit is finished."""


def next_after(node: Node) -> Node | Join | Exit:
    """Where a token goes once it is done at ``node`` (a station, or a whole route/fork)."""
    if isinstance(node, StationNode) and node.rework_of is not None:
        return next_after(node.rework_of)  # reworked: on with the step after the one it failed
    seq = node.parent
    index = node.index
    while seq is not None:
        if index + 1 < len(seq.steps):
            return seq.steps[index + 1]
        owner = seq.owner
        if owner is None:
            return Exit()
        if isinstance(owner, ForkNode):
            return Join(owner)
        # End of a route branch: carry on after the route.
        seq, index = owner.parent, owner.index
    return Exit()


def resume_point(node: Node) -> Node:
    """Where a unit that failed at ``node`` goes back in when an operator releases it: the
    station itself, unless it is inside a fork, whose branches have then been dropped, so the
    whole outermost fork runs again."""
    found: Node = node
    seq = node.parent
    while seq is not None and seq.owner is not None:
        if isinstance(seq.owner, ForkNode):
            found = seq.owner
        seq = seq.owner.parent
    return found
