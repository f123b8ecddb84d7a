"""The operator's offline TUF directory: root and targets keys, and the root and targets metadata they sign.

Layout (kept in CI secrets or on an offline machine, never on the control plane)::

    keys/root-1.key ... root-N.key       root keys (ed25519 PKCS#8, mode 0600); a threshold of them signs a root
    keys/targets-1.key ...               targets keys
    metadata/N.root.json                 every root version (the chain agents walk)
    metadata/N.targets.json              every targets version; the highest is uploaded

Root keys may be split across people: ``slmops keys tuf sign FILE --key K`` appends one signature, so a root
needing 2 of 3 is signed by two holders in turn. Everything here goes through :mod:`slmops.tuf.metadata`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from securesystemslib.signer import CryptoSigner, Key  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]

from slmops.errors import ConfigError, NotFoundError
from slmops.tuf import metadata as tufmd
from slmops.tuf.keys import create_key_file, key_from_dict, load_signer

__all__ = ["OfflineRepo"]

_VERSIONED = re.compile(r"^(\d+)\.(root|targets)\.json$")
OFFLINE_ROLES = ("root", "targets")


class OfflineRepo:
    def __init__(self, path: Path, expiry: tufmd.Expiry = tufmd.DEFAULT_EXPIRY) -> None:
        self.path = path
        self.expiry = expiry

    @property
    def key_dir(self) -> Path:
        return self.path / "keys"

    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    # ----------------------------------------------------------------------------------------------- reading

    def versions(self, role: str) -> list[int]:
        if not self.metadata_dir.is_dir():
            return []
        found = (_VERSIONED.match(p.name) for p in self.metadata_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m is not None and m.group(2) == role)

    def file(self, role: str, version: int) -> Path:
        return self.metadata_dir / f"{version}.{role}.json"

    def latest(self, role: str) -> Metadata[Any]:
        versions = self.versions(role)
        if not versions:
            raise NotFoundError(f"no {role} metadata in {self.metadata_dir}; run `slmops keys tuf init` first")
        return tufmd.parse(self.file(role, versions[-1]).read_bytes(), role)

    def signers(self, role: str) -> list[CryptoSigner]:
        if not self.key_dir.is_dir():
            return []
        return [load_signer(p) for p in sorted(self.key_dir.glob(f"{role}-*.key"))]

    # ----------------------------------------------------------------------------------------------- writing

    def _write(self, md: Metadata[Any]) -> Path:
        path = self.file(md.signed.type, md.signed.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(tufmd.to_bytes(md))
        os.replace(tmp, path)
        return path

    def _new_keys(self, role: str, count: int) -> list[CryptoSigner]:
        start = len(list(self.key_dir.glob(f"{role}-*.key"))) if self.key_dir.is_dir() else 0
        return [create_key_file(self.key_dir / f"{role}-{start + i + 1}.key") for i in range(count)]

    def init(
        self,
        online_keys: Mapping[str, Sequence[Mapping[str, Any]]],
        now: datetime,
        *,
        root_keys: int = 3,
        root_threshold: int = 2,
        targets_keys: int = 1,
        targets_threshold: int = 1,
    ) -> Metadata[Root]:
        """Create the offline keys, root v1 (signed by every new root key) and an empty targets v1."""
        if self.versions("root"):
            raise ConfigError(f"{self.metadata_dir} already holds a root; rotate keys with `slmops keys tuf rotate`")
        if not 1 <= root_threshold <= root_keys:
            raise ConfigError(f"the root threshold must be between 1 and --root-keys {root_keys}, got {root_threshold}")
        roots = self._new_keys("root", root_keys)
        targets = self._new_keys("targets", targets_keys)
        keys: dict[str, Sequence[Key]] = {
            "root": [s.public_key for s in roots],
            "targets": [s.public_key for s in targets],
            **_online(online_keys),
        }
        thresholds = {"root": root_threshold, "targets": targets_threshold}
        root = tufmd.sign(tufmd.new_root(keys, thresholds, now, self.expiry), roots)
        self._write(root)
        self._write(tufmd.sign(tufmd.new_targets(now, self.expiry), targets))
        return cast(Metadata[Root], root)

    def add_target(
        self, manifest_bytes: bytes, hardware_ids: Iterable[str], now: datetime, *, name: str = "", version: str = ""
    ) -> Metadata[Targets]:
        targets = cast(Metadata[Targets], self.latest("targets"))
        tufmd.add_target(targets, manifest_bytes, hardware_ids, name=name, version=version)
        return self._sign_targets(targets, now)

    def remove_target(self, manifest_digest: str, now: datetime) -> Metadata[Targets]:
        targets = cast(Metadata[Targets], self.latest("targets"))
        if not tufmd.remove_target(targets, manifest_digest):
            raise NotFoundError(f"{manifest_digest} is not a target of targets v{targets.signed.version}")
        return self._sign_targets(targets, now)

    def _sign_targets(self, targets: Metadata[Targets], now: datetime) -> Metadata[Targets]:
        signers = self.signers("targets")
        if not signers:
            raise ConfigError(f"no targets key in {self.key_dir}; sign with `slmops keys tuf sign --key KEY` instead")
        tufmd.bump(targets, now, self.expiry)
        self._write(tufmd.sign(targets, signers))
        return targets

    def renew(self, role: str, now: datetime) -> Metadata[Any]:
        """The next version of ``role`` (root or targets) with a fresh expiry, signed by the keys here."""
        if role not in OFFLINE_ROLES:
            raise ConfigError(f"only root and targets are renewed offline; the server re-signs {role} itself")
        md = self.latest(role)
        if role == "targets":
            return self._sign_targets(cast(Metadata[Targets], md), now)
        tufmd.bump(md, now, self.expiry)
        self._write(tufmd.sign(md, self.signers("root")))
        return md

    def rotate(
        self, role: str, now: datetime, *, online_keys: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
    ) -> Metadata[Root]:
        """Root v+1 with new keys for ``role`` (new files for root/targets; ``online_keys`` for snapshot/timestamp),
        signed by the old and the new root keys found here."""
        root = cast(Metadata[Root], self.latest("root"))
        old_root_signers = self.signers("root")
        if role in OFFLINE_ROLES:
            for path in sorted(self.key_dir.glob(f"{role}-*.key")):
                path.rename(path.with_name(f"retired-v{root.signed.version}-{path.name}"))
            new_keys: list[Key] = [s.public_key for s in self._new_keys(role, len(root.signed.roles[role].keyids))]
        elif online_keys is not None and role in online_keys:
            new_keys = list(_online({role: online_keys[role]})[role])
        else:
            raise ConfigError(f"rotating the {role} keys needs --online-keys with the new {role} public keys")
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        for key in new_keys:
            root.signed.add_key(key, role)
        tufmd.bump(root, now, self.expiry)
        tufmd.sign(root, old_root_signers + (self.signers("root") if role == "root" else []))
        self._write(root)
        return root

    def sign_file(self, path: Path, key_files: Iterable[Path]) -> Metadata[Any]:
        """Append signatures by ``key_files`` to the metadata at ``path`` (a root signed by several holders)."""
        md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
        tufmd.sign(md, [load_signer(k) for k in key_files])
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(tufmd.to_bytes(md))
        os.replace(tmp, path)
        return md


def _online(online_keys: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[Key]]:
    keys: dict[str, list[Key]] = {}
    for role in ("snapshot", "timestamp"):
        entries = online_keys.get(role)
        if not entries:
            raise ConfigError(
                f"the online keys name no {role} key; save `slmops keys tuf online-keys > online.json` from the server"
            )
        keys[role] = [key_from_dict(dict(entry)) for entry in entries]
    return keys
