"""A static TUF repository built with :mod:`slmops.tuf.metadata`, served by a real HTTP server on loopback.

In the spirit of python-tuf's ``tests/repository_simulator.py``: the repository holds the signers of every role,
publishes consistent-snapshot files (``N.root.json``, ``N.snapshot.json``, ``N.targets.json``, ``timestamp.json``,
``targets/manifests/<hex>.json``) into a dict, and the server can misbehave per path: serve an old copy, cut the
connection after some bytes, or stream far more bytes than the metadata declares.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Targets

from slmops.tuf import metadata as tufmd


@dataclass
class Misbehave:
    cut_after: int | None = None  # close the connection after this many body bytes (once per `cuts`)
    cuts: int = 1
    endless: bool = False  # stream bytes without a Content-Length until the client goes away


@dataclass
class Repo:
    now: datetime
    root_keys: int = 3
    root_threshold: int = 2
    signers: dict[str, list[CryptoSigner]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    root: Metadata[Root] = field(init=False)
    targets: Metadata[Targets] = field(init=False)
    snapshot_version: int = 0
    timestamp_version: int = 0

    def __post_init__(self) -> None:
        counts = {"root": self.root_keys, "targets": 1, "snapshot": 1, "timestamp": 1}
        for role, count in counts.items():
            self.signers.setdefault(role, [CryptoSigner.generate_ed25519() for _ in range(count)])
        keys = {role: [s.public_key for s in signers] for role, signers in self.signers.items()}
        self.root = tufmd.new_root(keys, {"root": self.root_threshold}, self.now)
        tufmd.sign(self.root, self.signers["root"])
        self.files["1.root.json"] = tufmd.to_bytes(self.root)
        self.targets = tufmd.new_targets(self.now, version=0 + 1)
        self.targets.signed.version = 0  # publish() bumps to 1
        self.publish()

    @property
    def root_bytes(self) -> bytes:
        return self.files["1.root.json"]

    def add(self, manifest: bytes, hardware_ids: list[str]) -> str:
        target = tufmd.add_target(self.targets, manifest, hardware_ids)
        self.files[f"targets/{target.path}"] = manifest
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def publish(self, now: datetime | None = None) -> None:
        """Sign and publish new targets, snapshot and timestamp versions."""
        now = now or self.now
        tufmd.bump(self.targets, now)
        tufmd.sign(self.targets, self.signers["targets"])
        self.files[f"{self.targets.signed.version}.targets.json"] = tufmd.to_bytes(self.targets)
        self.publish_snapshot(now)

    def publish_snapshot(self, now: datetime | None = None, *, targets_version: int | None = None) -> None:
        now = now or self.now
        self.snapshot_version += 1
        snapshot = tufmd.next_snapshot(targets_version or self.targets.signed.version, None, now)
        snapshot.signed.version = self.snapshot_version
        tufmd.sign(snapshot, self.signers["snapshot"])
        data = tufmd.to_bytes(snapshot)
        self.files[f"{self.snapshot_version}.snapshot.json"] = data
        self.publish_timestamp(now)

    def publish_timestamp(self, now: datetime | None = None) -> None:
        now = now or self.now
        self.timestamp_version += 1
        snap = self.files[f"{self.snapshot_version}.snapshot.json"]
        timestamp = tufmd.next_timestamp(snap, None, now)
        timestamp.signed.version = self.timestamp_version
        tufmd.sign(timestamp, self.signers["timestamp"])
        self.files["timestamp.json"] = tufmd.to_bytes(timestamp)

    def rotate(self, role: str, signers: list[CryptoSigner] | None = None, *, sign_with: int | None = None) -> bytes:
        """Root v+1 with new keys for ``role``, signed by ``sign_with`` of the old root keys (default: threshold)
        and all the new root keys; published as N.root.json and returned."""
        old_root_signers = self.signers["root"]
        new = signers or [CryptoSigner.generate_ed25519() for _ in self.signers[role]]
        for keyid in list(self.root.signed.roles[role].keyids):
            self.root.signed.revoke_key(keyid, role)
        for signer in new:
            self.root.signed.add_key(signer.public_key, role)
        self.signers[role] = new
        tufmd.bump(self.root, self.now)
        count = self.root_threshold if sign_with is None else sign_with
        tufmd.sign(self.root, old_root_signers[:count])
        tufmd.sign(self.root, self.signers["root"] if role == "root" else old_root_signers[:count])
        data = tufmd.to_bytes(self.root)
        self.files[f"{self.root.signed.version}.root.json"] = data
        return data


class RepoServer:
    """Serves ``repo.files`` under ``/tuf/`` on 127.0.0.1 with Range support and per-path misbehaviour."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.misbehave: dict[str, Misbehave] = {}
        self.overrides: dict[str, bytes] = {}  # path -> bytes served instead of the repo's
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: dict[str, int] = {}  # body bytes written per path
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/tuf/"

    @contextmanager
    def running(self) -> Iterator[RepoServer]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                return

            def do_GET(self) -> None:
                path = self.path.removeprefix("/tuf/")
                server.requests.append((path, self.headers.get("Range")))
                data = server.overrides.get(path, server.repo.files.get(path))
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                behaviour = server.misbehave.get(path, Misbehave())
                if behaviour.endless:
                    self._endless(path)
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start, status = 0, 200
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if wanted and self.headers.get("If-Range", etag) == etag:
                    start, status = int(wanted.group(1)), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if behaviour.cut_after is not None and behaviour.cuts > 0:
                    behaviour.cuts -= 1
                    self._write(path, body[: behaviour.cut_after])
                    self.close_connection = True
                    return
                self._write(path, body)

            def _write(self, path: str, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                server.sent[path] = server.sent.get(path, 0) + len(data)

            def _endless(self, path: str) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = b"x" * (64 << 10)
                try:
                    for _ in range(1024):  # up to 64 MiB, far beyond any declared length
                        self._write(path, chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join(5)
