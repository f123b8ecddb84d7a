"""Control-plane capacity: device heartbeats plus desired-state polls per second with p99 under 100 ms.

    python -m benchmarks.capacity [--devices 10000] [--step-s 10] [--warmup-s 2] [--rates 50,100,200,...]

One run, in a fresh temporary SLMOPS_HOME:

1. Provisioning: a registry with a tiny GGUF model and two variants of it, a blueprint that matches every device,
   and N approved devices in four device classes (from :mod:`slmops.sim.profiles`) with known credentials. The
   devices are inserted in bulk with SQLAlchemy, not enrolled over HTTP (enrolling 10,000 devices one by one takes
   about 12 minutes on the 2-core VM). Each device's current ETag (desired-state generation) is computed in-process,
   so the polls of the measured fleet are mostly ``304 Not Modified``: a quiet fleet.
2. Two servers, one after the other, each a single uvicorn process as ``slmops server`` runs: the real control plane
   (``slmops server``) and a bare FastAPI app with one GET and one POST JSON endpoint (the baseline: what FastAPI and
   uvicorn cost on this machine before any of our code runs).
3. A load generator in its own process (asyncio + ``httpx.AsyncClient``, HTTP/1.1 keep-alive pool), open loop:
   requests arrive at a fixed rate whatever the answers do, and latency is measured from the moment a request was
   due, so a server (or generator) that falls behind shows it in the percentiles. For the control plane, requests
   alternate ``GET /api/v1/devices/{id}/desired`` (If-None-Match: the device's last ETag) and
   ``POST /api/v1/devices/{id}/status`` (a minimal StatusReport, no events), each with the device's credential,
   devices taken round-robin; for the baseline, GET and POST alternate the same way. The rate steps up, each step
   after a short warm-up, until p99 reaches 100 ms or a request fails.

Capacity is the highest achieved rate of a step with p99 < 100 ms and no errors. The generator shares the machine's
cores with the server; its CPU use is reported per step.

4. wrk (closed loop, so the figure is the server's limit, not a Python generator's): Debian's ``wrk`` with the Lua
   script ``benchmarks/wrk/fleet.lua`` (``poll``: the 304 poll; ``heartbeat``: the status POST), which reads each
   device's id, credential and ETag from a file and rotate over the fleet. Both servers are up at once; each round
   runs each endpoint on the bare app, then on the control plane; req/s, latency percentiles, server CPU per request
   and the ratio to bare are reported (medians over rounds). ``--wrk-profile`` also records the control plane under
   wrk with py-spy (raw collapsed stacks in the workdir).

    python -m benchmarks.capacity --wrk-only --devices 2000 --wrk-duration-s 10 [--wrk-rounds 3] [--write]

``--write`` puts the result in BENCHMARKS.md's capacity section (``--wrk-only`` replaces only the nested wrk part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "CapacityResult",
    "ServerRun",
    "Step",
    "WrkResult",
    "WrkRun",
    "markdown",
    "run_capacity",
    "run_wrk",
    "write_markdown",
    "wrk_markdown",
]

DEFAULT_RATES: tuple[float, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2000)
P99_LIMIT_MS = 100.0
REPO = Path(__file__).resolve().parents[1]
_GIB = 1 << 30

BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: capacity}
spec:
  selector: {labels: {fleet: capacity}}
  model: {name: tiny, ref: latest}
  variant:
    policy: {objective: best_quality, max_memory_fraction: 0.5}
"""

# The baseline: the same framework and server, no database, no auth, no models.
BARE_APP = """\
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Report(BaseModel):
    phase: str
    health: str = "unknown"


@app.get("/api/v1/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/bare/{device_id}/desired")
def desired(device_id: str) -> dict[str, str]:
    return {"device_id": device_id, "generation": "0" * 16, "reason": "bare"}


@app.post("/bare/{device_id}/status")
def status(device_id: str, report: Report) -> dict[str, object]:
    return {"accepted_event_ids": [], "server_time": "2026-01-01T00:00:00Z"}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level=sys.argv[2])
"""


@dataclass(frozen=True)
class Step:
    """One rate step: what was offered, what was served and how fast."""

    offered_rps: float
    achieved_rps: float  # successful answers per second over the step (arrivals to last answer)
    requests: int
    errors: int  # transport errors, timeouts and statuses other than 200/304
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    duration_s: float
    statuses: dict[str, int]  # "GET 304", "POST 200", "GET ReadTimeout", "unfinished", ...
    dispatch_lag_p99_ms: float  # how late the generator's loop queued requests: high = the generator fell behind
    server_cpu_pct: float  # of one core, over the step
    loadgen_cpu_pct: float  # of one core, over the step
    other_cpu_pct: float  # of one core, over the step: every other process on the machine (should be near 0)

    @property
    def within_limit(self) -> bool:
        return self.errors == 0 and self.p99_ms < P99_LIMIT_MS and self.requests > 0


@dataclass(frozen=True)
class ServerRun:
    """The steps of one server and its capacity (0 when even the first step failed)."""

    name: str
    steps: list[Step]
    capacity_rps: float

    @property
    def limit_reached(self) -> bool:
        """Whether the stepping ended on a failing step (else the capacity is only a lower bound)."""
        return bool(self.steps) and not self.steps[-1].within_limit


