from __future__ import annotations

import pytest

from slmops.core.device_profiles import DEVICE_PROFILES, DeviceProfile, get_profile
from slmops.errors import NotFoundError

GiB = 1 << 30


def test_the_shipped_profiles_are_the_documented_device_classes() -> None:
    gateway = get_profile("gateway-2gb")
    assert gateway == DeviceProfile("gateway-2gb", 2, 2 * GiB, DEVICE_PROFILES["gateway-2gb"].description)
    assert (get_profile("pi5-8gb").threads, get_profile("pi5-8gb").memory_bytes) == (4, 8 * GiB)
    assert (get_profile("laptop-16gb").threads, get_profile("laptop-16gb").memory_bytes) == (8, 16 * GiB)


def test_an_unknown_class_names_the_known_ones() -> None:
    with pytest.raises(NotFoundError, match=r"unknown device class 'phone'.*gateway-2gb, laptop-16gb, pi5-8gb"):
        get_profile("phone")


@pytest.mark.parametrize(("threads", "memory"), [(0, GiB), (2, 0)])
def test_a_profile_needs_threads_and_memory(threads: int, memory: int) -> None:
    with pytest.raises(ValueError):
        DeviceProfile("x", threads, memory)
