"""A fleet of 100,000 devices against control-plane replicas on PostgreSQL, at the poll interval this machine allows.

    python -m benchmarks.scale [--devices 100000] [--replicas 2] [--generators 2] [--interval-s auto] [--write]

One run, on the PostgreSQL of ``--database-url`` (default: ``SLMOPS_TEST_POSTGRES_URL``; a new schema, dropped
afterwards):

1. Provisioning: a registry with a tiny model and a blueprint for every device, and ``--devices`` approved devices
   with credentials inserted in bulk (as ``benchmarks.capacity`` does; enrolling 100,000 devices over HTTP would
   take hours here). Each device starts with its current ETag: a quiet fleet, whose polls answer 304.
2. ``--replicas`` real ``slmops server`` processes on that database behind Debian's haproxy (round robin, health
   checked), started as :mod:`tests.lb_servers` starts them.
3. Capacity: ``--generators`` load-generator processes (``benchmarks.capacity``'s open-loop generator, each over its
   own slice of the fleet) step the offered rate through haproxy, each step after a warm-up, until the worst
   generator's p99 reaches 100 ms or a request fails. Capacity is the highest step within that limit.
4. The interval: one poll (``GET .../desired``) and one heartbeat (``POST .../status``) per device per interval, at
   ``--headroom`` (default 60%) of the measured capacity, rounded up to a whole minute — unless ``--interval-s``
   fixes it.
5. Sustained: the generators offer ``2 x devices / interval`` requests per second for one whole interval
   (``--sustain-s`` shortens it), so that every device polls and heartbeats once. Reported: achieved requests/s,
   p50/p99/max latency, statuses, CPU seconds of each part (replicas, PostgreSQL, haproxy, generators), the
   database's size before and after, and the server-side CPU per device per interval — the figure that sizes a
   deployment: devices per core at a given interval.

Everything runs on this one machine, so the generators and the database take cores from the replicas; the tables
say how much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._report import write_section
from benchmarks.capacity import P99_LIMIT_MS, REPO, _machine, _percentile, provision

__all__ = ["ScaleResult", "ScaleStep", "markdown", "run_scale"]

DEFAULT_RATES: tuple[float, ...] = (200, 300, 400, 500, 600, 700, 800, 1000, 1200, 1500)


@dataclass
class ScaleStep:
    """One offered rate over all generators: the sum of their achieved rates, the worst of their percentiles."""

    offered_rps: float
    achieved_rps: float
    requests: int
    errors: int
    p50_ms: float  # the median of the generators' medians
    p99_ms: float  # the worst generator's p99 (an upper bound of the fleet's)
    max_ms: float
    duration_s: float
    statuses: dict[str, int]
    dispatch_lag_p99_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # part -> CPU seconds over the step

    @property
    def within_limit(self) -> bool:
        return self.errors == 0 and self.p99_ms < P99_LIMIT_MS


@dataclass
class ScaleResult:
    devices: int
    replicas: int
    generators: int
    started_at: str
    machine: dict[str, str]
    step_s: float = 0.0
    warmup_s: float = 0.0
    provision_s: float = 0.0
    classes: dict[str, int] = field(default_factory=dict)
    capacity_steps: list[ScaleStep] = field(default_factory=list)
    capacity_rps: float = 0.0
    interval_s: float = 0.0
    interval_chosen: str = ""
    sustained: ScaleStep | None = None
    db_bytes_before: int = 0
    db_bytes_after: int = 0
    db_rows: dict[str, int] = field(default_factory=dict)
    schema: str = ""  # the PostgreSQL schema of the run (dropped at its end)
    idle_cores: dict[str, float] = field(default_factory=dict)  # part -> cores used with no device traffic
    total_s: float = 0.0
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================ parts and their CPU


def _cpu_by_part(groups: dict[str, set[int]]) -> dict[str, float]:
    """CPU seconds (user + system, children included) per part; ``postgres`` is every process of that name."""
    import psutil

    pids = dict(groups)
    pids["postgres"] = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"}
    out: dict[str, float] = {}
    for part, members in pids.items():
        total = 0.0
        for pid in members:
            try:
                times = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += times.user + times.system + times.children_user + times.children_system
        out[part] = total
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {part: round(max(0.0, after[part] - before.get(part, 0.0)), 2) for part in after}


def _schema_bytes(engine: Any, schema: str) -> tuple[int, dict[str, int]]:
    from sqlalchemy import text

    with engine.connect() as connection:
        size = connection.execute(
            text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r'"
            ),
            {"s": schema},
        ).scalar_one()
        rows = {
            table: int(connection.execute(text(f'SELECT count(*) FROM "{schema}".{table}')).scalar_one())
            for table in ("devices", "device_events")
            if connection.execute(text("SELECT to_regclass(:t)"), {"t": f'"{schema}".{table}'}).scalar_one()
        }
    return int(size), rows


# ============================================================================ the generators


def _run_generators(
    specs: list[dict[str, Any]], workdir: Path, name: str, groups: dict[str, set[int]], timeout_s: float
) -> ScaleStep:
    """Run one generator process per spec at once (each one rate); merge their one step each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    processes: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    with ExitStack() as stack:
        for index, spec in enumerate(specs):
            spec_path = workdir / f"gen-{name}-{index}.json"
            out_path = workdir / f"gen-{name}-{index}-result.json"
            log_path = workdir / f"gen-{name}-{index}.log"
            spec_path.write_text(json.dumps({**spec, "output": str(out_path)}))
            log = stack.enter_context(log_path.open("wb"))
            argv = [sys.executable, "-m", "benchmarks.capacity", "--loadgen", str(spec_path)]
            processes.append(
                (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), out_path, log_path)
            )
        groups = {**groups, "generators": {p.pid for p, _, _ in processes}}
        before = _cpu_by_part(groups)
        deadline = time.monotonic() + timeout_s
        last: dict[str, float] = before
        while any(p.poll() is None for p, _, _ in processes):
            if time.monotonic() > deadline:
                for p, _, _ in processes:
                    p.kill()
                raise RuntimeError(f"the load generators of {name} did not finish within {timeout_s:.0f} s")
            sample = _cpu_by_part(groups)  # a generator's own CPU is lost once it has exited: keep its last
            last = {part: max(sample.get(part, 0.0), last.get(part, 0.0)) for part in sample}
            time.sleep(0.5)
        for p, _, log_path in processes:
            if p.returncode != 0:
                raise RuntimeError(f"a load generator failed with {p.returncode}:\n{log_path.read_text()[-3000:]}")
        after = _cpu_by_part(groups)
        after["generators"] = last.get("generators", 0.0)
    steps = [json.loads(out.read_text())[0] for _, out, _ in processes]
    statuses: dict[str, int] = {}
    for step in steps:
        for key, count in step["statuses"].items():
            statuses[key] = statuses.get(key, 0) + count
    medians = sorted(step["p50_ms"] for step in steps)
    return ScaleStep(
        offered_rps=round(sum(step["offered_rps"] for step in steps), 1),
        achieved_rps=round(sum(step["achieved_rps"] for step in steps), 1),
        requests=sum(step["requests"] for step in steps),
        errors=sum(step["errors"] for step in steps),
        p50_ms=round(_percentile(medians, 0.5), 2),
        p99_ms=max(step["p99_ms"] for step in steps),
        max_ms=max(step["max_ms"] for step in steps),
        duration_s=max(step["duration_s"] for step in steps),
        statuses=dict(sorted(statuses.items())),
        dispatch_lag_p99_ms=max(step["dispatch_lag_p99_ms"] for step in steps),
        cpu_s=_delta(after, before),
    )


