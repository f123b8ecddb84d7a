"""The test matrix: each candidate variant in a real ``slmops agent`` per device class, under that class's limits.

For one matrix, a private control plane is set up in its own ``SLMOPS_HOME`` (a fresh registry with its own signing
key, the candidate files imported into it, an admin token made on its database), and ``slmops server`` runs on a
loopback port. Then, one (variant, class) job at a time (so the jobs do not compete for this machine's cores):

1. a blueprint pins the variant for devices labelled with the job's id; an auto-approving enrollment token carries
   that label;
2. ``slmops agent`` starts inside the class's limits (:mod:`slmops.pipeline.limits`): memory cap, CPU set, a data
   directory on a filesystem of the class's disk size; it reports the class's RAM and cores as its capabilities;
3. it enrolls, downloads, verifies the signed manifest and every file, probes the model and serves it; the job waits
   for the control plane to see the device ``serving`` the variant;
4. the fixed prompt set goes through the agent's local OpenAI-compatible API (``/v1/chat/completions``, greedy);
   tokens/s is completion tokens over the summed request wall time (prefill included, so it understates pure decode
   speed; the agent's own measured decode speed, from its runtime tuning, is recorded beside it when it reports
   one); memory is the cgroup's peak charge when a cgroup enforced the cap, else the largest RSS of the process tree
   sampled while serving;
5. the agent is stopped (SIGTERM) and the limits removed.

A job that dies (killed at the memory cap, out of disk, a failed probe) or times out fails, with the reason and the
tail of the agent's log. Numbers are measured in this run; nothing is extrapolated to the class's real hardware.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.pipeline.limits import Confinement, Enforcement
from slmops.pipeline.spec import DeviceClassSpec, MatrixSpec

if TYPE_CHECKING:
    from slmops.control.client import OperatorClient

__all__ = ["MatrixJob", "MatrixRun", "run_matrix"]

_MATRIX_LABEL = "slmops-matrix"


@dataclass(frozen=True)
class MatrixJob:
    variant: str
    digest: str  # the variant's manifest digest in the pipeline's registry
    file: Path  # its single GGUF file (a registry blob)
    file_name: str  # that file's name in the manifest
    model_name: str
    device_class: DeviceClassSpec
    ram_share: float | None

    @property
    def job_id(self) -> str:
        return f"{self.device_class.name}.{self.variant}"[:63]


@dataclass
class MatrixRun:
    variant: str
    device_class: str
    digest: str
    ok: bool
    reason: str
    reached: str  # the last stage reached: setup | enroll | serve | prompts | done
    prompts: int = 0
    completion_tokens: int = 0
    request_seconds: float = 0.0
    tokens_per_s: float | None = None
    agent_decode_tokens_per_s: float | None = None  # what the agent measured itself (its tuning), when it reports it
    peak_memory_bytes: int | None = None
    peak_memory_source: str = ""
    seconds: float = 0.0
    limits: dict[str, Any] = field(default_factory=dict)
    memory_cap_hit: bool = False
    cached: bool = False

    @property
    def conclusive(self) -> bool:
        """Whether the result says something about the variant on the class (kept in the cache), rather than about
        this run (a crash, a timeout, a refused download: tried again on the next run)."""
        return self.ok or self.memory_cap_hit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MatrixRun:
        return cls(**value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _tree_rss_bytes(pid: int) -> int:
    """Summed VmRSS of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata:
  name: {name}
spec:
  selector:
    labels: {{{label}: {job}}}
  model: {{name: {model}, ref: "{digest}"}}
  variant: {{pin: "{digest}"}}
  runtime: {{threads: {threads}, context_tokens: {context}}}
