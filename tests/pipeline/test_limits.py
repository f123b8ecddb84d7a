"""A class's limits, enforced by this host's kernel on a real child process (skipped where the host cannot)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.pipeline.limits import Confinement, Enforcement, detect

MIB = 1 << 20
_ALLOCATE = (
    "b = []\nfor _ in range(30): b.append(bytearray(8 << 20)); b[-1][::4096] = b'x' * len(b[-1][::4096])\nprint('done')"
)


def _confine(tmp_path: Path, enforcement: Enforcement, **kwargs: object) -> Confinement:
    values: dict[str, object] = {"memory_bytes": 64 * MIB, "cores": 1, "disk_bytes": None, "data_dir": tmp_path / "d"}
    values.update(kwargs)
    confinement = Confinement(enforcement, **values)  # type: ignore[arg-type]
    confinement.setup()
    return confinement


def test_a_memory_cgroup_kills_a_process_tree_that_outgrows_the_class(tmp_path: Path) -> None:
    limits = detect()
    if limits.memory not in ("cgroup1", "cgroup2"):
        pytest.skip(f"no writable memory cgroup here ({limits.memory})")
    confinement = _confine(tmp_path, Enforcement(limits.memory, "none", "none", limits.cgroup_parent))
    try:
        done = subprocess.run(confinement.wrap([sys.executable, "-c", _ALLOCATE]), capture_output=True, check=False)

        assert done.returncode == -9 and b"done" not in done.stdout  # 240 MiB asked, 64 MiB allowed: SIGKILL
        assert confinement.memory_cap_hit()
        peak = confinement.peak_memory_bytes()
        assert peak is not None and 56 * MIB <= peak <= 64 * MIB
    finally:
        confinement.teardown()
    assert confinement.cgroup is not None and not confinement.cgroup.exists()


def test_prlimit_caps_the_address_space_so_the_allocation_fails(tmp_path: Path) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit")
    confinement = _confine(tmp_path, Enforcement("prlimit-as", "none", "none"), memory_bytes=200 * MIB)

    done = subprocess.run(confinement.wrap([sys.executable, "-c", _ALLOCATE]), capture_output=True, check=False)

    assert done.returncode == 1 and b"MemoryError" in done.stderr


def test_taskset_pins_the_process_to_the_class_cores(tmp_path: Path) -> None:
    if shutil.which("taskset") is None:
        pytest.skip("no taskset")
    confinement = _confine(tmp_path, Enforcement("none", "taskset", "none"), cores=1)
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"

    done = subprocess.run(confinement.wrap([sys.executable, "-c", probe]), capture_output=True, text=True, check=True)

    assert done.stdout.strip() == "[0]"


def test_the_data_directory_is_a_filesystem_of_the_class_disk_size(tmp_path: Path) -> None:
    if detect().disk != "tmpfs":
        pytest.skip("cannot mount here")
    confinement = _confine(tmp_path, Enforcement("none", "none", "tmpfs"), disk_bytes=4 * MIB)
    if not confinement.mounted:
        pytest.skip(f"tmpfs mount refused: {confinement.notes}")
    try:
        with pytest.raises(OSError, match="No space left"), open(confinement.data_dir / "big", "wb") as handle:
            handle.write(b"\0" * (5 * MIB))
            handle.flush()
        assert confinement.describe()["disk"] == f"tmpfs size={4 * MIB}"
    finally:
        confinement.teardown()
    assert not confinement.mounted
