"""Balancing policies are pure functions of the line's state: what they promise, in any state."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from linectl.policies import BranchView, RouteState, choose, commit

views = st.lists(
    st.builds(
        BranchView,
        available=st.booleans(),
        load=st.integers(0, 10),
        expected_s=st.floats(0, 1000, allow_nan=False),
    ),
    min_size=1,
    max_size=6,
)
POLICIES = ["round_robin", "least_loaded", "shortest_expected", "weighted"]


def run(policy: str, branches: list[BranchView], n: int, weights=None) -> Counter[int]:
    state, picks = RouteState(), Counter()
    for _ in range(n):
        b = choose(policy, branches, state, weights)
        assert b is not None
        picks[b] += 1
        state = commit(policy, state, b, branches, weights)
    return picks


@given(views, st.sampled_from(POLICIES), st.data())
def test_a_policy_never_picks_an_unavailable_branch_and_picks_none_only_when_all_are(
    branches, policy, data
):
    weights = data.draw(
        st.lists(st.floats(0.1, 10), min_size=len(branches), max_size=len(branches))
    )
    pick = choose(policy, branches, RouteState(), weights)
    if any(b.available for b in branches):
        assert pick is not None and branches[pick].available
    else:
        assert pick is None


@given(st.integers(1, 6), st.integers(1, 20))
def test_round_robin_gives_every_branch_the_same_share(n_branches, rounds):
    picks = run("round_robin", [BranchView(True)] * n_branches, n_branches * rounds)
    assert set(picks.values()) == {rounds}


@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(1, 10))
def test_weighted_gives_each_branch_its_weight_over_every_full_cycle(weights, cycles):
    """Smooth weighted round robin: over sum(weights) picks, branch i gets exactly weights[i]."""
    branches = [BranchView(True)] * len(weights)
    picks = run("weighted", branches, sum(weights) * cycles, [float(w) for w in weights])
    assert [picks[i] for i in range(len(weights))] == [w * cycles for w in weights]


def test_weighted_interleaves_rather_than_bursting():
    branches = [BranchView(True)] * 2
    state, order = RouteState(), []
    for _ in range(8):
        b = choose("weighted", branches, state, [3.0, 1.0])
        order.append(b)
        state = commit("weighted", state, b, branches, [3.0, 1.0])
    assert order == [0, 0, 1, 0, 0, 0, 1, 0]


def test_weighted_skips_a_branch_that_is_down_and_takes_it_back_when_up():
    up = [BranchView(True), BranchView(True)]
    down = [BranchView(True), BranchView(False)]
    picks = run("weighted", down, 10, [1.0, 1.0])
    assert picks == {0: 10}
    assert run("weighted", up, 10, [1.0, 1.0]) == {0: 5, 1: 5}


@given(views)
def test_least_loaded_picks_a_branch_with_the_fewest_units(branches):
    pick = choose("least_loaded", branches, RouteState())
    live = [b for b in branches if b.available]
    if live:
        assert branches[pick].load == min(b.load for b in live)


@given(views)
def test_shortest_expected_picks_the_earliest_expected_completion(branches):
    pick = choose("shortest_expected", branches, RouteState())
    live = [b for b in branches if b.available]
    if live:
        assert branches[pick].expected_s == min(b.expected_s for b in live)


def test_ties_rotate_so_equal_branches_share_work():
    picks = run("least_loaded", [BranchView(True)] * 3, 9)
    assert picks == {0: 3, 1: 3, 2: 3}
