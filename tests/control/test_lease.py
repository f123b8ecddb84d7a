"""The database lease that lets one server replica run a singleton job, on every database backend."""

from __future__ import annotations

from slmops.control.lease import Lease, acquire_lease, current_lease, release_lease
from slmops.control.plane import ControlPlane


def test_acquire_lease_is_exclusive(plane: ControlPlane) -> None:
    assert acquire_lease(plane.engine, "job", "a", 10, now=100.0)
    assert not acquire_lease(plane.engine, "job", "b", 10, now=105.0)
    assert acquire_lease(plane.engine, "job", "a", 10, now=109.0)  # renewed until 119
    assert not acquire_lease(plane.engine, "job", "b", 10, now=118.0)
    assert acquire_lease(plane.engine, "job", "b", 10, now=120.0)
    assert not acquire_lease(plane.engine, "job", "a", 10, now=121.0)


def test_a_lease_handed_back_can_be_taken_at_once(plane: ControlPlane) -> None:
    assert acquire_lease(plane.engine, "job", "a", 10, now=100.0)
    release_lease(plane.engine, "job", "b")  # not the holder: nothing changes
    assert not acquire_lease(plane.engine, "job", "b", 10, now=101.0)
    release_lease(plane.engine, "job", "a")
    assert acquire_lease(plane.engine, "job", "b", 10, now=102.0)


def test_the_lease_row_says_who_holds_it_since_when(plane: ControlPlane) -> None:
    assert current_lease(plane.engine, "job") is None
    assert acquire_lease(plane.engine, "job", "a", 10, now=100.0)
    assert acquire_lease(plane.engine, "job", "a", 10, now=105.0)  # a renewal keeps acquired_at
    assert current_lease(plane.engine, "job") == Lease("job", "a", acquired_at=100.0, expires_at=115.0)
    assert acquire_lease(plane.engine, "job", "b", 10, now=116.0)  # a takeover sets it
    assert current_lease(plane.engine, "job") == Lease("job", "b", acquired_at=116.0, expires_at=126.0)
