"""A device class's limits, enforced on a real process by the operating system.

A test-matrix agent runs under what its class has, not under what this machine has:

==========  =====================================================================================================
limit       how, in order of preference (:func:`detect` says which one this host allows)
==========  =====================================================================================================
memory      a cgroup of its own with ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes`` (cgroup v1): the
            kernel counts every page of the process tree (heap, mapped model file, page cache) and kills the tree
            when it goes over; else ``prlimit --as``: a cap on each process's *virtual* address space, so an
            allocation beyond it fails (``MemoryError``) rather than being killed, and mapped-but-untouched pages
            count too (it over-enforces); else nothing, and the report says so
cpu         ``taskset -c 0..N-1``: the process tree runs on the first N cores only (capped at this machine's cores)
disk        the agent's data directory is a size-limited ``tmpfs`` mount (needs CAP_SYS_ADMIN); else an ordinary
            directory and the report says disk was not enforced
==========  =====================================================================================================

:class:`Confinement` sets these up around one ``argv`` and tears them down; every number it reports (peak memory,
whether the cap was hit) comes from the kernel's own counters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Confinement", "Enforcement", "detect"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Enforcement:
    """What this host can enforce: memory ``cgroup2 | cgroup1 | prlimit-as | none``, cpu ``taskset | none``, disk
    ``tmpfs | none``; ``cgroup_parent`` is the directory new cgroups are made in."""

    memory: str
    cpu: str
    disk: str
    cgroup_parent: Path | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "memory": self.memory,
            "cpu": self.cpu,
            "disk": self.disk,
            "cgroup_parent": str(self.cgroup_parent) if self.cgroup_parent else None,
            "notes": list(self.notes),
        }


def _own_cgroup_v1(controller: str) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return CGROUP_ROOT / controller / parts[2].lstrip("/")
    return None


def _writable_dir(parent: Path) -> bool:
    probe = parent / f"slmops-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


def _memory(notes: list[str]) -> tuple[str, Path | None]:
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split() and _writable_dir(CGROUP_ROOT):
        subtree = CGROUP_ROOT / "cgroup.subtree_control"
        try:
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory")
            return "cgroup2", CGROUP_ROOT
        except OSError as exc:
            notes.append(f"cgroup v2 memory controller not delegable: {exc}")
    own = _own_cgroup_v1("memory")
    if own is not None and (own / "memory.limit_in_bytes").exists() and _writable_dir(own):
        return "cgroup1", own
    if shutil.which("prlimit"):
        notes.append("no writable memory cgroup: prlimit --as caps virtual address space per process instead")
        return "prlimit-as", None
    notes.append("no writable memory cgroup and no prlimit: memory is NOT enforced")
    return "none", None


def _disk(notes: list[str]) -> str:
    if os.geteuid() != 0 or not shutil.which("mount"):
        notes.append("not root: the agent's disk is an ordinary directory, disk quota NOT enforced")
        return "none"
    return "tmpfs"


def detect() -> Enforcement:
    """Which limits this host can enforce (probes by trying: makes and removes an empty cgroup)."""
    notes: list[str] = []
    memory, parent = _memory(notes)
    cpu = "taskset" if shutil.which("taskset") else "none"
    if cpu == "none":
        notes.append("no taskset: the CPU set is NOT enforced")
    return Enforcement(memory, cpu, _disk(notes), parent, tuple(notes))


@dataclass
class Confinement:
    """The limits of one class around one process tree: :meth:`setup`, :meth:`wrap` its argv, :meth:`teardown`."""

    enforcement: Enforcement
    memory_bytes: int
    cores: int
    disk_bytes: int | None
    data_dir: Path
    cgroup: Path | None = None
    mounted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_list(self) -> str:
        available = max(1, os.cpu_count() or 1)
        if self.cores > available:
            self.notes.append(f"class has {self.cores} cores, this machine {available}: capped at {available}")
        return f"0-{min(self.cores, available) - 1}"

    def setup(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.disk_bytes is not None and self.enforcement.disk == "tmpfs":
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.disk_bytes},mode=0700", "tmpfs", str(self.data_dir)],
                capture_output=True,
                text=True,
                check=False,
            )
            self.mounted = done.returncode == 0
            if not self.mounted:
                self.notes.append(f"tmpfs mount refused ({done.stderr.strip()}): disk quota NOT enforced")
        parent = self.enforcement.cgroup_parent
        if self.enforcement.memory in ("cgroup2", "cgroup1") and parent is not None:
            self.cgroup = parent / f"slmops-matrix-{uuid.uuid4().hex[:12]}"
            self.cgroup.mkdir()
            if self.enforcement.memory == "cgroup2":
                (self.cgroup / "memory.max").write_text(str(self.memory_bytes))
                (self.cgroup / "memory.swap.max").write_text("0")
            else:
                (self.cgroup / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
                swap = self.cgroup / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    try:
                        swap.write_text(str(self.memory_bytes))
                    except OSError:
                        self.notes.append("swap not capped (memory.memsw.limit_in_bytes refused)")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the limits: in the cgroup (a shell joins it, then execs), under taskset/prlimit."""
        wrapped = list(argv)
        if self.enforcement.memory == "prlimit-as":
            wrapped = ["prlimit", f"--as={self.memory_bytes}", "--", *wrapped]
        if self.enforcement.cpu == "taskset":
            wrapped = ["taskset", "-c", self.cpu_list, *wrapped]
        if self.cgroup is not None:
            procs = self.cgroup / "cgroup.procs"
            wrapped = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *wrapped]
        return wrapped

    def peak_memory_bytes(self) -> int | None:
        """The cgroup's peak charge (every page of the tree), when a cgroup is used."""
        if self.cgroup is None:
            return None
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.cgroup / name).read_text().strip())
            except (OSError, ValueError):
                continue
        return None

    def memory_cap_hit(self) -> bool:
        """Whether the kernel refused or reclaimed at the cap (an OOM kill, or failed charges)."""
        if self.cgroup is None:
            return False
        events = self.cgroup / "memory.events"
        try:
            if events.exists():
                counts = dict(line.split() for line in events.read_text().splitlines() if line.strip())
                return int(counts.get("oom_kill", "0")) > 0 or int(counts.get("max", "0")) > 0
            oom = dict(line.split() for line in (self.cgroup / "memory.oom_control").read_text().splitlines() if line)
            failures = int((self.cgroup / "memory.failcnt").read_text().strip())
            peak = int((self.cgroup / "memory.max_usage_in_bytes").read_text().strip())
            return int(oom.get("oom_kill", "0")) > 0 or failures > 0 or peak >= self.memory_bytes
        except (OSError, ValueError):
            return False

    def describe(self) -> dict[str, object]:
        return {
            "memory": f"{self.enforcement.memory} cap {self.memory_bytes} bytes"
            if self.enforcement.memory != "none"
            else "not enforced",
            "cpu": f"taskset -c {self.cpu_list}" if self.enforcement.cpu == "taskset" else "not enforced",
            "disk": f"tmpfs size={self.disk_bytes}"
            if self.mounted
            else ("not enforced" if self.disk_bytes is not None else "no quota set"),
            "notes": list(self.notes),
        }

    def teardown(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):  # a process still in it: the kernel keeps a non-empty cgroup
                self.cgroup.rmdir()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.data_dir)], capture_output=True, check=False)
            self.mounted = False