# ============================================================================ the benchmark


def run_scale(
    database_url: str,
    devices: int = 100_000,
    *,
    replicas: int = 2,
    generators: int = 2,
    rates: tuple[float, ...] = DEFAULT_RATES,
    step_s: float = 15.0,
    warmup_s: float = 3.0,
    headroom: float = 0.6,
    interval_s: float | None = None,
    sustain_s: float | None = None,
    connections: int = 32,
    idle_s: float = 20.0,
    workdir: Path | None = None,
    progress: bool = True,
) -> ScaleResult:
    import secrets

    from sqlalchemy import create_engine, text
    from tests.conftest import postgres_schema_url
    from tests.lb_servers import Replica, running_haproxy

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    result = ScaleResult(devices, replicas, generators, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), _machine())
    result.step_s, result.warmup_s = step_s, warmup_s
    schema = result.schema = "scale_" + secrets.token_hex(4)
    admin = create_engine(database_url)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = postgres_schema_url(database_url, schema)
    try:
        with tempfile.TemporaryDirectory(prefix="slmops-scale-") as scratch, ExitStack() as stack:
            work = Path(workdir) if workdir is not None else Path(scratch)
            work.mkdir(parents=True, exist_ok=True)
            home = work / "home"
            say(f"provisioning {devices} devices in schema {schema} ...")
            fleet, result.classes = provision(home, devices, url, say)
            result.provision_s = round(time.monotonic() - started, 1)
            say(f"provisioned in {result.provision_s:.0f} s: {result.classes}")
            slices = []
            for index in range(generators):
                path = work / f"fleet-{index}.json"
                path.write_text(json.dumps(fleet[index::generators]))
                slices.append(path)
            del fleet

            env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
            env.update(SLMOPS_HOME=str(home), SLMOPS_DATABASE_URL=url)
            servers = [Replica(f"replica-{i}", work, env) for i in range(replicas)]
            for server in servers:
                stack.callback(server.kill)
            for server in servers:
                server.wait_ready(120)
            lb = stack.enter_context(running_haproxy(servers, work))
            groups = {
                "replicas": set().union(*(server.pids() for server in servers)),
                "haproxy": _haproxy_pids(work / "haproxy.cfg"),
            }
            say(f"{replicas} replicas behind haproxy at {lb}")
            # What the parts burn with no device traffic (haproxy's health checks, the replicas' background loops):
            # the sustained run's per-device cost is given with and without it.
            before = _cpu_by_part(groups)
            time.sleep(idle_s)
            result.idle_cores = {p: round(v / idle_s, 3) for p, v in _delta(_cpu_by_part(groups), before).items()}
            say(f"idle: {result.idle_cores} cores")
            result.db_bytes_before, _ = _schema_bytes(admin, schema)

            def specs(rate: float, duration_s: float, warm_s: float) -> list[dict[str, Any]]:
                return [
                    {
                        "kind": "control",
                        "url": lb,
                        "fleet": str(path),
                        "rates": [rate / generators],
                        "step_s": duration_s,
                        "warmup_s": warm_s,
                        "p99_limit_ms": P99_LIMIT_MS,
                        "max_connections": connections,
                        "drain_s": 15.0,
                        "server_pid": os.getpid(),  # unused here: the parts' CPU is measured by this process
                    }
                    for path in slices
                ]

            if interval_s is None:
                for rate in rates:
                    step = _run_generators(
                        specs(rate, step_s, warmup_s), work, f"cap{rate:g}", groups, step_s * 4 + 120
                    )
                    result.capacity_steps.append(step)
                    say(
                        f"capacity: offered {step.offered_rps:g}/s achieved {step.achieved_rps:g}/s p50 "
                        f"{step.p50_ms:g} p99 {step.p99_ms:g} ms errors {step.errors} cpu {step.cpu_s}"
                    )
                    if not step.within_limit:
                        break
                within = [s.achieved_rps for s in result.capacity_steps if s.within_limit]
                result.capacity_rps = max(within, default=0.0)
                if result.capacity_rps <= 0:
                    raise RuntimeError("even the first capacity step failed; see the generator logs in --workdir")
                raw = 2 * devices / (headroom * result.capacity_rps)
                result.interval_s = float(math.ceil(raw / 60) * 60)
                result.interval_chosen = (
                    f"2 x {devices} requests per interval at {headroom:.0%} of the measured "
                    f"{result.capacity_rps:g} req/s = {raw:.0f} s, rounded up to a whole minute"
                )
            else:
                result.interval_s = interval_s
                result.interval_chosen = "given (--interval-s)"
            rate = 2 * devices / result.interval_s
            duration = result.interval_s if sustain_s is None else min(sustain_s, result.interval_s)
            say(f"sustained: {rate:.1f} req/s (interval {result.interval_s:g} s) for {duration:g} s ...")
            result.sustained = _run_generators(
                specs(rate, duration, warmup_s), work, "sustained", groups, duration + 300
            )
            say(f"sustained: {result.sustained}")
            result.db_bytes_after, result.db_rows = _schema_bytes(admin, schema)
    finally:
        with admin.begin() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()
    result.total_s = round(time.monotonic() - started, 1)
    return result


