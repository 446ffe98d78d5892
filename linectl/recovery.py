"""Where a unit stands after a restart, from its journalled steps; no I/O.

The journal holds every step's intent (written before its START) and, unless the crash came
first, its outcome. Replaying a unit's steps through the flow puts its tokens back where they
were; the PLCs then settle what the journal could not know:

* a step whose START the PLC echoed is awaited, never sent again;
* a step the PLC never saw is sent again with the same sequence number;
* a step still open but followed by a later step of its unit passed (the unit only moves on
  after a pass), so it is closed as such.

An operator's release from quarantine is replayed at its place among the steps: the unit goes
back in where it failed (``flow.resume_point``), with its attempt numbers going on.

``replay`` is a pure function of the steps; ``restore`` puts every open unit, and the
operator's actions still in force, back into a dispatcher.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from linectl.flow import (
    CompiledFlow,
    Exit,
    ForkNode,
    Join,
    Node,
    RouteNode,
    StationNode,
    next_after,
    resume_point,
)
from linectl.linestate import Phase, Slot, Token, Unit

if TYPE_CHECKING:
    from linectl.dispatcher import Dispatcher

log = logging.getLogger("linectl.supervisor")


class StepLike(Protocol):
    station: str
    slot: int
    attempt: int
    seq: int
    status: str
    result: str | None
    commanded_at: datetime


@dataclass
class Placed:
    """A token as the journal left it."""

    target: Node | None  # where it still has to go; None while a step is open
    station: str = ""  # the station it is at (open step, or done and not yet moved on)
    slot: int | None = None
    seq: int = 0
    attempt: int = 0
    open: bool = False  # its step at ``station`` was commanded, outcome unknown
    forks: tuple[ForkNode, ...] = ()


@dataclass
class Replayed:
    tokens: list[Placed] = field(default_factory=list)
    joins: dict[int, int] = field(default_factory=dict)
    branches: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    rejected_at: str = ""  # the last step was a reject: the unit belongs in quarantine
    failed_at: str = ""  # the station of its last reject, fault or lost step
    attempts_at_release: dict[str, int] = field(default_factory=dict)
    superseded: list[StepLike] = field(default_factory=list)  # open steps that must have passed


class ReplayError(ValueError):
    """The journal does not fit the flow (the config changed under a unit in the line)."""


def _enter(placed: Placed, station: str, flow: CompiledFlow, out: Replayed) -> Placed | None:
    """If ``placed`` can reach ``station`` by entering its target, do so (committing route
    choices and splitting forks) and return the token that is now at ``station``."""
    target = placed.target
    if isinstance(target, StationNode):
        return placed if target.station == station else None
    if isinstance(target, RouteNode):
        for b, branch in enumerate(target.branches):
            trial = Placed(branch.steps[0], forks=placed.forks)
            if _reaches(trial.target, station):
                out.branches[target.path] = b
                placed.target = branch.steps[0]
                return _enter(placed, station, flow, out)
        return None
    if isinstance(target, ForkNode):
        if not any(_reaches(b.steps[0], station) for b in target.branches):
            return None
        out.tokens.remove(placed)
        out.joins[id(target)] = 0
        found = None
        for branch in target.branches:
            child = Placed(branch.steps[0], forks=(*placed.forks, target))
            out.tokens.append(child)
            if found is None and _reaches(branch.steps[0], station):
                found = _enter(child, station, flow, out)
        return found
    return None


def _reaches(node: Node | None, station: str) -> bool:
    """Whether entering ``node`` can put a token at ``station`` straight away."""
    if isinstance(node, StationNode):
        return node.station == station
    if isinstance(node, RouteNode | ForkNode):
        return any(_reaches(b.steps[0], station) for b in node.branches)
    return False


def _advance(placed: Placed, where: Node | Join | Exit, out: Replayed) -> None:
    if isinstance(where, Exit):
        out.tokens.remove(placed)
        out.finished = True
    elif isinstance(where, Join):
        out.tokens.remove(placed)
        key = id(where.fork)
        out.joins[key] = out.joins.get(key, 0) + 1
        if out.joins[key] == len(where.fork.branches):
            del out.joins[key]
            joined = Placed(None, forks=placed.forks[:-1])
            out.tokens.append(joined)
            _advance(joined, next_after(where.fork), out)
    else:
        placed.target = where


def _released(flow: CompiledFlow, out: Replayed) -> None:
    """An operator released the unit from quarantine: it goes back in where it failed."""
    failed = flow.stations.get(out.failed_at)
    out.tokens = [Placed(resume_point(failed) if failed is not None else flow.root.steps[0])]
    out.joins.clear()
    out.rejected_at = ""
    out.attempts_at_release = dict(out.attempts)


def replay(
    flow: CompiledFlow, steps: list[StepLike], releases: Sequence[datetime] = ()
) -> Replayed:
    """Put a unit's tokens where its journalled ``steps`` (in order) and the operator's
    ``releases`` of it from quarantine leave them."""
    out = Replayed(tokens=[Placed(flow.root.steps[0])])
    pending = sorted(releases)
    for i, step in enumerate(steps):
        while pending and pending[0] <= step.commanded_at:
            pending.pop(0)
            _released(flow, out)
        if step.station not in flow.stations:
            raise ReplayError(f"step at unknown station '{step.station}'")
        # The token at this station: one heading there, or one done there earlier (a retry).
        tok = next(
            (
                found
                for p in list(out.tokens)
                if (found := _enter(p, step.station, flow, out)) is not None
            ),
            None,
        )
        if tok is None:
            raise ReplayError(f"step at '{step.station}' does not follow from the steps before it")
        out.attempts[step.station] = step.attempt
        tok.station, tok.slot, tok.seq, tok.attempt = (
            step.station,
            step.slot,
            step.seq,
            step.attempt,
        )
        is_open = step.status in ("commanded", "running")
        later = any(s.station != step.station for s in steps[i + 1 :])
        node = flow.stations[step.station]
        if is_open and later and _moved_on(step, steps[i + 1 :], flow):
            out.superseded.append(step)
            is_open, result = False, "pass"
        else:
            result = step.result
        if is_open:
            tok.target = None
            tok.open = True
        elif result == "pass":
            tok.open = False
            _advance(tok, next_after(node), out)
        elif result == "reject" and node.on_reject is not None:
            tok.open = False
            _advance(tok, node.on_reject, out)  # sent to rework, as the dispatcher does
        elif result == "reject":
            out.rejected_at = out.failed_at = step.station
            tok.target = None
        else:  # fault, refused, abandoned: the step is to be tried again
            if result != "refused":
                out.failed_at = step.station
            tok.open = False
            tok.station, tok.slot = "", None
            route = flow.route_of(step.station)
            first_of_branch = (
                route is not None and node.index == 0 and node.parent is route[0].branches[route[1]]
            )
            tok.target = route[0] if first_of_branch and route is not None else node
    for _ in pending:
        _released(flow, out)
    return out


def _moved_on(step: StepLike, later: list[StepLike], flow: CompiledFlow) -> bool:
    """Whether a later step shows the unit left ``step.station`` (not a sibling fork branch)."""
    node = flow.stations[step.station]
    after = next_after(node)
    for s in later:
        if isinstance(after, StationNode | RouteNode | ForkNode) and _reaches(after, s.station):
            return True
        if isinstance(after, Join):
            # Past the join: a later step beyond the fork proves every branch finished.
            beyond = next_after(after.fork)
            if isinstance(beyond, Node) and _reaches(beyond, s.station):
                return True
    return False


# --- putting the units back into a dispatcher -------------------------------------------------


def restore(d: Dispatcher, records: Sequence[Any], state: Any) -> list[tuple[Token, Slot]]:
    """Put the journal's open units (``records``, as the store's ``open_units`` gives them) and
    the operator's actions in force (``state``) back into ``d``; return the steps whose START
    must be settled with their PLC once it is connected."""
    _restore_operator_state(d, state)
    resumes: list[tuple[Token, Slot]] = []
    now = d.now()
    wall_now = d.wall(now)
    for rec in records:
        unit = Unit(rec.unit_id, rec.serial, d.clock.of_wall(rec.released_at))
        d.recovered += 1
        error: ReplayError | None = None
        try:
            placed: Replayed | None = replay(d.flow, list(rec.steps), rec.releases)
        except ReplayError as exc:
            placed, error = None, exc
        if rec.status == "quarantined":
            unit.status, unit.reason = "quarantined", rec.reason or ""
            if placed is not None:
                # So that a release after the restart goes back where it failed.
                unit.attempts = placed.attempts
                unit.attempts_at_release = placed.attempts_at_release
                failed = d.flow.stations.get(placed.failed_at)
                unit.resume = resume_point(failed) if failed is not None else None
            d.quarantined[unit.id] = unit
            continue
        d.units[unit.id] = unit
        if placed is None:
            d.quarantine(unit, f"cannot resume after restart: {error}", now)
            continue
        for step in placed.superseded:
            d.journal.step_finished(unit.id, step.station, step.attempt, wall_now, "pass")
        unit.attempts, unit.joins, unit.branches = placed.attempts, placed.joins, placed.branches
        unit.attempts_at_release = placed.attempts_at_release
        misplaced = [
            p
            for p in placed.tokens
            if p.station and p.slot is not None and p.slot >= d.stations[p.station].config.capacity
        ]
        if misplaced:
            p = misplaced[0]
            d.quarantine(
                unit,
                f"cannot resume after restart: it is in slot {p.slot} of '{p.station}', "
                f"which now has capacity {d.stations[p.station].config.capacity}",
                now,
            )
            continue
        if placed.finished:
            d.finish_unit(unit, now)
            continue
        for p in placed.tokens:
            tok = Token(unit, p.target, forks=p.forks, seq=p.seq, attempt=p.attempt)
            unit.tokens.append(tok)
            if p.station and p.slot is not None:
                slot = d.stations[p.station].slots[p.slot]
                slot.occupant, tok.slot, tok.station = tok, slot, p.station
                slot.next_seq = max(slot.next_seq, p.seq + 1)
                if p.open:
                    tok.phase = Phase.COMMANDED
                    slot.busy = True
                    resumes.append((tok, slot))
                else:
                    tok.phase = Phase.DONE
            if p.target is not None:
                d.want(tok)
        if placed.rejected_at:
            failed_tok = next((t for t in unit.tokens if t.station == placed.rejected_at), None)
            d.quarantine(unit, f"rejected at {placed.rejected_at}", now, failed=failed_tok)
    if d.recovered:
        log.info("resumed %d units in the line, %d in quarantine", len(d.units), len(d.quarantined))
    return resumes


def _restore_operator_state(d: Dispatcher, state: Any) -> None:
    """A paused line stays paused and a drained station stays drained across a restart."""
    d.paused = state.paused
    for name in sorted(state.out_of_service):
        if name in d.stations:
            d.stations[name].in_service = False
        else:
            log.warning(
                "station '%s' was taken out of service but is no longer in the config; "
                "ignoring that action",
                name,
            )
    if state.paused or state.out_of_service:
        log.info(
            "operator actions in force: %s",
            ", ".join(
                (["release paused"] if state.paused else [])
                + [f"'{n}' out of service" for n in sorted(state.out_of_service)]
            ),
        )
