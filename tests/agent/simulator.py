"""A control-plane simulator for agent tests: the wire endpoints of ``slmops.core.wire`` on a real loopback server.

In the spirit of python-tuf's ``tests/repository_simulator.py``: it serves signed manifests and blobs from a real
:class:`~slmops.registry.Registry`, records every request (method, path, headers, body), and can misbehave on
purpose: cut a blob's connection after N bytes, serve other bytes under another ETag, serve tampered bytes.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from slmops.core.manifest import SignedManifest
from slmops.core.wire import (
    API_PREFIX,
    ClaimRequest,
    DesiredModel,
    DesiredState,
    DeviceEvent,
    EnrollRequest,
    EnrollResponse,
    RuntimeConfig,
    StatusAck,
    StatusReport,
    TelemetryAck,
    TelemetryBatch,
    TelemetryWindow,
    claim_message,
)
from slmops.registry import Registry
from slmops.registry.signing import parse_public_key


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class BlobBehavior:
    data: bytes | None = None  # serve these bytes instead of the registry's
    etag: str | None = None
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cuts: int = 0  # ... this many times


@dataclass
class Device:
    device_id: str
    public_key: str
    credential: str
    approved: bool
    labels: dict[str, str]
    last_claim_timestamp: int | None = None  # of the last claim that got the credential, as the control plane keeps


@dataclass
class Simulator:
    registry: Registry
    auto_approve: bool = True
    chunk_bytes: int = 16 << 10
    devices: dict[str, Device] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=lambda: {"tok"})
    desired: DesiredState | None = None
    behaviors: dict[str, BlobBehavior] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)  # every event received, duplicates included
    statuses: list[StatusReport] = field(default_factory=list)
    telemetry: list[TelemetryWindow] = field(default_factory=list)  # every window received, duplicates included
    lose_telemetry_acks: int = 0  # answer this many telemetry posts with 503 after storing them (a lost ack)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ----------------------------------------------------------------------------------------------- setup

    def trusted_key(self) -> str:
        return self.registry.keys.public_key_text(self.registry.keys.signer().key_id).strip()

    def set_desired(self, envelope: SignedManifest | None, port: int, generation: str | None = None) -> None:
        model = None
        if envelope is not None:
            m = envelope.manifest
            model = DesiredModel(name=m.name, version=m.version, digest=envelope.digest, envelope=envelope)
        self.desired = DesiredState(
            device_id="*",
            generation=generation or secrets.token_hex(6),
            model=model,
            runtime=RuntimeConfig(port=port, context_tokens=256, threads=1),
        )

    def blob_bytes(self, digest: str) -> bytes:
        return self.registry.blob_path(digest).read_bytes()

    def requests_to(self, fragment: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if fragment in r.path]

    # ----------------------------------------------------------------------------------------------- app

    def app(self) -> Any:
        app = FastAPI()
        sim = self

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            body = await request.body()
            entry = Recorded(request.method, request.url.path, dict(request.headers), body)
            with sim.lock:
                sim.requests.append(entry)
            response = await call_next(request)
            entry.status = response.status_code
            return response

        def device_for(request: Request, device_id: str | None = None) -> Device | None:
            auth = request.headers.get("authorization", "")
            for device in sim.devices.values():
                same = device_id is None or device_id == device.device_id
                if auth == f"Bearer {device.credential}" and device.approved and same:
                    return device
            return None

        def enroll_response(device: Device, status: int) -> Response:
            body = EnrollResponse(
                device_id=device.device_id,
                state="approved" if device.approved else "pending",
                credential=device.credential if device.approved else None,
                trusted_keys=[sim.trusted_key()],
                poll_interval_s=0.2,
            )
            return Response(body.model_dump_json(), status_code=status, media_type="application/json")

        @app.post(f"{API_PREFIX}/enroll")
        async def enroll(request: Request) -> Response:
            req = EnrollRequest.model_validate_json(await request.body())
            if req.token not in sim.tokens:
                return JSONResponse({"detail": "bad token"}, status_code=401)
            device = Device(
                f"dev-{len(sim.devices) + 1}", req.public_key, secrets.token_hex(16), sim.auto_approve, req.labels
            )
            sim.devices[device.device_id] = device
            return enroll_response(device, 200 if device.approved else 202)

        @app.post(f"{API_PREFIX}/enroll/claim")
        async def claim(request: Request) -> Response:
            req = ClaimRequest.model_validate_json(await request.body())
            device = sim.devices.get(req.device_id)
            if device is None:
                return JSONResponse({"detail": "unknown device"}, status_code=404)
            public = parse_public_key(device.public_key)
            try:
                public.verify(base64.b64decode(req.signature), claim_message(req.device_id, req.timestamp))
            except Exception:
                return JSONResponse({"detail": "bad signature"}, status_code=401)
            if not device.approved:
                return enroll_response(device, 202)
            last = device.last_claim_timestamp
            if last is not None and req.timestamp <= last:  # replay protection, as the control plane does
                return JSONResponse({"detail": f"claim not newer than timestamp {last}"}, status_code=409)
            device.last_claim_timestamp = req.timestamp
            return enroll_response(device, 200)

        @app.get(f"{API_PREFIX}/devices/{{device_id}}/desired")
        async def desired(device_id: str, request: Request) -> Response:
            if device_for(request, device_id) is None:
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            state = sim.desired or DesiredState(device_id=device_id, generation="none")
            state = state.model_copy(update={"device_id": device_id})
            etag = f'"{state.generation}"'
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers={"ETag": etag})
            return Response(state.model_dump_json(), media_type="application/json", headers={"ETag": etag})

        @app.post(f"{API_PREFIX}/devices/{{device_id}}/status")
        async def status(device_id: str, request: Request) -> Response:
            if device_for(request, device_id) is None:
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            report = StatusReport.model_validate_json(await request.body())
            with sim.lock:
                sim.statuses.append(report)
                sim.events.extend(report.events)
            ack = StatusAck(accepted_event_ids=[e.id for e in report.events], server_time=datetime.now(UTC).isoformat())
            return Response(ack.model_dump_json(), media_type="application/json")

        @app.post(f"{API_PREFIX}/devices/{{device_id}}/telemetry")
        async def telemetry(device_id: str, request: Request) -> Response:
            if device_for(request, device_id) is None:
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            batch = TelemetryBatch.model_validate_json(await request.body())
            with sim.lock:
                sim.telemetry.extend(batch.windows)
                if sim.lose_telemetry_acks > 0:
                    sim.lose_telemetry_acks -= 1
                    return JSONResponse({"detail": "lost"}, status_code=503)
            ack = TelemetryAck(accepted_ids=[w.id for w in batch.windows])
            return Response(ack.model_dump_json(), media_type="application/json")

        @app.get(f"{API_PREFIX}/blobs/{{digest}}")
        async def blob(digest: str, request: Request) -> Response:
            if device_for(request) is None:
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            behavior = sim.behaviors.get(digest, BlobBehavior())
            data = behavior.data if behavior.data is not None else sim.blob_bytes(digest)
            etag = behavior.etag or f'"{digest.removeprefix("sha256:")}"'
            start, status = 0, 200
            ranged = request.headers.get("range")
            if_range = request.headers.get("if-range")
            if ranged and (if_range is None or if_range == etag):
                start = int(ranged.removeprefix("bytes=").split("-")[0])
                status = 206
            body = data[start:]
            headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Length": str(len(body))}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            cut = None
            if behavior.cut_after is not None and behavior.cuts > 0:
                behavior.cuts -= 1
                cut = behavior.cut_after

            async def stream() -> AsyncIterator[bytes]:
                sent = 0
                for offset in range(0, len(body), sim.chunk_bytes):
                    piece = body[offset : offset + sim.chunk_bytes]
                    if cut is not None and sent + len(piece) > cut:
                        if cut > sent:
                            yield piece[: cut - sent]
                        await asyncio.sleep(0.05)
                        raise ConnectionAbortedError("simulated cut")
                    sent += len(piece)
                    yield piece

            return StreamingResponse(stream(), status_code=status, headers=headers)

        return app


class SimServer:
    """uvicorn on 127.0.0.1 in a thread; ``stop()`` then ``start()`` again keeps the same port."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SimServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.app, log_config=None, log_level="critical", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningSim:
    sim: Simulator
    server: SimServer

    @property
    def url(self) -> str:
        return self.server.url


def iter_events(sim: Simulator, kind: str) -> Iterator[DeviceEvent]:
    with sim.lock:
        events = list(sim.events)
    return (e for e in events if e.kind == kind)