"""


class _PrivatePlane:
    """A private control plane (registry, database, ``slmops server``) for one matrix."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home = home
        self.log = log
        self.url = ""
        self.token = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.digests: dict[str, str] = {}  # pipeline digest -> digest in the private registry

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        return {
            **keep,
            "SLMOPS_HOME": str(self.home),
            "SLMOPS_DESIRED_CACHE_TTL_S": "0",
            "SLMOPS_AUTH_CACHE_TTL_S": "0",
        }

    def open(self, jobs: list[MatrixJob], timeout_s: float) -> None:
        from slmops.config import Settings
        from slmops.control import ControlPlane
        from slmops.control.credentials import create_api_token
        from slmops.control.settings import ServerSettings
        from slmops.registry import Registry

        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        registry = Registry.open(Settings(home=self.home))
        try:
            registry.keys.init()
            staged = self.home / "staged"
            staged.mkdir()
            for job in jobs:
                if job.digest not in self.digests:
                    named = staged / job.digest.removeprefix("sha256:")[:16] / job.file_name
                    named.parent.mkdir()
                    try:
                        os.link(job.file, named)  # the blob, under its manifest file name (no copy when possible)
                    except OSError:
                        shutil.copyfile(job.file, named)
                    imported = registry.import_model(named, job.model_name).envelope
                    self.digests[job.digest] = imported.digest
        finally:
            registry.close()
        plane = ControlPlane.open(ServerSettings(home=self.home))
        try:
            self.token = create_api_token(plane, "pipeline-matrix", "admin", "pipeline").token
        finally:
            plane.close()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slmops", "server", "--port", str(port)],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        from slmops.errors import UnavailableError

        deadline = time.monotonic() + timeout_s
        assert self.process is not None
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise UnavailableError(
                    f"the test matrix's control plane did not start ({_tail(self.log)}); see {self.log}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


def _run_job(
    job: MatrixJob,
    spec: MatrixSpec,
    plane: _PrivatePlane,
    client: OperatorClient,
    enforcement: Enforcement,
    workdir: Path,
) -> MatrixRun:
    import httpx

    started = time.monotonic()
    device_class = job.device_class
    digest = plane.digests[job.digest]
    run = MatrixRun(job.variant, device_class.name, job.digest, ok=False, reason="", reached="setup")
    client.apply(
        _BLUEPRINT.format(
            name=f"matrix-{job.job_id}".replace("_", "-")[:63].rstrip(".-"),
            label=_MATRIX_LABEL,
            job=job.job_id,
            model=job.model_name,
            digest=digest,
            threads=device_class.thread_count,
            context=spec.context_tokens,
        )
    )
    enroll = client.create_enrollment_token(auto_approve=True, labels={_MATRIX_LABEL: job.job_id})
    confinement = Confinement(
        enforcement,
        memory_bytes=device_class.memory_bytes,
        cores=device_class.core_count,
        disk_bytes=device_class.disk_mib * (1 << 20) if device_class.disk_mib else None,
        data_dir=workdir / "agents" / job.job_id,
    )
    log = workdir / f"agent-{job.job_id}.log"
    api_port = _free_port()
    peak_rss = 0
    confinement.setup()
    try:
        argv = confinement.wrap(
            [
                sys.executable, "-m", "slmops", "agent", "--server", plane.url, "--enroll-token", enroll.token,
                "--data-dir", str(confinement.data_dir), "--memory-bytes", str(device_class.memory_bytes),
                "--cpu-cores", str(device_class.core_count), "--poll-interval-s", "0.5", "--probation-s", "0",
                "--health-interval-s", "3600", "--api-port", str(api_port),
            ]
        )  # fmt: skip
        run.limits = confinement.describe()
        run.reached = "enroll"
        with log.open("ab") as out:
            process = subprocess.Popen(argv, env=plane.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = started + spec.timeout_s
            while True:
                if process.poll() is not None:
                    run.reason = _died(process.returncode, confinement, log)
                    run.memory_cap_hit = confinement.memory_cap_hit()
                    return run
                devices = [d for d in client.devices() if d.labels.get(_MATRIX_LABEL) == job.job_id]
                if devices:
                    run.reached = "serve"
                    device = devices[0]
                    if device.phase == "serving" and device.active_digest == digest:
                        tuning = device.capabilities.tuning if device.capabilities is not None else None
                        if tuning is not None and tuning.model_digest in (digest, ""):
                            run.agent_decode_tokens_per_s = tuning.decode_tokens_per_s
                        break
                    if device.phase == "error" and device.last_error:
                        run.reason = f"the agent reported an error: {device.last_error}"
                        return run
                if time.monotonic() > deadline:
                    what = f"phase {devices[0].phase}" if devices else "never enrolled"
                    run.reason = f"timed out after {spec.timeout_s:.0f} s ({what}); log: {_tail(log)}"
                    return run
                peak_rss = max(peak_rss, _tree_rss_bytes(process.pid))
                time.sleep(0.3)
            run.reached = "prompts"
            with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=spec.timeout_s) as local:
                for prompt in spec.prompts:
                    body = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": spec.max_tokens,
                        "temperature": 0.0,
                    }
                    begun = time.perf_counter()
                    try:
                        answer = local.post("/v1/chat/completions", json=body)
                    except httpx.TransportError as exc:
                        died = _died(process.wait(timeout=10), confinement, log)
                        run.memory_cap_hit = confinement.memory_cap_hit()
                        run.reason = f"the local API failed on prompt {run.prompts + 1}: {exc}; {died}"
                        return run
                    run.request_seconds += time.perf_counter() - begun
                    if answer.status_code != 200:
                        run.reason = (
                            f"the local API answered {answer.status_code} on prompt {run.prompts + 1}: "
                            f"{answer.text[:200]}"
                        )
                        return run
                    run.prompts += 1
                    run.completion_tokens += int(answer.json().get("usage", {}).get("completion_tokens", 0))
                    peak_rss = max(peak_rss, _tree_rss_bytes(process.pid))
            run.tokens_per_s = run.completion_tokens / run.request_seconds if run.request_seconds > 0 else None
            cgroup_peak = confinement.peak_memory_bytes()
            if cgroup_peak is not None:
                run.peak_memory_bytes, run.peak_memory_source = cgroup_peak, f"{enforcement.memory} peak charge"
            else:
                run.peak_memory_bytes, run.peak_memory_source = peak_rss, "largest sampled RSS of the process tree"
            run.reached, run.ok = "done", True
            run.reason = (
                f"served {run.prompts} prompts: {run.completion_tokens} tokens, "
                f"{run.tokens_per_s or 0:.1f} tokens/s, peak memory {run.peak_memory_bytes / (1 << 20):.0f} MiB"
            )
            return run
        finally:
            _stop(process)
    finally:
        confinement.teardown()
        run.seconds = time.monotonic() - started