@dataclass(frozen=True)
class CapacityResult:
    devices: int
    step_s: float
    warmup_s: float
    control: ServerRun
    bare: ServerRun
    machine: dict[str, str]
    provision_s: float
    total_s: float
    started_at: str
    command: str
    classes: dict[str, int] = field(default_factory=dict)  # device class -> devices
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================ provisioning


def _write_gguf(path: Path, seed: int, file_type: int = 0) -> Path:
    """A tiny llama-architecture GGUF with random weights (F32 or F16), valid for the registry's import."""
    import gguf
    import numpy as np

    n_embd, n_head, n_head_kv, n_ff, n_layers = 64, 4, 2, 128, 1
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    types = [2, 3, 3] + [6] * 256 + [1]
    rng = np.random.default_rng(seed)
    dtype = np.float16 if file_type == 1 else np.float32
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(file_type)
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.02).astype(dtype))

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))

    head_dim = n_embd // n_head
    matrix("token_embd.weight", len(tokens), n_embd)
    for layer in range(n_layers):
        blk = f"blk.{layer}"
        norm(f"{blk}.attn_norm.weight", n_embd)
        matrix(f"{blk}.attn_q.weight", n_head * head_dim, n_embd)
        matrix(f"{blk}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"{blk}.attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(f"{blk}.attn_output.weight", n_embd, n_head * head_dim)
        norm(f"{blk}.ffn_norm.weight", n_embd)
        matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight", n_embd)
    matrix("output.weight", len(tokens), n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _profiles() -> list[Any]:
    """Four device classes: the simulator's three built-in profiles and a 4 GiB aarch64 gateway."""
    from slmops.sim.profiles import BUILTIN_PROFILES, DeviceProfile

    gateway = DeviceProfile(name="gateway-4gb", arch="aarch64", memory_bytes=4 * _GIB, cpu_flags=("neon",))
    return [*BUILTIN_PROFILES.values(), gateway]


def register_tiny_model(registry: Any, models: Path) -> Any:
    """A tiny GGUF ``tiny`` as a base version and two variants (q8_0, q4_0) with measured-looking metrics, so a
    memory policy picks a different one per device class. Returns the base's signed manifest."""
    from slmops.core.manifest import Lineage, Recipe, RecipeStep, Source

    base = registry.import_model(_write_gguf(models / "base.gguf", seed=1), "tiny").envelope
    for variant, seed, ppl, rss in (("q8_0", 2, 10.1, 3 * _GIB), ("q4_0", 3, 11.0, int(0.9 * _GIB))):
        path = _write_gguf(models / f"{variant}.gguf", seed=seed, file_type=1)
        registry.register(
            "tiny",
            "gguf",
            {path.name: path},
            facts=base.manifest.facts,
            runtime=base.manifest.runtime,
            weight_bytes=path.stat().st_size,
            source=Source(kind="derived", origin=base.digest),
            lineage=Lineage(
                parents=[base.digest],
                recipe=Recipe(name="benchmark", steps=[RecipeStep(pass_name="quantize", params={})]),
            ),
            variant=variant,
            metrics={"perplexity": ppl, "peak_rss_bytes": float(rss)},
        )
    return base


def provision(
    home: Path, devices: int, database_url: str | None = None, progress: Any = None
) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """A registry with a model, a blueprint for every device and ``devices`` approved devices in ``home`` (its
    SQLite database, or the database at ``database_url``). ``progress(text)``, when given, hears how far it is.

    Returns (device id, credential, current ETag) per device, and the number of devices per device class.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from slmops.control.auth import DEVICE_PREFIX, hash_secret, new_secret
    from slmops.control.blueprints import apply_blueprint
    from slmops.control.db import DeviceRow
    from slmops.control.desired_state import desired_state_for
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings
    from slmops.core.device_class import device_class
    from slmops.registry.signing import format_public_key

    plane = ControlPlane.open(ServerSettings(home=home, database_url=database_url))
    try:
        registry = plane.registry
        register_tiny_model(registry, home.parent / "models")
        apply_blueprint(plane, BLUEPRINT, created_by="benchmark")

        profiles = _profiles()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        credentials: list[tuple[str, str]] = []
        rows: list[dict[str, Any]] = []
        classes: Counter[str] = Counter()
        for index in range(devices):
            profile = profiles[index % len(profiles)]
            capabilities = profile.capabilities()
            cls = device_class(capabilities)
            classes[cls] += 1
            device_id = f"dev-cap{index:07d}"
            credential = new_secret(DEVICE_PREFIX)
            credentials.append((device_id, credential))
            rows.append(
                {
                    "id": device_id,
                    "public_key": format_public_key(Ed25519PrivateKey.generate().public_key()).strip(),
                    "state": "approved",
                    "credential_hash": hash_secret(credential),
                    "enrollment_token_id": None,
                    "hostname": f"cap-{index}",
                    "labels": {"fleet": "capacity", "profile": profile.name},
                    "capabilities": capabilities.model_dump(mode="json"),
                    "device_class": cls,
                    "enrolled_at": now,
                    "updated_at": now,
                }
            )
        with Session(plane.engine) as session:
            for start in range(0, len(rows), 2000):
                session.execute(insert(DeviceRow), rows[start : start + 2000])
            session.commit()
        if progress is not None:
            progress(f"inserted {devices} devices; computing each one's current desired state ...")
        # Each device's current generation, as its agent would hold it after its last poll.
        fleet = []
        for done, (device_id, credential) in enumerate(credentials, 1):
            fleet.append((device_id, credential, desired_state_for(plane, device_id).generation))
            if progress is not None and done % 20_000 == 0:
                progress(f"  {done} of {devices}")
    finally:
        plane.close()
    return fleet, dict(sorted(classes.items()))


# ============================================================================ servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def _server(argv: list[str], port: int, env: dict[str, str], log_path: Path, timeout_s: float = 60) -> Iterator[int]:
    """Start a server process, wait for its health endpoint, yield its pid; SIGKILL it at the end."""
    import httpx

    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield process.pid
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()


def _run_loadgen(spec: dict[str, Any], workdir: Path, timeout_s: float) -> list[Step]:
    spec_path = workdir / f"loadgen-{spec['kind']}.json"
    out_path = workdir / f"loadgen-{spec['kind']}-result.json"
    spec_path.write_text(json.dumps({**spec, "output": str(out_path)}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    with (workdir / f"loadgen-{spec['kind']}.log").open("wb") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.capacity", "--loadgen", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            timeout=timeout_s,
            check=False,
        )
    if completed.returncode != 0:
        text = (workdir / f"loadgen-{spec['kind']}.log").read_text()[-3000:]
        raise RuntimeError(f"the load generator failed with {completed.returncode}:\n{text}")
    return [Step(**step) for step in json.loads(out_path.read_text())]


def _capacity(steps: Sequence[Step]) -> float:
    return max((s.achieved_rps for s in steps if s.within_limit), default=0.0)


# ============================================================================ load generator (its own process)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[rank]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), or NaN where that is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds all processes on the machine have used (Linux /proc/stat), or NaN where that is not readable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


async def _drive(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import httpx

    from slmops.core.wire import StatusReport

    kind: str = spec["kind"]
    fleet: list[list[Any]] = json.loads(Path(spec["fleet"]).read_text())
    etags: list[str | None] = [f'"{entry[2]}"' if entry[2] else None for entry in fleet]
    auth = [{"Authorization": f"Bearer {entry[1]}"} for entry in fleet]
    body = StatusReport(phase="serving", health="ok", agent_version="capacity-bench").model_dump_json().encode()
    post_headers = [{**headers, "Content-Type": "application/json"} for headers in auth]
    prefix = "/api/v1/devices" if kind == "control" else "/bare"
    server_pid: int = spec["server_pid"]
    drain_s: float = spec["drain_s"]
    loop = asyncio.get_running_loop()
    counter = 0
    Sink = list[tuple[float, float, float, str]]  # (latency s, dispatch lag s, done at, outcome)

    async def one(client: httpx.AsyncClient, due: float, lag: float, sink: Sink | None) -> None:
        nonlocal counter
        index = counter
        counter += 1
        device = (index // 2) % len(fleet)
        device_id = fleet[device][0]
        method = "GET" if index % 2 == 0 else "POST"
        try:
            if method == "GET":
                headers = dict(auth[device])
                etag = etags[device]
                if etag is not None:
                    headers["If-None-Match"] = etag
                response = await client.get(f"{prefix}/{device_id}/desired", headers=headers)
                if response.status_code == 200 and "etag" in response.headers:
                    etags[device] = response.headers["etag"]
            else:
                response = await client.post(f"{prefix}/{device_id}/status", content=body, headers=post_headers[device])
            outcome = f"{method} {response.status_code}"
        except (httpx.HTTPError, OSError) as exc:
            outcome = f"{method} {type(exc).__name__}"
        done = loop.time()
        if sink is not None:
            sink.append((done - due, lag, done, outcome))

    # Requests wait in this queue (O(1)) for one of `connections` workers, each with its own client and one keep-alive
    # connection. One client with a pool of many connections made the generator, not the server, the bottleneck:
    # httpcore's pool bookkeeping runs per request over all its connections and queued requests (O(N^2 + N*M), see
    # encode/httpcore#1035), so once a hiccup opened more connections, the generator's CPU use exploded.
    queue: asyncio.Queue[tuple[float, float, Sink | None]] = asyncio.Queue()
    abandon = False

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            due, lag, sink = await queue.get()
            try:
                if abandon:
                    if sink is not None:
                        sink.append((math.inf, lag, loop.time(), "- unfinished"))
                else:
                    await one(client, due, lag, sink)
            finally:
                queue.task_done()

    async def run_at(rate: float, duration_s: float, record: bool) -> dict[str, Any] | None:
        nonlocal abandon
        count = max(1, round(rate * duration_s))
        sink: Sink | None = [] if record else None
        cpu_server, cpu_self, cpu_all = _cpu_s(server_pid), time.process_time(), _busy_s()
        start = loop.time() + 0.01
        for i in range(count):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((due, loop.time() - due, sink))
        arrivals_end = loop.time()
        try:
            await asyncio.wait_for(queue.join(), timeout=drain_s)
        except TimeoutError:
            abandon = True  # the queued rest counts as unfinished; requests in flight end by their timeout
            await queue.join()
            abandon = False
        end = loop.time()
        if sink is None:
            return None
        elapsed = max(end - start, 1e-9)
        statuses = Counter(outcome.removeprefix("- ") for *_, outcome in sink)
        ok = [entry for entry in sink if entry[3].split()[1] in ("200", "304")]
        latencies = sorted(entry[0] * 1000 for entry in sink)
        lags = sorted(entry[1] * 1000 for entry in sink)
        last_ok = max((entry[2] for entry in ok), default=arrivals_end)
        return {
            "offered_rps": rate,
            "achieved_rps": round(len(ok) / max(last_ok - start, arrivals_end - start, 1e-9), 1),
            "requests": count,
            "errors": count - len(ok),
            "p50_ms": round(_percentile(latencies, 0.50), 2),
            "p95_ms": round(_percentile(latencies, 0.95), 2),
            "p99_ms": round(_percentile(latencies, 0.99), 2),
            "max_ms": round(latencies[-1], 2),
            "duration_s": round(elapsed, 2),
            "statuses": dict(sorted(statuses.items())),
            "dispatch_lag_p99_ms": round(_percentile(lags, 0.99), 2),
            "server_cpu_pct": round(100 * (server := _cpu_s(server_pid) - cpu_server) / elapsed, 1),
            "loadgen_cpu_pct": round(100 * (generator := time.process_time() - cpu_self) / elapsed, 1),
            "other_cpu_pct": round(100 * max(0.0, _busy_s() - cpu_all - server - generator) / elapsed, 1),
        }

    steps: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(drain_s, pool=drain_s)
    clients = [
        httpx.AsyncClient(base_url=spec["url"], limits=limits, timeout=timeout, http2=False)
        for _ in range(spec["max_connections"])
    ]
    workers = [asyncio.create_task(worker(client)) for client in clients]
    try:
        for rate in spec["rates"]:
            if spec["warmup_s"] > 0:
                await run_at(rate, spec["warmup_s"], record=False)
            step = await run_at(rate, spec["step_s"], record=True)
            assert step is not None
            steps.append(step)
            print(json.dumps(step), flush=True)
            if step["errors"] or not step["p99_ms"] < spec["p99_limit_ms"]:
                break
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for client in clients:
            await client.aclose()
    return steps


def _loadgen_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    steps = asyncio.run(_drive(spec))
    Path(spec["output"]).write_text(json.dumps(steps))
    return 0


# ============================================================================ the benchmark


def _machine() -> dict[str, str]:
    import fastapi
    import httpx
    import sqlalchemy
    import uvicorn

    from slmops import __version__

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import sqlite3

    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "load_avg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "slmops": __version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "uvloop": _version_of("uvloop"),
        "httptools": _version_of("httptools"),
    }


def _version_of(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "no"


def run_capacity(
    devices: int = 10_000,
    step_s: float = 10.0,
    *,
    warmup_s: float = 2.0,
    rates: Sequence[float] = DEFAULT_RATES,
    p99_limit_ms: float = P99_LIMIT_MS,
    max_connections: int = 32,
    log_level: str = "warning",
    drain_s: float = 15.0,
    workdir: Path | None = None,
    progress: bool = False,
) -> CapacityResult:
    """Provision a fleet of ``devices``, then step the request rate on the control plane and on a bare FastAPI app.

    ``rates`` are the offered request rates (requests per second, GET and POST alternating); each server's stepping
    stops at the first step with p99 >= ``p99_limit_ms`` or an error. Both servers run with uvicorn's
    ``log_level`` (the default, ``warning``, leaves out the access log). ``workdir`` keeps the SLMOPS_HOME, logs
    and raw results (a temporary directory, removed afterwards, when not given).
    """
    import slmops.control.app  # noqa: F401  (fail early without the server extra)

    started = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = _machine()

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="slmops-capacity-") as scratch:
        work = Path(workdir) if workdir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        home = work / "home"
        say(f"provisioning {devices} devices in {home} ...")
        fleet, classes = provision(home, devices)
        provision_s = time.monotonic() - started
        say(f"provisioned in {provision_s:.1f} s: {classes}")
        fleet_path = work / "fleet.json"
        fleet_path.write_text(json.dumps(fleet))
        env = {k: v for k, v in os.environ.items() if k != "SLMOPS_DATABASE_URL"}
        env["SLMOPS_HOME"] = str(home)
        spec: dict[str, Any] = {
            "fleet": str(fleet_path),
            "rates": [float(r) for r in rates],
            "step_s": step_s,
            "warmup_s": warmup_s,
            "p99_limit_ms": p99_limit_ms,
            "max_connections": max_connections,
            "drain_s": drain_s,
        }
        budget_s = len(rates) * (step_s + warmup_s + 2 * drain_s) + 120
        runs: dict[str, ServerRun] = {}
        slmops_exe = str(Path(sys.executable).with_name("slmops"))
        servers = {
            "control": [slmops_exe, "server", "--port", "{port}", "--log-level", log_level],
            "bare": [sys.executable, "-c", BARE_APP, "{port}", log_level],
        }
        for kind, template in servers.items():
            port = _free_port()
            argv = [part.replace("{port}", str(port)) for part in template]
            say(f"{kind}: starting the server on port {port} ...")
            with _server(argv, port, env, work / f"server-{kind}.log") as pid:
                url = f"http://127.0.0.1:{port}"
                steps = _run_loadgen({**spec, "kind": kind, "url": url, "server_pid": pid}, work, budget_s)
            runs[kind] = ServerRun(kind, steps, _capacity(steps))
            for step in steps:
                say(
                    f"{kind}: offered {step.offered_rps:g}/s achieved {step.achieved_rps:g}/s "
                    f"p50 {step.p50_ms:g} p99 {step.p99_ms:g} ms errors {step.errors} "
                    f"server cpu {step.server_cpu_pct:g}% loadgen cpu {step.loadgen_cpu_pct:g}%"
                )
    notes = [
        f"Devices were inserted in bulk with SQLAlchemy (approved, with credentials), not enrolled over HTTP: "
        f"enrolling 10,000 devices one by one takes about 12 minutes here. Provisioning took {provision_s:.0f} s.",
        "Each device starts with its current ETag, so desired-state polls answer 304 unless the state changed.",
        f"Open loop: requests are due at a fixed rate; latency counts from when a request was due, so it includes "
        f"time waiting for one of the generator's {max_connections} keep-alive connections (one worker each).",
        f"The load generator is one asyncio process on the same {machine['cores']} cores as the server; its CPU "
        "use is in the tables, and so is the CPU every other process used ('other CPU %'). A high 'dispatch lag' "
        "(how late the generator's loop queued a request) means the generator, not the server, fell behind.",
        f"Both servers: one uvicorn process (asyncio loop, h11), log level '{log_level}' (no access log); the bare "
        "endpoints are plain `def` functions like ours, so both run them in AnyIO's worker threads.",
    ]
    if float(machine["load_avg_at_start"].split()[0]) > 0.5:
        notes.append(
            f"The 1-minute load average was {machine['load_avg_at_start'].split()[0]} at the start: other processes "
            "were using the cores (see 'other CPU %' per step); rerun on a quiet machine."
        )
    return CapacityResult(
        devices=devices,
        step_s=step_s,
        warmup_s=warmup_s,
        control=runs["control"],
        bare=runs["bare"],
        machine=machine,
        provision_s=round(provision_s, 1),
        total_s=round(time.monotonic() - started, 1),
        started_at=started_at,
        command=f"python -m benchmarks.capacity --devices {devices} --step-s {step_s:g} --warmup-s {warmup_s:g}",
        classes=classes,
        notes=notes,
    )


def _fmt(value: float) -> str:
    return "∞" if math.isinf(value) else "-" if math.isnan(value) else f"{value:.1f}"


def _table(run: ServerRun) -> list[str]:
    lines = [
        "| offered req/s | achieved req/s | p50 ms | p95 ms | p99 ms | errors | answers | dispatch lag p99 ms "
        "| server CPU % | server CPU ms/req | generator CPU % | other CPU % | p99 < limit, no errors |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in run.steps:
        answers = ", ".join(f"{k}: {v}" for k, v in s.statuses.items())
        lines.append(
            f"| {s.offered_rps:g} | {s.achieved_rps:.1f} | {_fmt(s.p50_ms)} | {_fmt(s.p95_ms)} | {_fmt(s.p99_ms)} "
            f"| {s.errors} | {answers} | {_fmt(s.dispatch_lag_p99_ms)} | {_fmt(s.server_cpu_pct)} "
            f"| {_fmt(10 * s.server_cpu_pct / s.achieved_rps) if s.achieved_rps else '-'} "
            f"| {_fmt(s.loadgen_cpu_pct)} | {_fmt(s.other_cpu_pct)} | {'yes' if s.within_limit else 'no'} |"
        )
    return lines


def _at_least(run: ServerRun) -> str:
    return "" if run.limit_reached else "at least "


def markdown(result: CapacityResult) -> str:
    """The result as Markdown: summary, one table per server, machine and notes."""
    control, bare = result.control.capacity_rps, result.bare.capacity_rps
    cycles = control / 2
    classes = ", ".join(f"{c}: {n}" for c, n in result.classes.items())
    lines = [
        f"Control-plane capacity with {result.devices:,} devices ({classes}), p99 < {P99_LIMIT_MS:g} ms, no errors:",
        "",
        f"- **slmops control plane: {_at_least(result.control)}{control:.0f} requests/s** = {cycles:.0f} device "
        f"cycles/s (one desired-state poll + one heartbeat), enough for {cycles * 30:,.0f} devices polling every "
        f"30 s (the default); {result.devices:,} devices at that interval need {result.devices * 2 / 30:.0f} "
        "requests/s.",
        f"- bare FastAPI/uvicorn endpoint, same run: {_at_least(result.bare)}{bare:.0f} requests/s"
        + (f"; the control plane reaches {100 * control / bare:.0f}% of it." if bare > 0 else "."),
        *(
            ["- **No step met the limit for one of the servers: look at the load notes below.**"]
            if not control * bare
            else []
        ),
        "",
        "slmops control plane (`GET /api/v1/devices/{id}/desired` with If-None-Match and `POST .../status`, "
        "alternating, each device's credential):",
        "",
        *_table(result.control),
        "",
        "Bare FastAPI app (one GET, one POST with a JSON body, alternating; no database, no auth):",
        "",
        *_table(result.bare),
        "",
        f"Each step: {result.warmup_s:g} s warm-up, then {result.step_s:g} s measured. Total run "
        f"{result.total_s:.0f} s (started {result.started_at}). Command: `{result.command}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in result.machine.items()),
        "",
        *[f"- {note}" for note in result.notes],
    ]
    return "\n".join(lines) + "\n"


# ============================================================================ wrk: closed-loop throughput side by side

WRK_SCRIPT = REPO / "benchmarks" / "wrk" / "fleet.lua"
WRK_ENDPOINTS: dict[str, tuple[str, str]] = {
    # endpoint (the Lua script's mode) -> (what our server answers, what it is)
    "poll": ("304", "`GET /api/v1/devices/{id}/desired` with If-None-Match (304)"),
    "heartbeat": ("200", "`POST /api/v1/devices/{id}/status` (committed, then 200)"),
}


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: one endpoint of one server for ``duration_s``."""

    server: str  # "control" or "bare"
    endpoint: str  # "poll" or "heartbeat"
    round: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: int  # socket errors, timeouts and statuses other than the expected one
    server_cpu_ms_per_req: float


@dataclass(frozen=True)
class WrkResult:
    """wrk against the control plane and the bare app, each endpoint in turn, ``rounds`` times."""

    devices: int
    duration_s: float
    connections: int
    threads: int
    rounds: int
    runs: list[WrkRun]
    machine: dict[str, str]
    command: str
    started_at: str
    total_s: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def median_rps(self, server: str, endpoint: str) -> float:
        values = sorted(r.rps for r in self.runs if r.server == server and r.endpoint == endpoint)
        return _median(values)

    def ratio(self, endpoint: str) -> float:
        """Control-plane req/s over bare req/s: the median over rounds of each round's ratio."""
        ratios = []
        for index in range(self.rounds):
            by_server = {r.server: r.rps for r in self.runs if r.endpoint == endpoint and r.round == index}
            if by_server.get("bare"):
                ratios.append(by_server.get("control", 0.0) / by_server["bare"])
        return _median(sorted(ratios))


def _median(sorted_values: Sequence[float]) -> float:
    if not sorted_values:
        return math.nan
    middle = len(sorted_values) // 2
    if len(sorted_values) % 2:
        return sorted_values[middle]
    return (sorted_values[middle - 1] + sorted_values[middle]) / 2


def write_wrk_fleet(fleet: Sequence[Sequence[Any]], path: Path) -> Path:
    """The fleet as the Lua script reads it: ``<device id> <credential> <etag>`` per line."""
    path.write_text("".join(f"{device_id} {credential} {etag or ''}\n" for device_id, credential, etag in fleet))
    return path


def _wrk(
    wrk: str, url: str, endpoint: str, fleet_path: Path, prefix: str, duration_s: float, connections: int, threads: int
) -> dict[str, Any]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "-s", str(WRK_SCRIPT)]
    completed = subprocess.run(
        [*argv, url, "--", str(fleet_path), endpoint, prefix],
        capture_output=True,
        text=True,
        check=False,
        timeout=duration_s + 60,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("wrk-json "):
            data: dict[str, Any] = json.loads(line.removeprefix("wrk-json "))
            return data
    raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stdout[-2000:]} {completed.stderr[-2000:]}")


def run_wrk(
    devices: int = 2000,
    duration_s: float = 10.0,
    *,
    connections: int = 16,
    threads: int = 1,
    rounds: int = 2,
    log_level: str = "warning",
    workdir: Path | None = None,
    fleet: Sequence[Sequence[Any]] | None = None,
    home: Path | None = None,
    profile: bool = False,
    progress: bool = False,
) -> WrkResult:
    """wrk (closed loop, ``connections`` keep-alive connections) against the control plane and the bare app, one
    uvicorn worker each, both up at once: per round, each endpoint on bare then on the control plane.

    With ``fleet`` and ``home`` (from :func:`provision`), that fleet is used; else one of ``devices`` is provisioned.
    ``profile`` also records each control-plane endpoint under wrk with py-spy (raw collapsed stacks in the
    workdir, ``profile-<endpoint>.txt``), in an extra run that is not measured.
    """
    import httpx

    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: `apt-get install wrk` (Debian) or build it from github.com/wg/wrk")
    started = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = _machine()

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    runs: list[WrkRun] = []
    with tempfile.TemporaryDirectory(prefix="slmops-wrk-") as scratch, ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if fleet is None or home is None:
            home = work / "home"
            say(f"provisioning {devices} devices in {home} ...")
            fleet, _classes = provision(home, devices)
        fleet_path = write_wrk_fleet(fleet, work / "wrk-fleet.txt")
        env = {k: v for k, v in os.environ.items() if k != "SLMOPS_DATABASE_URL"}
        env["SLMOPS_HOME"] = str(home)
        slmops_exe = str(Path(sys.executable).with_name("slmops"))
        servers: dict[str, tuple[str, int, str]] = {}  # name -> (url, pid, path prefix)
        for name, template, prefix in (
            ("bare", [sys.executable, "-c", BARE_APP, "{port}", log_level], "/bare"),
            ("control", [slmops_exe, "server", "--port", "{port}", "--log-level", log_level], "/api/v1/devices"),
        ):
            port = _free_port()
            argv = [part.replace("{port}", str(port)) for part in template]
            pid = stack.enter_context(_server(argv, port, env, work / f"wrk-server-{name}.log"))
            servers[name] = (f"http://127.0.0.1:{port}", pid, prefix)
        # One request of each kind first: the control plane must answer what wrk is going to count as success.
        device_id, credential, etag = fleet[0]
        auth = {"Authorization": f"Bearer {credential}"}
        control_url = servers["control"][0]
        poll = httpx.get(
            f"{control_url}/api/v1/devices/{device_id}/desired", headers={**auth, "If-None-Match": f'"{etag}"'}
        )
        beat = httpx.post(f"{control_url}/api/v1/devices/{device_id}/status", json={"phase": "serving"}, headers=auth)
        if (poll.status_code, beat.status_code) != (304, 200):
            raise RuntimeError(f"the control plane answered {poll.status_code} / {beat.status_code}, not 304 / 200")
        if profile:
            _profile_endpoints(wrk, servers["control"], fleet_path, duration_s, connections, threads, work, say)
        for index in range(rounds):
            for endpoint, (expected, _what) in WRK_ENDPOINTS.items():
                for name in ("bare", "control"):
                    url, pid, prefix = servers[name]
                    cpu_before = _cpu_s(pid)
                    data = _wrk(wrk, url, endpoint, fleet_path, prefix, duration_s, connections, threads)
                    cpu_s = _cpu_s(pid) - cpu_before
                    want = expected if name == "control" else "200"
                    statuses = {str(k): int(v) for k, v in sorted(data["statuses"].items())}
                    errors = (
                        data["socket_errors"]
                        + data["timeouts"]
                        + sum(n for status, n in statuses.items() if status != want)
                    )
                    seconds = data["duration_us"] / 1e6
                    run = WrkRun(
                        server=name,
                        endpoint=endpoint,
                        round=index,
                        requests=data["requests"],
                        duration_s=round(seconds, 2),
                        rps=round(data["requests"] / seconds, 1),
                        p50_ms=round(data["p50_us"] / 1000, 2),
                        p90_ms=round(data["p90_us"] / 1000, 2),
                        p99_ms=round(data["p99_us"] / 1000, 2),
                        max_ms=round(data["max_us"] / 1000, 2),
                        statuses=statuses,
                        errors=errors,
                        server_cpu_ms_per_req=round(1000 * cpu_s / max(1, data["requests"]), 3),
                    )
                    runs.append(run)
                    say(
                        f"wrk round {index + 1}/{rounds} {endpoint} {name}: {run.rps:g} req/s p50 {run.p50_ms:g} "
                        f"p99 {run.p99_ms:g} ms, {run.server_cpu_ms_per_req:g} ms CPU/req, {statuses}, "
                        f"errors {errors}"
                    )
    notes = [
        f"wrk {threads} thread(s), {connections} keep-alive connections, closed loop: a new request as soon as an "
        f"answer arrives, so req/s is what one server process delivers with wrk (C, LuaJIT) as the client; "
        f"{duration_s:g} s per run; per round each endpoint ran on bare, then on the control plane, with both "
        "servers up; figures are medians over rounds, the ratio the median of each round's ratio.",
        f"Devices rotate round-robin over {len(fleet):,} (the Lua script reads each device's id, credential and "
        "ETag); the control plane checks the credential and that it is this device's on every request, and "
        "commits every heartbeat before it answers.",
        "Both servers: one uvicorn worker, started the same way ('slmops server' and `uvicorn.run(app)`), so the "
        f"same event loop and HTTP parser (uvloop: {machine.get('uvloop', 'no')}, httptools: "
        f"{machine.get('httptools', 'no')}).",
        "'server CPU ms/req' is the server process's user+system CPU over the run divided by its requests.",
    ]
    return WrkResult(
        devices=len(fleet),
        duration_s=duration_s,
        connections=connections,
        threads=threads,
        rounds=rounds,
        runs=runs,
        machine=machine,
        command=(
            f"python -m benchmarks.capacity --wrk-only --devices {len(fleet)} --wrk-duration-s {duration_s:g} "
            f"--wrk-connections {connections} --wrk-rounds {rounds}"
        ),
        started_at=started_at,
        total_s=round(time.monotonic() - started, 1),
        notes=notes,
    )


def _profile_endpoints(
    wrk: str,
    server: tuple[str, int, str],
    fleet_path: Path,
    duration_s: float,
    connections: int,
    threads: int,
    work: Path,
    say: Any,
) -> None:
    """py-spy (sampling, --nonblocking) on the control plane under wrk, one raw collapsed-stack file per endpoint."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    url, pid, prefix = server
    for endpoint in WRK_ENDPOINTS:
        output = work / f"profile-{endpoint}.txt"
        argv = [py_spy, "record", "--nonblocking", "--idle", "-p", str(pid), "-d", f"{duration_s:g}"]
        spy = subprocess.Popen(
            [*argv, "-f", "raw", "-o", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(0.5)
        _wrk(wrk, url, endpoint, fleet_path, prefix, duration_s, connections, threads)
        _out, err = spy.communicate(timeout=duration_s + 30)
        say(f"profile of {endpoint}: {output} ({spy.returncode}) {err.decode()[-300:] if spy.returncode else ''}")


def wrk_markdown(result: WrkResult) -> str:
    """The wrk comparison as Markdown: the ratio per endpoint, then one row per (endpoint, server)."""
    lines = [
        f"wrk side by side ({result.devices:,} devices, {result.connections} connections, {result.duration_s:g} s "
        f"per run, {result.rounds} round(s), one uvicorn worker each):",
        "",
    ]
    for endpoint, (_expected, what) in WRK_ENDPOINTS.items():
        lines.append(
            f"- **{endpoint}** ({what}): control plane {result.median_rps('control', endpoint):.0f} req/s, bare "
            f"{result.median_rps('bare', endpoint):.0f} req/s: **{100 * result.ratio(endpoint):.0f}% of bare**."
        )
    lines += [
        "",
        "| endpoint | server | round | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/req | answers "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(result.runs, key=lambda r: (list(WRK_ENDPOINTS).index(r.endpoint), r.server != "bare", r.round)):
        answers = ", ".join(f"{k}: {v}" for k, v in r.statuses.items())
        lines.append(
            f"| {r.endpoint} | {r.server} | {r.round + 1} | {r.rps:.0f} | {_fmt(r.p50_ms)} | {_fmt(r.p90_ms)} "
            f"| {_fmt(r.p99_ms)} | {_fmt(r.max_ms)} | {r.server_cpu_ms_per_req:.3f} | {answers} | {r.errors} |"
        )
    lines += [
        "",
        f"Started {result.started_at}, took {result.total_s:.0f} s. Command: `{result.command}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in result.machine.items()),
        "",
        *[f"- {note}" for note in result.notes],
    ]
    return "\n".join(lines) + "\n"


WRK_SECTION = "capacity-wrk"  # nested in the "capacity" section of BENCHMARKS.md


def write_markdown(capacity: CapacityResult | None, wrk: WrkResult | None, path: Path | None = None) -> None:
    """Write the results to BENCHMARKS.md's ``capacity`` section: with ``capacity`` the whole section (the wrk table
    nested in its own markers), with only ``wrk`` the nested wrk part, which keeps the open-loop tables."""
    from benchmarks._report import BENCHMARKS, write_section

    target = path or BENCHMARKS
    begin, end = f"<!-- {WRK_SECTION}:begin -->", f"<!-- {WRK_SECTION}:end -->"
    if capacity is not None:
        text = markdown(capacity)
        if wrk is not None:
            text += f"\n{begin}\n{wrk_markdown(wrk).rstrip()}\n{end}\n"
        rerun = "python -m benchmarks.capacity --devices N --write" + ("" if wrk is not None else " --no-wrk")
        write_section(f"{text}\nRun by `{rerun}`.", "capacity", target)
        return
    if wrk is None:
        return
    current = target.read_text() if target.exists() else ""
    if begin not in current and "<!-- capacity:end -->" in current:  # make room inside the capacity section
        target.write_text(current.replace("<!-- capacity:end -->", f"{begin}\n{end}\n<!-- capacity:end -->", 1))
    write_section(wrk_markdown(wrk), WRK_SECTION, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the fleet (default 10000)")
    parser.add_argument("--step-s", type=float, default=10.0, help="measured seconds per rate step (default 10)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="warm-up seconds before each step (default 2)")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES), help="offered req/s steps")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level of both servers")
    parser.add_argument("--wrk-only", action="store_true", help="only the wrk comparison (no open-loop steps)")
    parser.add_argument("--no-wrk", action="store_true", help="only the open-loop steps (no wrk comparison)")
    parser.add_argument("--wrk-duration-s", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--wrk-connections", type=int, default=16, help="wrk keep-alive connections (default 16)")
    parser.add_argument("--wrk-rounds", type=int, default=2, help="rounds of bare/control runs (default 2)")
    parser.add_argument("--wrk-profile", action="store_true", help="also py-spy the control plane under wrk")
    parser.add_argument("--write", action="store_true", help="write the result to BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw result to this JSON file")
    parser.add_argument("--workdir", type=Path, default=None, help="keep SLMOPS_HOME, logs and raw results here")
    parser.add_argument("--loadgen", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the generator
    args = parser.parse_args(argv)
    if args.loadgen is not None:
        return _loadgen_main(args.loadgen)
    capacity: CapacityResult | None = None
    wrk: WrkResult | None = None
    if not args.wrk_only:
        capacity = run_capacity(
            args.devices,
            args.step_s,
            warmup_s=args.warmup_s,
            rates=[float(r) for r in args.rates.split(",") if r.strip()],
            log_level=args.log_level,
            workdir=args.workdir / "open-loop" if args.workdir else None,
            progress=True,
        )
        print(markdown(capacity))
    if not args.no_wrk:
        wrk = run_wrk(
            args.devices,
            args.wrk_duration_s,
            connections=args.wrk_connections,
            rounds=args.wrk_rounds,
            log_level=args.log_level,
            workdir=args.workdir / "wrk" if args.workdir else None,
            profile=args.wrk_profile,
            progress=True,
        )
        print(wrk_markdown(wrk))
    if args.json is not None:
        raw = {"capacity": capacity.to_json() if capacity else None, "wrk": wrk.to_json() if wrk else None}
        args.json.write_text(json.dumps(raw, indent=2))
    if args.write:
        write_markdown(capacity, wrk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
