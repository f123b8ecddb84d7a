"""Differential privacy on telemetry: what the noise costs the fleet roll-ups the control plane computes.

    python -m benchmarks.dp [--devices 100 1000] [--repeats 5] [--seed 0] [--write]

A seeded synthetic fleet: each device reports one window of one version (requests ~ Poisson(60), error rate
drawn per device around 2 %, latencies log-normal around a per-device median of 150-400 ms, token counts in
the drift summary). For each epsilon per window, every window goes through
:func:`slmops.feedback.dp.privatize_window` (OpenDP's discrete Laplace, sensitivity 11 per request), and the
windows are rolled up per (version, device class) by :func:`slmops.telemetry.aggregate.rollup` (what
``GET /api/v1/telemetry/rollup`` and the gates read). Reported: the relative error of the fleet's request count,
error rate, p95 latency (from the merged histogram, as :func:`slmops.cli.telemetry.quantile_ms` reads it, to bucket
resolution) and completion-token total against the exact roll-up; the median and 95th percentile over
``--repeats`` noise draws. ``inf`` is the exact roll-up (no noise). The noise itself cannot be seeded (OpenDP
draws from the OS's CSPRNG); the fleet can.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks._report import write_section
from slmops.cli.telemetry import quantile_ms
from slmops.core.wire import TOKEN_BUCKETS, DriftSummary, TelemetryWindow
from slmops.feedback.dp import REQUEST_SENSITIVITY, privatize_window
from slmops.telemetry.aggregate import Rollup, histogram_from_ms, rollup

__all__ = ["EPSILONS", "fleet", "main", "markdown", "measure"]

EPSILONS = (0.1, 0.5, 1.0, 2.0, 5.0, math.inf)
DIGEST = "sha256:" + "ab" * 32
CLASS = "cpu-4c-8g"


def fleet(devices: int, seed: int) -> list[tuple[str, str, TelemetryWindow]]:
    rng = random.Random(seed)
    out = []
    for d in range(devices):
        n = max(0, round(rng.gauss(60, math.sqrt(60))))
        p_err = min(0.5, max(0.0, rng.gauss(0.02, 0.01)))
        errors = sum(rng.random() < p_err for _ in range(n))
        median = rng.uniform(150, 400)
        latencies = [median * math.exp(rng.gauss(0, 0.5)) for _ in range(n - errors)]
        prompt = [max(1.0, rng.lognormvariate(4.0, 0.8)) for _ in range(n)]
        completion = [max(1.0, rng.lognormvariate(4.5, 0.6)) for _ in range(n)]
        drift = DriftSummary(
            requests=n,
            prompt_tokens=histogram_from_ms(prompt, TOKEN_BUCKETS),
            completion_tokens=histogram_from_ms(completion, TOKEN_BUCKETS),
            finish_reasons={k: v for k, v in {"stop": n - errors, "error": errors}.items() if v},
        )
        window = TelemetryWindow(
            id=f"w{d}",
            version_digest=DIGEST,
            window_start="2024-06-10T10:00:00Z",
            window_s=3600,
            requests=n,
            errors=errors,
            prompt_tokens=round(sum(prompt)),
            completion_tokens=round(sum(completion)),
            latency_ms=histogram_from_ms(latencies),
            ttft_ms=histogram_from_ms([x * 0.2 for x in latencies]),
            per_token_ms=histogram_from_ms([x / 60 for x in latencies]),
            drift=drift,
        )
        out.append((f"d{d}", CLASS, window))
    return out


def _stats(r: Rollup) -> dict[str, float]:
    return {
        "requests": float(r.requests),
        "error rate": r.errors / r.requests if r.requests else 0.0,
        "p95 latency": quantile_ms(r.latency_ms, 0.95) or 0.0,
        "completion tokens": float(r.completion_tokens),
    }


@dataclass(frozen=True)
class Row:
    devices: int
    epsilon: float
    errors: dict[str, tuple[float, float]]  # metric -> (median, p95) relative error


def measure(devices: int, epsilon: float, repeats: int, seed: int) -> Row:
    windows = fleet(devices, seed)
    exact = _stats(rollup(windows)[(DIGEST, CLASS)])
    rel: dict[str, list[float]] = {k: [] for k in exact}
    for _ in range(1 if math.isinf(epsilon) else repeats):
        noisy = windows if math.isinf(epsilon) else [(d, c, privatize_window(w, epsilon)) for d, c, w in windows]
        got = _stats(rollup(noisy)[(DIGEST, CLASS)])
        for k, v in got.items():
            rel[k].append(abs(v - exact[k]) / exact[k] if exact[k] else abs(v))
    return Row(devices, epsilon, {k: (statistics.median(v), _p95(v)) for k, v in rel.items()})


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def markdown(rows: list[Row], repeats: int, seed: int, total_s: float, command: str) -> str:
    metrics = list(rows[0].errors)
    lines = [
        "## Differential privacy on telemetry: accuracy cost on fleet roll-ups",
        "",
        f"One window per device (Poisson(60) requests, ~2 % errors), one (version, class) roll-up through "
        f"`slmops.telemetry.aggregate.rollup`; discrete Laplace via OpenDP, L1 sensitivity {REQUEST_SENSITIVITY} "
        f"per request, histograms rescaled to the noisy request count. Relative error against the exact roll-up, "
        f"median / p95 over {repeats} noise draws (`inf`: no noise; p95 latency is read to bucket resolution, so "
        "its error is 0 or a bucket step).",
        "",
        "| devices | epsilon / window | " + " | ".join(metrics) + " |",
        "|---:|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        eps = "inf" if math.isinf(row.epsilon) else f"{row.epsilon:g}"
        cells = [f"{row.errors[m][0] * 100:.1f} % / {row.errors[m][1] * 100:.1f} %" for m in metrics]
        lines.append(f"| {row.devices} | {eps} | " + " | ".join(cells) + " |")
    lines += ["", f"Fleet seed {seed}, total {total_s:.0f} s. Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000], help="fleet sizes (default 100 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="noise draws per cell (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="fleet seed (default 0)")
    parser.add_argument("--write", action="store_true", help="replace the dp section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = ("python -m benchmarks.dp " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    started = time.perf_counter()
    rows = []
    for devices in args.devices:
        for epsilon in EPSILONS:
            rows.append(measure(devices, epsilon, args.repeats, args.seed))
            print(f"devices {devices} epsilon {epsilon}: done", file=sys.stderr, flush=True)
    section = markdown(rows, args.repeats, args.seed, time.perf_counter() - started, command)
    print(section)
    if args.write:
        write_section(section, "dp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
