"""The agent's gauges on its local API's ``/metrics``: phase, active version, staged slots, download and outboxes.

:func:`agent_collector` returns a callback that builds them from the agent's parts at each scrape (on the server's
thread: it only reads). Labels stay bounded: the phase names and the one active digest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, get_args

from slmops.agent._context import AgentContext
from slmops.agent.outbox import TelemetryOutbox
from slmops.core.wire import AgentPhase

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["agent_collector"]


def _partial_bytes(ctx: AgentContext) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for path in ctx.data.download_dir.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
    return total


def agent_collector(ctx: AgentContext, telemetry: TelemetryOutbox) -> Callable[[], Iterable[Metric]]:
    """A collector callback for :meth:`slmops.runtime.ServerMetrics.add_collector` over ``ctx`` and ``telemetry``."""

    def collect() -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        state = ctx.state
        phase = GaugeMetricFamily("slmops_agent_phase", "1 for the agent's current phase.", labels=["phase"])
        for name in get_args(AgentPhase):
            phase.add_metric([name], 1.0 if state.phase == name else 0.0)
        yield phase
        active = GaugeMetricFamily(
            "slmops_agent_active_version", "1 for the model version in the current slot.", labels=["digest"]
        )
        current = ctx.slots.current()
        if current is not None:
            active.add_metric([current], 1.0)
        yield active
        yield GaugeMetricFamily(
            "slmops_agent_committed", "1 once the active version left probation.", value=state.committed
        )
        yield GaugeMetricFamily(
            "slmops_agent_staged_slots", "Model versions staged in slots.", value=len(ctx.slots.staged())
        )
        yield GaugeMetricFamily(
            "slmops_agent_download_partial_bytes", "Bytes in partially downloaded blobs.", value=_partial_bytes(ctx)
        )
        for name, buffer in (("events", ctx.outbox), ("telemetry", telemetry)):
            with contextlib.suppress(RuntimeError):  # not opened yet, or closed
                rows, size = buffer.size()
                yield GaugeMetricFamily(
                    f"slmops_agent_outbox_{name}", f"{name.capitalize()} waiting to be sent.", value=rows
                )
                yield GaugeMetricFamily(
                    f"slmops_agent_outbox_{name}_bytes", f"Bytes of {name} waiting to be sent.", value=size
                )

    return collect
