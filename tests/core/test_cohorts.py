from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.core.cohorts import members_with_history, rollout_position, stage_members, stage_quota
from slmops.errors import ConfigError

CLASSES = ("x86_64-8gb", "aarch64-2gb", "aarch64-4gb-npu", "x86_64-16gb-cuda")

fleets = st.dictionaries(st.text(min_size=1, max_size=12), st.sampled_from(CLASSES), max_size=60)
fractions = st.floats(0.0, 1.0)
releases = st.text(max_size=12)
min_per = st.integers(0, 3)


def _ranked(fleet: dict[str, str], cls: str, release: str) -> list[str]:
    ids = [d for d, c in fleet.items() if c == cls]
    return sorted(ids, key=lambda d: (rollout_position(d, release), d))


@given(st.text(), releases)
def test_position_is_deterministic_and_in_unit_interval(device: str, release: str) -> None:
    position = rollout_position(device, release)

    assert 0.0 <= position < 1.0
    assert position == rollout_position(device, release)


def test_positions_are_spread_evenly_and_differ_per_release() -> None:
    ids = [f"dev-{i}" for i in range(4000)]

    quartiles = [0, 0, 0, 0]
    for d in ids:
        quartiles[int(rollout_position(d, "rel-1") * 4)] += 1
    first_a = set(sorted(ids, key=lambda d: rollout_position(d, "rel-1"))[:40])
    first_b = set(sorted(ids, key=lambda d: rollout_position(d, "rel-2"))[:40])

    assert all(850 <= q <= 1150 for q in quartiles), quartiles  # 1000 +- ~5.5 sd
    assert len(first_a & first_b) < 10  # expected overlap 0.4: a new release picks new canaries
    assert rollout_position("ab", "c") != rollout_position("a", "bc")


@given(fleets, releases, fractions, min_per)
def test_membership_is_deterministic_and_matches_the_quota(
    fleet: dict[str, str], release: str, fraction: float, min_per_class: int
) -> None:
    members = stage_members(fleet, release, fraction, min_per_class=min_per_class)

    assert members == stage_members(dict(reversed(list(fleet.items()))), release, fraction, min_per_class=min_per_class)
    for cls in CLASSES:
        ranked = _ranked(fleet, cls, release)
        quota = stage_quota(len(ranked), fraction, min_per_class=min_per_class)
        assert members & set(ranked) == set(ranked[:quota])


@given(fleets, releases, fractions, fractions, min_per)
def test_membership_only_grows_with_the_fraction(
    fleet: dict[str, str], release: str, a: float, b: float, min_per_class: int
) -> None:
    low, high = sorted((a, b))

    assert stage_members(fleet, release, low, min_per_class=min_per_class) <= stage_members(
        fleet, release, high, min_per_class=min_per_class
    )


@given(fleets, releases, st.floats(0.0, 1.0, exclude_min=True), min_per)
def test_every_class_gets_canaries(fleet: dict[str, str], release: str, fraction: float, min_per_class: int) -> None:
    members = stage_members(fleet, release, fraction, min_per_class=min_per_class)

    for cls in set(fleet.values()):
        n = sum(1 for c in fleet.values() if c == cls)
        in_class = sum(1 for d in members if fleet[d] == cls)
        assert in_class >= min(min_per_class, n)
        assert in_class >= 1 or min_per_class == 0
        assert in_class >= fraction * n


@given(fleets, releases, min_per)
def test_everyone_at_one_and_no_one_at_zero(fleet: dict[str, str], release: str, min_per_class: int) -> None:
    assert stage_members(fleet, release, 1.0, min_per_class=min_per_class) == set(fleet)
    assert stage_members(fleet, release, 0.0, min_per_class=min_per_class) == set()


def test_a_tiny_stage_still_reaches_a_small_class() -> None:
    fleet = {f"big-{i}": "x86_64-8gb" for i in range(1000)} | {f"small-{i}": "aarch64-2gb" for i in range(20)}

    members = stage_members(fleet, "rel-7", 0.01)

    assert sum(1 for d in members if d.startswith("big-")) == 10
    assert sum(1 for d in members if d.startswith("small-")) == 1


@given(fleets, releases, fractions, min_per, st.text(min_size=13, max_size=16), st.sampled_from(CLASSES))
def test_a_join_evicts_at_most_the_last_member_and_only_when_the_quota_stays(
    fleet: dict[str, str], release: str, fraction: float, min_per_class: int, newcomer: str, cls: str
) -> None:
    # newcomer ids are longer than fleet ids, so they are new devices
    before = stage_members(fleet, release, fraction, min_per_class=min_per_class)
    grown = fleet | {newcomer: cls}
    after = stage_members(grown, release, fraction, min_per_class=min_per_class)

    evicted = before - after
    old_ranked = _ranked(fleet, cls, release)
    n = len(old_ranked)
    old_quota = stage_quota(n, fraction, min_per_class=min_per_class)
    new_quota = stage_quota(n + 1, fraction, min_per_class=min_per_class)
    newcomer_rank = _ranked(grown, cls, release).index(newcomer)
    assert new_quota - old_quota in (0, 1)
    assert {d for d in before if fleet[d] != cls} == {d for d in after if d != newcomer and grown[d] != cls}
    should_evict = newcomer_rank < old_quota and new_quota == old_quota
    assert evicted == ({old_ranked[old_quota - 1]} if should_evict else set())


def test_a_join_can_evict_a_member_counterexample() -> None:
    fleet = {"a": "c", "b": "c", "d": "c"}
    before = stage_members(fleet, "rel", 0.5)
    lowest = min(rollout_position(d, "rel") for d in fleet)
    newcomer = next(f"x{i}" for i in itertools.count() if rollout_position(f"x{i}", "rel") < lowest)

    after = stage_members(fleet | {newcomer: "c"}, "rel", 0.5)

    assert len(before) == len(after) == 2
    assert newcomer in after
    assert len(before - after) == 1  # a member at 50% is out at 50% after the fleet grew
    assert members_with_history(fleet | {newcomer: "c"}, "rel", 0.5, before) >= before


@given(fleets, releases, fractions, min_per, st.data())
def test_a_leave_evicts_at_most_one_other_member(
    fleet: dict[str, str], release: str, fraction: float, min_per_class: int, data: st.DataObject
) -> None:
    if not fleet:
        return
    leaver = data.draw(st.sampled_from(sorted(fleet)))
    before = stage_members(fleet, release, fraction, min_per_class=min_per_class)
    shrunk = {d: c for d, c in fleet.items() if d != leaver}

    after = stage_members(shrunk, release, fraction, min_per_class=min_per_class)

    assert len((before - {leaver}) - after) <= 1


@given(fleets, releases, st.lists(fractions, min_size=1, max_size=5), st.lists(st.text(min_size=13), max_size=5))
def test_history_keeps_every_member_that_is_still_in_the_fleet(
    fleet: dict[str, str], release: str, stages: list[float], joiners: list[str]
) -> None:
    recorded: set[str] = set()
    current = dict(fleet)
    for i, fraction in enumerate(sorted(stages)):
        members = members_with_history(current, release, fraction, recorded)
        assert recorded <= members
        recorded = members
        if i < len(joiners):
            current[joiners[i]] = CLASSES[i % len(CLASSES)]


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), float("inf")])
def test_invalid_fraction_is_a_config_error(fraction: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stage_members({"a": "c"}, "rel", fraction)


def test_negative_min_per_class_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_per_class"):
        stage_quota(3, 0.5, min_per_class=-1)
