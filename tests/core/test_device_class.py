from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slmops.core.device_class import device_class, memory_tier_gib
from slmops.core.wire import Capabilities

GiB = 1 << 30


def _caps(memory: int, arch: str = "x86_64", accelerator: str | None = None) -> Capabilities:
    return Capabilities(memory_bytes=memory, disk_free_bytes=0, cpu_cores=1, arch=arch, accelerator=accelerator)


def test_examples() -> None:
    assert device_class(_caps(2 * GiB)) == "x86_64-2gb"
    assert device_class(_caps(int(7.7 * GiB), "arm64")) == "aarch64-8gb"  # "8 GB" that reports a bit less
    assert device_class(_caps(int(6.5 * GiB))) == "x86_64-4gb"
    assert device_class(_caps(16 * GiB, accelerator="CUDA")) == "x86_64-16gb-cuda"
    assert device_class(_caps(512 << 20, "")) == "unknown-sub1gb"


@given(st.integers(0, 2048 * GiB), st.integers(0, 2048 * GiB))
def test_more_memory_never_means_a_lower_tier(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert memory_tier_gib(low) <= memory_tier_gib(high)


@given(st.integers(0, 2048 * GiB), st.text(max_size=40), st.none() | st.text(max_size=20))
def test_class_names_are_deterministic_and_safe(memory: int, arch: str, accelerator: str | None) -> None:
    name = device_class(_caps(memory, arch, accelerator))

    assert name == device_class(_caps(memory, arch, accelerator))
    assert name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    tier = memory_tier_gib(memory)
    assert (f"-{tier}gb" if tier else "-sub1gb") in name
