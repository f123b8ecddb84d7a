"""Differential privacy on the agent's telemetry: noise when the desired state asks for it, a daily budget that
survives restarts, and exact windows when there is no policy."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from slmops.agent._context import AgentContext
from slmops.agent.config import AgentConfig
from slmops.agent.outbox import TelemetryOutbox
from slmops.agent.privacy import PrivacyBudget
from slmops.agent.reporting import Reporter
from slmops.agent.state import DataDir, ProbeRecord
from slmops.core.feedback import DifferentialPrivacy, PrivacyPolicy
from slmops.core.manifest import SignedManifest
from slmops.core.wire import DesiredState, DriftSummary, RuntimeConfig, TelemetryWindow
from slmops.feedback.dp import REQUEST_SENSITIVITY, noise_scale, noisy_counts, privatize_window
from slmops.runtime.stats import RequestStats
from slmops.telemetry.aggregate import histogram_from_ms

DAY0 = 1_718_000_000.0  # 2024-06-10T06:13:20Z


class StatsOnlyRuntime:
    """The part of a runtime the reporter reads: the local API's request stats (real :class:`RequestStats`)."""

    url: str | None = None

    def __init__(self) -> None:
        self.stats = RequestStats()

    def probe(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> ProbeRecord:
        raise NotImplementedError

    def serve(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> None:
        raise NotImplementedError

    def stop_serving(self) -> None: ...

    def check(self) -> ProbeRecord:
        raise NotImplementedError

    def close(self) -> None: ...


class Device:
    def __init__(self, root: Path, clock: list[float]) -> None:
        data = DataDir(root)
        data.initialize()
        self.runtime = StatsOnlyRuntime()
        self.ctx = AgentContext(AgentConfig(data_dir=root), data, runtime=self.runtime, clock=lambda: clock[0])
        self.ctx.outbox.open()
        self.telemetry = TelemetryOutbox(data.telemetry_file)
        self.reporter = Reporter(self.ctx, self.telemetry)
        self.reporter.open()

    def serve(self, requests: int) -> None:
        for i in range(requests):
            self.runtime.stats.record(
                "tiny@v1",
                ok=i % 10 != 0,
                prompt_tokens=20,
                completion_tokens=30,
                latency_s=0.2,
                time_to_first_token_s=0.05,
            )

    def close(self, policy: PrivacyPolicy) -> list[TelemetryWindow]:
        self.ctx.state.desired = DesiredState(device_id="d", generation="g", privacy=policy)
        return self.reporter.close_window(None, force=True)

    def events(self) -> list[str]:
        return [e.kind for e in self.ctx.outbox.pending()]

    def shutdown(self) -> None:
        self.telemetry.close()
        self.ctx.outbox.close()


def test_no_policy_reports_exact_counts(tmp_path: Path) -> None:
    device = Device(tmp_path / "agent", [DAY0])
    device.serve(40)
    [window] = device.close(PrivacyPolicy())
    assert (window.requests, window.errors, window.prompt_tokens, window.completion_tokens) == (40, 4, 800, 1200)
    assert sum(window.latency_ms.counts) == 36  # the successful requests' latencies, untouched
    assert window.drift is not None and window.drift.finish_reasons == {"stop": 36, "error": 4}
    assert not (tmp_path / "agent" / "privacy_budget.json").exists()
    device.shutdown()


def test_policy_adds_noise_and_the_budget_survives_a_restart(tmp_path: Path) -> None:
    clock = [DAY0]
    policy = PrivacyPolicy(dp=DifferentialPrivacy(epsilon_per_window=1.0, epsilon_per_day=3.0))
    device = Device(tmp_path / "agent", clock)
    noisy: list[TelemetryWindow] = []
    for _ in range(2):
        device.serve(40)
        noisy += device.close(policy)
        clock[0] += 60
    device.shutdown()

    device = Device(tmp_path / "agent", clock)  # a restart: the ledger is read back, not reset
    assert device.reporter.privacy.today(clock[0]).spent == pytest.approx(2.0)
    device.serve(40)
    noisy += device.close(policy)
    device.serve(40)
    [spent] = device.close(policy)
    device.serve(40)
    [spent_again] = device.close(policy)

    # Noise: three windows of the same 40 requests do not all come out exact (P(all exact) < 1e-3 at scale 11).
    assert len(noisy) == 3 and any(w.requests != 40 or w.errors != 4 for w in noisy)
    for window in noisy:  # still valid on the wire, and sums are recomputed from the noisy histograms
        TelemetryWindow.model_validate(window.model_dump())
        assert window.drift is not None and window.drift.requests >= window.drift.empty_outputs
    # Exhausted: liveness only, one event for the day.
    for window in (spent, spent_again):
        assert (window.requests, window.errors, window.prompt_tokens, window.drift) == (0, 0, 0, None)
        assert sum(window.latency_ms.counts) == 0 and window.window_s > 0
    assert device.events().count("privacy_budget_exhausted") == 1

    clock[0] += 86_400  # the next UTC day has a fresh budget
    device.serve(40)
    [fresh] = device.close(policy)
    assert fresh.drift is not None
    assert device.reporter.privacy.today(clock[0]).spent == pytest.approx(1.0)
    device.shutdown()


def test_budget_ledger_is_fail_closed_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "privacy_budget.json"
    path.write_text("{not json")
    budget = PrivacyBudget(path)
    budget.open()
    import time

    assert not budget.try_spend(0.1, epsilon_per_day=100.0, now=time.time())


def test_noise_has_the_calibrated_scale() -> None:
    # Discrete Laplace with scale b = 11 / epsilon has variance 2 e^(-1/b) / (1 - e^(-1/b))^2, about 2 b^2.
    epsilon = 2.0
    b = noise_scale(epsilon)
    draws = noisy_counts([1000] * 4000, epsilon)
    errors = [d - 1000 for d in draws]
    q = pytest.approx(0, abs=4 * (2 * b * b / len(errors)) ** 0.5)
    assert statistics.fmean(errors) == q  # unbiased
    expected_var = 2 * 2.718281828 ** (-1 / b) / (1 - 2.718281828 ** (-1 / b)) ** 2
    assert statistics.pvariance(errors) == pytest.approx(expected_var, rel=0.15)
    # and epsilon sets it: ten times the epsilon, a tenth of the spread
    tight = [d - 1000 for d in noisy_counts([1000] * 4000, epsilon * 10)]
    assert statistics.pstdev(tight) < statistics.pstdev(errors) / 5
    assert REQUEST_SENSITIVITY == 11


def test_privatized_window_is_unbiased_enough_for_counts_and_valid() -> None:
    window = TelemetryWindow(
        id="w",
        version_digest="sha256:" + "0" * 64,
        window_start="2024-06-10T00:00:00Z",
        window_s=300,
        requests=500,
        errors=25,
        crashes=1,
        latency_ms=histogram_from_ms([120.0] * 450 + [900.0] * 50),
        drift=DriftSummary(requests=500, finish_reasons={"stop": 480, "length": 20}, empty_outputs=3),
    )
    outs = [privatize_window(window, 1.0) for _ in range(300)]
    assert statistics.fmean(w.requests for w in outs) == pytest.approx(500, abs=3)
    assert statistics.fmean(w.errors for w in outs) == pytest.approx(25, abs=3)
    assert all(w.crashes == 1 for w in outs)  # the agent's own events stay exact
    assert all(sum(w.latency_ms.counts) == w.requests for w in outs)  # rescaled to the noisy request count
