"""The edge agent: enroll, fetch the desired state, plan (``core.reconcile``), execute, serve, report.

This module is the loop; the parts it drives each have their own module:

- :mod:`slmops.agent.reconcile`: the plan's steps (verify, download, stage, probe), each persisted before and after.
- :mod:`slmops.agent.switch`: the A/B slot switch (activate, commit, rollback), crash recovery at start-up, serving
  the ``current`` slot and checking its health.
- :mod:`slmops.agent.reporting`: status reports with the buffered events, and telemetry windows.
- :mod:`slmops.agent.feedback`: which rated completions leave the device (sampled, capped, redacted) and their
  upload; the local feedback store is ``feedback.db`` (:mod:`slmops.feedback.store`).

The serving configuration is measured on the device (:mod:`slmops.runtime.tuning`, driven by
:class:`~slmops.agent.runtime.LlamaRuntime` after a staged model's probe, within ``tune_budget_s``) and reported
in ``Capabilities.tuning`` (status reports and enrollment) with a ``tuned`` event whenever it changes. The OpenMP
wait policy only counts when the process loads llama.cpp: the runtime sets it from the persisted choice before the
process first loads a model, so a (re)started agent always serves with it. When a new model's choice needs another
policy than the one loaded, the runtime serves the best configuration this process can run and, with
``restart_for_tuning``, :meth:`Agent.run` returns after a completed pass (state persisted, reports sent: a safe
point) with ``restart_requested`` set; the caller closes the agent and calls :func:`restart_process`, which
re-executes the same command line (the local API is down for the restart). It restarts at most once per wanted
policy (``SLMOPS_RESTARTED_FOR_OMP``), so a process that cannot help loading llama.cpp early never loops.

The desired state's site adaptation and feedback policy are put in the :class:`~slmops.runtime.policy.LocalPolicy`
the local API reads per request, at start-up (from the persisted state) and whenever the desired state changes: no
model reload.

Every step is idempotent and persisted, so an agent killed at any moment continues correctly after a restart. The
agent serves its active model whether or not the control plane answers; events wait in the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import httpx

from slmops.agent._context import AgentContext
from slmops.agent.client import Backoff, ControlPlaneClient
from slmops.agent.config import AgentConfig
from slmops.agent.feedback import FeedbackCollector
from slmops.agent.identity import Identity
from slmops.agent.metrics import agent_collector
from slmops.agent.nudge import NudgeListener, wait_for_poll
from slmops.agent.outbox import TelemetryOutbox
from slmops.agent.reconcile import Reconciler
from slmops.agent.reporting import Reporter
from slmops.agent.runtime import LlamaRuntime, ModelRuntime
from slmops.agent.state import AgentLock, AgentState, DataDir
from slmops.agent.switch import SlotSwitch
from slmops.core.reconcile import Step
from slmops.core.wire import (
    Capabilities,
    ClaimRequest,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    RuntimeTuning,
    TelemetryWindow,
)
from slmops.errors import AuthenticationError, ConfigError, ConflictError, SLMOpsError, UnavailableError
from slmops.feedback.store import FeedbackStore
from slmops.runtime.policy import LocalPolicy

__all__ = ["Agent", "restart_process"]

log = logging.getLogger(__name__)
_RESTARTED_FOR = "SLMOPS_RESTARTED_FOR_OMP"


def restart_process(wait_policy: str | None = None) -> NoReturn:
    """Re-execute this process's command line (``python -m slmops agent ...`` or the ``slmops`` script), so the
    new process loads llama.cpp with the OpenMP wait policy its persisted tuning names. Call it after the agent was
    closed (lock released, serving marker cleared: the restart is no crash)."""
    if wait_policy:
        os.environ[_RESTARTED_FOR] = wait_policy
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        runtime: ModelRuntime | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self._transport = transport
        self._lock = AgentLock(self.data.lock_file)
        self.policy = LocalPolicy(site_opt_in=config.feedback_opt_in)
        self.feedback_store = FeedbackStore(self.data.root / "feedback.db", clock=clock)
        self.feedback = FeedbackCollector(self.feedback_store, self.policy, clock=clock)
        self._ctx = ctx = AgentContext(
            config,
            self.data,
            runtime=runtime or self._default_runtime(config),
            clock=clock,
        )
        self.runtime, self.outbox, self.identities = ctx.runtime, ctx.outbox, ctx.identities
        self.cache, self.slots = ctx.cache, ctx.slots
        self.telemetry = TelemetryOutbox(self.data.telemetry_file, config.telemetry)
        if isinstance(self.runtime, LlamaRuntime):
            self.runtime.add_metrics_collector(agent_collector(ctx, self.telemetry))
        self.reporter = Reporter(ctx, self.telemetry)
        self.switch = SlotSwitch(ctx, self.reporter)
        self.reconciler = Reconciler(ctx, self.switch)
        self._opened = False
        self.restart_requested: RuntimeTuning | None = None  # set when run() returned for a restart (see module)
        self._reported_tuning: RuntimeTuning | None = None
        self.nudges: NudgeListener | None = None  # MQTT nudges (agent/nudge.py), while open

    def _default_runtime(self, config: AgentConfig) -> LlamaRuntime:
        from slmops.runtime.tuning import TuningConfig, TuningStore

        return LlamaRuntime(
            prompt_nll_sample_rate=config.prompt_nll_sample_rate,
            prompt_nll_max_tokens=config.prompt_nll_max_tokens,
            policy=self.policy,
            feedback_store=self.feedback_store,
            on_rated=self.feedback.rated,
            tuning=TuningConfig(budget_s=config.tune_budget_s) if config.tune_budget_s > 0 else None,
            tuning_store=TuningStore(self.data.root / "tuning.json"),
        )

    @property
    def tuning(self) -> RuntimeTuning | None:
        """The measured serving configuration of the served model (None: untuned, or threads set by the blueprint)."""
        value = getattr(self.runtime, "tuning", None)
        return value if isinstance(value, RuntimeTuning) else None

    @property
    def state(self) -> AgentState:
        return self._ctx.state

    @property
    def client(self) -> ControlPlaneClient | None:
        return self._ctx.client

    # ----------------------------------------------------------------------------------------------- lifecycle

    def open(self) -> Agent:
        ctx = self._ctx
        self.data.initialize()
        self._lock.acquire()
        try:
            self.cache.initialize()
            self.outbox.open()
            self.reporter.open()
            self.feedback_store.open()
            ctx.state = ctx.store.load()
            if ctx.state.desired is not None:  # what was in effect before the restart, until the next fetch
                self.policy.update(ctx.state.desired.local, ctx.state.desired.feedback)
            identity = self.identities.identity()
            server = self.config.server_url or (identity.server_url if identity else None)
            if server is None:
                raise ConfigError(f"no control plane for the agent in {self.data.root}; pass --server URL")
            ctx.client = ControlPlaneClient(
                server,
                self.identities.credential(),
                transport=self._transport,
                timeout_s=self.config.request_timeout_s,
            )
            if self.config.nudge is not None:
                self.nudges = NudgeListener(self.config.nudge, self.identities.credential).start()
            self.switch.recover()
            self.cache.sweep_temporary(older_than_s=0)
        except BaseException:
            self._release()
            raise
        self._opened = True
        return self

    def _release(self) -> None:
        if self.nudges is not None:
            self.nudges.close()
            self.nudges = None
        if self._ctx.client is not None:
            self._ctx.client.close()
            self._ctx.client = None
        self.outbox.close()
        self.telemetry.close()
        self.feedback_store.close()
        self._lock.release()

    def close(self) -> None:
        """A clean stop: the serving marker goes, so the next start does not count a crash."""
        if not self._opened:
            return
        self._opened = False
        with contextlib.suppress(SLMOpsError, OSError):
            self.close_window(force=True)  # keep what the local API counted; it is sent after the next start
        self.runtime.close()
        self.switch.clear_marker()
        self._release()

    def __enter__(self) -> Agent:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- enrollment

    def capabilities(self) -> Capabilities:
        """What the device measured about itself, with the served model's measured serving configuration."""
        measured = self._ctx.measure_capabilities()
        self._ctx.capabilities = measured.model_copy(update={"tuning": self.tuning})
        return self._ctx.capabilities

    def _note_tuning(self) -> None:
        """Put the current tuning in the capabilities the next status report carries; a ``tuned`` event when it
        changed."""
        ctx, tuning = self._ctx, self.tuning
        if ctx.capabilities is None or ctx.capabilities.tuning != tuning:
            self.capabilities()
        if tuning is not None and tuning != self._reported_tuning:
            outcome = getattr(self.runtime, "tuning_outcome", None)
            wanted = getattr(self.runtime, "restart_wanted", None)
            ctx.event(
                "tuned",
                self.switch.serving,
                threads=tuning.threads,
                omp_wait_policy=tuning.omp_wait_policy,
                batch_tokens=tuning.batch_tokens,
                decode_tokens_per_s=tuning.decode_tokens_per_s,
                prefill_tokens_per_s=tuning.prefill_tokens_per_s,
                candidates_measured=tuning.candidates_measured,
                not_measured=len(outcome.not_measured) if outcome is not None else 0,
                reused=bool(outcome.reused) if outcome is not None else False,
                restart_wanted_for=wanted.omp_wait_policy if isinstance(wanted, RuntimeTuning) else None,
            )
        self._reported_tuning = tuning

    def _restart_wanted(self) -> RuntimeTuning | None:
        wanted = getattr(self.runtime, "restart_wanted", None)
        if not self.config.restart_for_tuning or not isinstance(wanted, RuntimeTuning):
            return None
        if os.environ.get(_RESTARTED_FOR) == wanted.omp_wait_policy:
            return None  # restarted for it once already and still cannot apply it: do not loop
        return wanted

    def enrolled(self) -> bool:
        identity = self.identities.identity()
        return identity is not None and identity.state == "approved" and self.identities.credential() is not None

    def _remember(self, response: EnrollResponse, server_url: str, previous: Identity | None) -> None:
        trusted = response.trusted_keys or (previous.trusted_keys if previous else [])
        if response.credential:
            self.identities.save_credential(response.credential)
            self._ctx.require_client().credential = response.credential
        self.identities.save_identity(
            Identity(
                server_url=server_url,
                device_id=response.device_id,
                state=response.state,
                trusted_keys=trusted,
                poll_interval_s=response.poll_interval_s,
            )
        )

    def enroll(self) -> bool:
        """Enroll (once) and claim the credential when approved; returns whether the device is approved now.

        Raises :class:`~slmops.errors.ConflictError` when the control plane refuses the claim as not newer than the
        last one it accepted (a restart within the same second, a clock stepped back); :meth:`run` claims again at
        the next poll, signing the new time."""
        client = self._ctx.require_client()
        identity = self.identities.identity()
        if identity is not None and identity.state == "approved" and self.identities.credential():
            return True
        key = self.identities.key()
        if identity is None:
            if not self.config.enroll_token:
                raise ConfigError(
                    f"the agent in {self.data.root} is not enrolled; pass --enroll-token TOKEN "
                    "(an operator makes one with `slmops enroll-token create`)"
                )
            request = EnrollRequest(
                token=self.config.enroll_token,
                public_key=key.public_text,
                capabilities=self.capabilities(),
                labels=self.config.labels,
                hostname=socket.gethostname()[:255],
            )
            response = client.enroll(request)
            self._remember(response, client.base_url, None)
            self._ctx.event("enrolled", None, state=response.state)
            return response.state == "approved"  # pending: claim at the next poll
        timestamp = int(self._ctx.clock())
        response = client.claim(
            ClaimRequest(
                device_id=identity.device_id,
                timestamp=timestamp,
                signature=key.sign_claim(identity.device_id, timestamp),
            )
        )
        self._remember(response, identity.server_url, identity)
        if response.state == "approved":
            self._ctx.event("approved", None)
        return response.state == "approved"

    # ----------------------------------------------------------------------------------------------- the loop

    def poll_interval_s(self) -> float:
        if self.config.poll_interval_s is not None:
            return self.config.poll_interval_s
        identity = self.identities.identity()
        return identity.poll_interval_s if identity else 30.0

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> None:
        """Enroll if needed, then reconcile until ``stop`` is set (or one pass with ``once``)."""
        stop = stop or threading.Event()
        rng = random.Random()
        backoff = Backoff(rng=rng)
        self.switch.ensure_serving()  # serve what is active before touching the network: offline starts serve at once
        while not stop.is_set():
            unreachable = False
            try:
                approved = self.enroll()
            except UnavailableError as exc:
                log.warning("%s", exc)
                approved, unreachable = False, True
            except ConflictError as exc:  # a claim not newer than the last accepted one: sign anew at the next poll
                log.warning("%s; claiming again at the next poll", exc)
                approved = False
            if approved:
                self.reconcile_once()
            elif once:
                log.warning("this device waits for an operator's approval; run the agent again later")
            wanted = self._restart_wanted()
            if wanted is not None:
                log.warning("restarting to serve with OpenMP wait policy %s (measured best)", wanted.omp_wait_policy)
                self.restart_requested = wanted
                return
            if once:
                return
            failed = unreachable or self._ctx.offline_since is not None
            wait_for_poll(self.nudges, stop, self.next_wait_s(backoff, failed, rng))

    def next_wait_s(self, backoff: Backoff, failed: bool, rng: random.Random) -> float:
        """The wait before the next pass: the jittered poll interval after a pass that reached the control plane;
        after one that did not (transport error, 5xx, 429, a 503 shedding load), :class:`Backoff`'s full-jitter
        exponential wait (on top of any ``Retry-After``), capped at twice the poll interval."""
        interval = self.poll_interval_s()
        retry_after = self._ctx.client.take_retry_after() if self._ctx.client is not None else None
        if failed:
            backoff.cap_s = 2 * interval
            return backoff.failed(retry_after)
        backoff.succeeded()
        jitter = self.config.poll_jitter
        return interval * rng.uniform(1 - jitter, 1 + jitter)

    def reconcile_once(self) -> list[Step]:
        """Fetch the desired state, converge towards it, serve, check health, report. Never raises for the network."""
        self._fetch_desired()
        done = self.reconciler.converge()
        self.switch.ensure_serving()
        self.switch.check_health()
        self.reconciler.converge()  # a failed health check may call for a rollback
        self.switch.ensure_serving()
        self._note_tuning()
        self.reporter.report()
        self.reporter.flush_telemetry(self.switch.serving)
        self.flush_feedback()
        return done

    def flush_feedback(self) -> int:
        """Purge expired feedback and upload the queued samples (nothing is queued without both consents)."""
        try:
            self.feedback_store.purge()
            identity = self.identities.identity()
            if identity is None or not self.identities.credential():
                return 0
            return self.feedback.upload(self._ctx.require_client(), identity.device_id)
        except (SLMOpsError, OSError, sqlite3.Error) as exc:
            log.warning("feedback upkeep failed: %s", type(exc).__name__)
            return 0

    def _apply_policy(self, desired: DesiredState) -> None:
        if self.policy.update(desired.local, desired.feedback):
            self._ctx.event(
                "local_policy_changed",
                None,
                feedback_mode=desired.feedback.mode,
                site_opt_in=self.config.feedback_opt_in,
                system_prompt_chars=len(desired.local.system_prompt or ""),
            )

    def close_window(self, *, force: bool = False) -> list[TelemetryWindow]:
        """Close the telemetry window when it is over (or ``force``); see :meth:`Reporter.close_window`."""
        return self.reporter.close_window(self.switch.serving, force=force)

    def _fetch_desired(self) -> None:
        ctx = self._ctx
        identity = self.identities.identity()
        if identity is None:
            return
        try:
            fetched = ctx.require_client().desired(identity.device_id, ctx.state.etag)
        except UnavailableError as exc:
            ctx.note_unreachable(exc)
            return
        except AuthenticationError as exc:
            ctx.note_error(str(exc))
            return
        if ctx.offline_since is not None:
            ctx.event("control_plane_reachable", None, offline_s=round(ctx.clock() - ctx.offline_since, 3))
            ctx.offline_since = None
        if fetched.changed and fetched.state is not None:
            self._set_desired(fetched.state, fetched.etag)

    def _set_desired(self, desired: DesiredState, etag: str | None) -> None:
        state = self._ctx.state
        old = state.desired
        old_digest = old.model.digest if old is not None and old.model is not None else None
        new_digest = desired.model.digest if desired.model is not None else None
        if new_digest != old_digest:
            # a new desired version: earlier failures of other versions may be retried if they are desired again
            state.failed = {d: r for d, r in state.failed.items() if d == new_digest}
            self._ctx.event("desired_changed", new_digest, generation=desired.generation)
        state.desired = desired
        state.etag = etag or desired.generation
        self._ctx.save()
        self._apply_policy(desired)