def _died(code: int | None, confinement: Confinement, log: Path) -> str:
    if code is None:
        return "the agent still runs"
    capped = confinement.memory_cap_hit()
    if capped or code in (-signal.SIGKILL, 128 + signal.SIGKILL, 137):
        cap = confinement.memory_bytes / (1 << 20)
        if capped:
            return f"does not fit: killed at the class's memory cap ({cap:.0f} MiB, {confinement.enforcement.memory})"
        return f"killed (SIGKILL) under a {cap:.0f} MiB memory cap; log: {_tail(log)}"
    return f"the agent exited with code {code}; log: {_tail(log)}"


def run_matrix(
    jobs: list[MatrixJob],
    spec: MatrixSpec,
    workdir: Path,
    enforcement: Enforcement,
    *,
    on_run: Callable[[MatrixRun], None] | None = None,
) -> list[MatrixRun]:
    """Run every job (in order, one at a time) on a private control plane; one :class:`MatrixRun` per job."""
    from slmops.control.client import OperatorClient

    if not jobs:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    plane = _PrivatePlane(workdir / "home", workdir / "server.log")
    runs: list[MatrixRun] = []
    try:
        plane.open(jobs, timeout_s=60)
        with OperatorClient(plane.url, plane.token) as client:
            for job in jobs:
                run = _run_job(job, spec, plane, client, enforcement, workdir)
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    finally:
        plane.close()
    (workdir / "runs.json").write_text(json.dumps([r.to_json() for r in runs], indent=1))
    return runs
