"""What this device is: RAM, free disk, cores, CPU flags, accelerator presence, OS and architecture.

Measured from the machine (psutil, ``/proc/cpuinfo``, ``/dev``), with overrides for tests and demos that simulate
smaller or bigger devices: explicit values, or a JSON file with any :class:`~slmops.core.wire.Capabilities` fields.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slmops.core.wire import Capabilities
from slmops.errors import ConfigError
from slmops.runtime.backends import installed_runtimes

__all__ = ["INTERESTING_FLAGS", "cpu_flags", "detect_accelerator", "measure_capabilities"]

INTERESTING_FLAGS = ("avx", "avx2", "avx512f", "avx512bw", "avx512vl", "fma", "f16c", "neon", "asimd", "sve", "amx")


def cpu_flags(cpuinfo: str) -> list[str]:
    """The flags we care about, from the text of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words = set(value.split())
            found |= {flag for flag in INTERESTING_FLAGS if flag in words}
            if any(word.startswith("amx") for word in words):
                found.add("amx")
    if "asimd" in found:
        found.add("neon")  # aarch64 always has NEON; the kernel calls it asimd
    return sorted(found)


def detect_accelerator(dev: Path = Path("/dev")) -> str | None:
    """A GPU we can see, without claiming we can use it: ``cuda?`` for an NVIDIA device, ``gpu?`` for a DRM node."""
    if (dev / "nvidia0").exists():
        return "cuda?"
    dri = dev / "dri"
    if dri.is_dir() and any(entry.name.startswith("renderD") for entry in dri.iterdir()):
        return "gpu?"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def measure_capabilities(
    data_dir: Path,
    *,
    memory_bytes: int | None = None,
    cpu_cores: int | None = None,
    capabilities_file: Path | None = None,
    probe_decode_tokens_per_s: float | None = None,
    extra_overrides: Iterable[tuple[str, Any]] = (),
) -> Capabilities:
    import psutil

    values: dict[str, Any] = {
        "memory_bytes": int(psutil.virtual_memory().total),
        "disk_free_bytes": int(shutil.disk_usage(data_dir).free),
        "cpu_cores": os.cpu_count() or 1,
        "cpu_flags": cpu_flags(_read(Path("/proc/cpuinfo"))),
        "accelerator": detect_accelerator(),
        "os": f"{platform.system().lower()} {platform.release()}".strip(),
        "arch": platform.machine(),
        "probe_decode_tokens_per_s": probe_decode_tokens_per_s,
        "runtimes": installed_runtimes(),
    }
    if capabilities_file is not None:
        try:
            loaded = json.loads(capabilities_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the capabilities file {capabilities_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"the capabilities file {capabilities_file} must hold a JSON object of capability fields")
        values.update(loaded)
    if memory_bytes is not None:
        values["memory_bytes"] = memory_bytes
    if cpu_cores is not None:
        values["cpu_cores"] = cpu_cores
    values.update(dict(extra_overrides))
    try:  # lax: the operator's JSON file may say 8e9 or "4"; the wire models are strict
        return Capabilities.model_validate(values, strict=False)
    except ValidationError as exc:
        raise ConfigError(
            f"capability overrides are not valid: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc']})"
        ) from None
