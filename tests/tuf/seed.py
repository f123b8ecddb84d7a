"""Turn TUF on in a test control plane: offline roles made in a temporary directory, uploaded as an operator would.

For tests outside ``tests/tuf`` that need the ``/api/v1/tuf`` operations to answer 200 (the OpenAPI fuzzing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmops.control import tuf_repository
from slmops.control.plane import ControlPlane
from slmops.core.manifest import SignedManifest
from slmops.tuf.offline import OfflineRepo


@dataclass(frozen=True)
class SeededTuf:
    offline: OfflineRepo
    target_name: str  # "<hex>.json" under /tuf/targets/manifests/


def seed_tuf(plane: ControlPlane, directory: Path, envelopes: list[SignedManifest], hardware_id: str) -> SeededTuf:
    now = plane.clock()
    offline = OfflineRepo(directory)
    offline.init(tuf_repository.online_public_keys(plane), now, root_keys=3, root_threshold=2)
    for envelope in envelopes:
        offline.add_target(envelope.manifest.canonical(), [hardware_id], now)
    tuf_repository.upload_root(plane, offline.file("root", 1).read_bytes())
    tuf_repository.upload_targets(plane, offline.file("targets", offline.versions("targets")[-1]).read_bytes())
    return SeededTuf(offline, envelopes[0].digest.removeprefix("sha256:") + ".json")