def _haproxy_pids(config: Path) -> set[int]:
    import psutil

    return {
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "haproxy" and str(config) in (p.info["cmdline"] or [])
    }


# ============================================================================ the report


def _server_cpu_s(step: ScaleStep) -> float:
    return sum(step.cpu_s.get(part, 0.0) for part in ("replicas", "postgres", "haproxy"))


def markdown(result: ScaleResult) -> str:
    m = result.machine
    lines = [
        f"## Scale: {result.devices:,} devices against {result.replicas} replicas on PostgreSQL",
        "",
        f"`{result.command}` on {m['cpu']}, {m['cores']} cores, {result.started_at}; {result.replicas} `slmops "
        f"server` processes (one uvicorn worker each) on one PostgreSQL behind haproxy; {result.generators} "
        f"open-loop generator processes (each over its own slice of the fleet); provisioning took "
        f"{result.provision_s:.0f} s (bulk insert; each device starts with its current ETag, so its polls answer "
        f"304). Latency counts from when a request was due; p99 is the worst generator's.",
        "",
    ]
    if result.capacity_steps:
        lines += [
            "Capacity through haproxy (p99 < 100 ms, no errors):",
            "",
            "| offered req/s | achieved req/s | p50 ms | p99 ms | errors "
            "| CPU ms per request: replicas / postgres / haproxy / generators |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for s in result.capacity_steps:
            sent = s.offered_rps * (result.step_s + result.warmup_s)  # the CPU counts the warm-up's requests too
            parts = ("replicas", "postgres", "haproxy", "generators")
            cpu = " / ".join(f"{1000 * s.cpu_s.get(p, 0) / max(sent, 1):.2f}" for p in parts)
            lines.append(
                f"| {s.offered_rps:g} | {s.achieved_rps:g} | {s.p50_ms:g} | {s.p99_ms:g} | {s.errors} | {cpu} |"
            )
        lines += [
            "",
            f"Capacity: {result.capacity_rps:g} req/s. The first step past it stays in the table: there requests "
            "wait in the generators' queues (each generator holds a fixed number of keep-alive connections), so "
            "latency grows by seconds rather than requests failing.",
            "",
        ]
    s = result.sustained
    if s is not None:
        server_cpu = _server_cpu_s(s)
        idle_cpu = s.duration_s * sum(result.idle_cores.get(p, 0.0) for p in ("replicas", "postgres", "haproxy"))
        cycles = s.requests / 2  # one poll + one heartbeat per device per interval
        per_device_ms = 1000 * server_cpu / max(cycles, 1)
        marginal_ms = 1000 * max(0.0, server_cpu - idle_cpu) / max(cycles, 1)
        per_core = result.interval_s / (per_device_ms / 1000) if per_device_ms > 0 else math.inf
        cores = {p: v / s.duration_s for p, v in s.cpu_s.items()}
        lines += [
            f"Sustained, interval {result.interval_s:g} s ({result.interval_chosen}): every device polls once and "
            f"heartbeats once per interval.",
            "",
            "| devices | interval s | offered req/s | achieved req/s | requests | errors "
            "| p50 ms | p99 ms | max ms | statuses |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {result.devices:,} | {result.interval_s:g} | {s.offered_rps:g} | {s.achieved_rps:g} | {s.requests:,} | "
            f"{s.errors} | {s.p50_ms:g} | {s.p99_ms:g} | {s.max_ms:g} | "
            + ", ".join(f"{k}: {v:,}" for k, v in s.statuses.items())
            + " |",
            "",
            "| part | CPU s over the run | cores (average) | cores with no device traffic |",
            "|---|---:|---:|---:|",
            *[f"| {p} | {v:.1f} | {cores[p]:.2f} | {result.idle_cores.get(p, 0.0):.2f} |" for p, v in s.cpu_s.items()],
            "",
            f"Server side (replicas + PostgreSQL + haproxy): {server_cpu:.1f} CPU s for {cycles:,.0f} device "
            f"intervals = **{per_device_ms:.2f} ms of CPU per device per interval** (one 304 poll and one "
            f"heartbeat; {marginal_ms:.2f} ms without what the parts burn with no traffic). A fully used core's "
            f"{result.interval_s:g} CPU s per interval carry about **{per_core:,.0f} devices per core with an "
            f"interval of {result.interval_s:g} s**; the figure is linear in the interval (about "
            f"{per_core / result.interval_s * 60:,.0f} per core per minute of interval: a 5-minute interval carries "
            "five times the 1-minute figure). Size with headroom: this run kept the machine's cores "
            f"{sum(cores.values()) / max(float(m['cores']), 1):.0%} busy on average, generators included.",
            "",
            f"Database (the schema's tables and indexes): {result.db_bytes_before / 2**20:.1f} MiB before the run, "
            f"{result.db_bytes_after / 2**20:.1f} MiB after; rows: "
            + ", ".join(f"{k} {v:,}" for k, v in result.db_rows.items())
            + f" ({result.db_bytes_after / max(result.devices, 1) / 1024:.1f} KiB per device).",
        ]
    lines += [
        "",
        f"Load average at the start {m['load_avg_at_start']}; total run {result.total_s:.0f} s. The generators, "
        "PostgreSQL and haproxy share the cores with the replicas; on separate machines the replicas' share is "
        "what scales with replicas, PostgreSQL's what does not.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("SLMOPS_TEST_POSTGRES_URL"))
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES), help="capacity steps, req/s")
    parser.add_argument("--step-s", type=float, default=15.0)
    parser.add_argument("--headroom", type=float, default=0.6, help="fraction of the capacity the interval uses")
    parser.add_argument("--interval-s", type=float, default=None, help="skip the capacity steps; use this interval")
    parser.add_argument("--sustain-s", type=float, default=None, help="shorter than one interval (not every device)")
    parser.add_argument("--write", action="store_true", help="replace the scale section of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("give --database-url postgresql+psycopg://... (or set SLMOPS_TEST_POSTGRES_URL)")
    result = run_scale(
        args.database_url,
        args.devices,
        replicas=args.replicas,
        generators=args.generators,
        rates=tuple(float(r) for r in args.rates.split(",")),
        step_s=args.step_s,
        headroom=args.headroom,
        interval_s=args.interval_s,
        sustain_s=args.sustain_s,
        workdir=args.workdir,
    )
    result.command = "python -m benchmarks.scale " + " ".join(
        part
        for part in [
            f"--devices {args.devices}",
            f"--replicas {args.replicas}",
            f"--generators {args.generators}",
            f"--interval-s {args.interval_s:g}" if args.interval_s else "",
            f"--sustain-s {args.sustain_s:g}" if args.sustain_s else "",
            "--write" if args.write else "",
        ]
        if part
    )
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    if args.write:
        write_section(text, "scale")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
