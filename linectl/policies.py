"""Balancing policies: which branch of a route a unit goes to. Pure functions of the line's state.

``choose`` never changes anything, so the dispatcher may ask again and again while it waits for
room; ``commit`` advances the policy's own state once the unit really enters the branch. That
keeps ``round_robin`` and ``weighted`` exact: a unit waits for its turn's branch rather than
taking whichever is free, so each branch gets exactly the share the policy promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BranchView:
    """What a policy may know of one branch."""

    available: bool  # every station in it is connected, not faulted and in service
    load: int = 0  # units in, or committed to, the branch
    expected_s: float = 0.0  # expected time for one more unit to get through it


@dataclass(frozen=True, slots=True)
class RouteState:
    """A policy's memory between choices (round-robin pointer, smooth weighted credits)."""

    next_rr: int = 0
    credit: tuple[float, ...] = field(default_factory=tuple)


def _rotation(i: int, state: RouteState, n: int) -> int:
    return (i - state.next_rr) % n


def choose(
    policy: str,
    branches: Sequence[BranchView],
    state: RouteState,
    weights: Sequence[float] | None = None,
) -> int | None:
    """The branch the next unit should take, or None when no branch is available."""
    n = len(branches)
    candidates = [i for i, b in enumerate(branches) if b.available]
    if not candidates:
        return None
    if policy == "round_robin":
        return min(candidates, key=lambda i: _rotation(i, state, n))
    if policy == "least_loaded":
        return min(candidates, key=lambda i: (branches[i].load, _rotation(i, state, n)))
    if policy == "shortest_expected":
        return min(candidates, key=lambda i: (branches[i].expected_s, _rotation(i, state, n)))
    if policy == "weighted":
        assert weights is not None, "config validation guarantees weights for 'weighted'"
        credit = _credits(state, n)
        candidates = [i for i in candidates if weights[i] > 0] or candidates
        return max(candidates, key=lambda i: (credit[i] + weights[i], -i))
    raise ValueError(f"unknown balancing policy {policy!r}")


def commit(
    policy: str,
    state: RouteState,
    chosen: int,
    branches: Sequence[BranchView],
    weights: Sequence[float] | None = None,
) -> RouteState:
    """The policy's state after a unit entered branch ``chosen``."""
    n = len(branches)
    next_rr = (chosen + 1) % n
    if policy != "weighted":
        return RouteState(next_rr, state.credit)
    assert weights is not None
    # Smooth weighted round robin (as nginx balances upstreams): every available branch earns
    # its weight, the chosen one pays the total. Over any window the shares follow the weights.
    credit = list(_credits(state, n))
    live = [i for i, b in enumerate(branches) if b.available and weights[i] > 0] or [chosen]
    for i in live:
        credit[i] += weights[i]
    credit[chosen] -= sum(weights[i] for i in live)
    return RouteState(next_rr, tuple(credit))


def _credits(state: RouteState, n: int) -> tuple[float, ...]:
    return state.credit if len(state.credit) == n else (0.0,) * n
