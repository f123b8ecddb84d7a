"""The agent's side of :mod:`slmops.core.reconcile`: read the local view, ask the plan, execute its first step.

Every step persists ``state.json`` before it runs (phase, step) and after (its result), and every step is
idempotent, so an agent killed at any moment continues correctly after a restart:

- *verify*: the desired manifest's signature against the server-provided trusted keys (an adapter version's base
  too, and that it is the base the adapter names); nothing is downloaded first. When the device holds a TUF root
  (``<data>/tuf``), the manifest must also be a current TUF target for the device's hardware id (its device
  class): refreshed metadata that is older (rollback), expired (freeze), inconsistent (mix-and-match) or signed
  below threshold installs nothing; the current model keeps serving and the ``verify_failed`` event says why
  (``[tuf:<check>]``). A TUF check holds for one desired generation only, so a replayed old version is checked
  again even if it was verified before. An agent without a root asks for the control plane's root pin once per
  verify (:mod:`slmops.tuf.pin`): that is how agents enrolled before TUF move to it without re-enrolling.
- *download*: resumable partials, sha256-verified into the blob cache (:mod:`slmops.agent.download`).
- *stage*: a slot directory renamed into place when complete (:mod:`slmops.agent.slots`); an adapter version's slot
  holds the pair (base files and adapter files), so only blobs missing from the cache were downloaded.
- *probe*: load and generate in a child process; a failed probe marks the version failed.
- *activate*, *commit*, *rollback*: the slot switch (:mod:`slmops.agent.switch`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from slmops.agent._context import AgentContext
from slmops.agent._pause import pause
from slmops.agent.download import BlobWant, Downloader
from slmops.agent.switch import SlotSwitch
from slmops.core.adapters import adapter_base
from slmops.core.device_class import device_class
from slmops.core.manifest import SignedManifest
from slmops.core.reconcile import LocalView, Step, plan, short_digest, target_of
from slmops.core.wire import AgentPhase
from slmops.errors import ConfigError, MissingExtraError, SignatureError, SLMOpsError, UnavailableError
from slmops.registry.signing import verify_envelope

if TYPE_CHECKING:
    from slmops.tuf.client import TufClient, TufVerdict

__all__ = ["Reconciler"]

_PHASE: dict[str, AgentPhase] = {
    "verify": "verifying",
    "download": "downloading",
    "stage": "staging",
    "probe": "probing",
    "activate": "activating",
    "commit": "serving",
    "rollback": "rolling_back",
}


class Reconciler:
    """Executes the plan of :func:`slmops.core.reconcile.plan` one persisted step at a time."""

    def __init__(self, ctx: AgentContext, switch: SlotSwitch) -> None:
        self._ctx = ctx
        self._switch = switch
        self._tuf_checked: tuple[str, str] | None = None  # (desired generation, digest) TUF accepted, this process

    def view(self) -> LocalView:
        ctx, state = self._ctx, self._ctx.state
        now = ctx.clock()
        verified = frozenset(state.verified)
        if self.tuf_enabled():  # a TUF check holds for the desired generation it was made for
            desired = state.desired
            current = (desired.generation, desired.model.digest) if desired and desired.model else None
            verified = verified & ({current[1]} if current is not None and current == self._tuf_checked else set())
        return LocalView(
            active=ctx.slots.current(),
            previous=ctx.slots.previous(),
            committed=state.committed,
            verified=verified,
            cached=frozenset(ctx.cache.digests()),
            staged=ctx.slots.staged(),
            probed=frozenset(d for d, r in state.probes.items() if r.ok),
            failed=dict(state.failed),
            crash_counts=dict(state.crash_counts),
            active_crashed=self._switch.active_crashed,
            health_failures=state.health_failures,
            probation_over=state.probation_until is None or now >= state.probation_until,
        )

    def converge(self, max_steps: int = 16) -> list[Step]:
        """Plan and execute one step at a time until the plan is a no-op or a step fails."""
        ctx = self._ctx
        done: list[Step] = []
        for _ in range(max_steps):
            steps = plan(target_of(ctx.state.desired), self.view(), ctx.config.policy)
            step = steps[0]
            if step.kind == "noop":
                phase: AgentPhase = "serving" if ctx.slots.current() else "idle"
                if ctx.state.phase != phase or ctx.state.step is not None:
                    ctx.state.phase, ctx.state.step = phase, None
                    ctx.save()
                break
            ctx.state.phase = _PHASE[step.kind]
            ctx.state.step = f"{step.kind} {step.digest}"
            ctx.save()
            try:
                self._execute(step)
            except SLMOpsError as exc:
                ctx.note_error(f"{step.kind} {short_digest(step.digest)} failed: {exc}", step)
                break
            ctx.state.step = None
            ctx.state.last_error = None
            ctx.save()
            done.append(step)
        return done

    def _execute(self, step: Step) -> None:
        match step.kind:
            case "verify":
                self._verify(step)
            case "download":
                self._download(step)
            case "stage":
                self._ctx.slots.stage(self._desired_envelope(step.digest), self._desired_base(step.digest))
                self._ctx.event("staged", step.digest)
            case "probe":
                self._probe(step)
            case "activate":
                self._switch.activate(str(step.digest))
            case "commit":
                self._switch.commit(step.digest)
            case "rollback":
                self._switch.rollback(step)
            case _:
                raise ValueError(f"the plan step {step.kind!r} cannot be executed")

    # ----------------------------------------------------------------------------------------------- steps

    def _desired_envelope(self, digest: str | None) -> SignedManifest:
        desired = self._ctx.state.desired
        if desired is None or desired.model is None or desired.model.digest != digest:
            raise ConfigError(f"version {digest} is no longer desired")
        return desired.model.envelope

    def _desired_base(self, digest: str | None) -> SignedManifest | None:
        self._desired_envelope(digest)
        desired = self._ctx.state.desired
        return desired.model.base if desired is not None and desired.model is not None else None

    def _verify(self, step: Step) -> None:
        ctx = self._ctx
        envelope = self._desired_envelope(step.digest)
        identity = ctx.identities.identity()
        trusted = identity.trusted() if identity else {}
        if envelope.digest != step.digest:
            raise SLMOpsError(f"the desired state names {step.digest} but carries the manifest {envelope.digest}")
        key_id = verify_envelope(envelope, trusted)
        base = self._desired_base(step.digest)
        wanted = adapter_base(envelope.manifest)
        if wanted != (base.digest if base is not None else None):
            raise SLMOpsError(
                f"{envelope.manifest.name}@{envelope.manifest.version} names the base {wanted or 'none'} but the "
                f"desired state carries {base.digest if base is not None else 'no base'}; waiting for a consistent one"
            )
        base_key = verify_envelope(base, trusted) if base is not None else None
        for part in (envelope, *([base] if base is not None else [])):
            if part.manifest.format != "gguf":
                ctx.state.failed[str(step.digest)] = f"format {part.manifest.format} cannot run on this agent"
                return
        detail: dict[str, Any] = (
            {"key_id": key_id} if base is None else {"key_id": key_id, "base": base.digest, "base_key_id": base_key}
        )
        verdict = self._tuf_check(envelope.digest, base.digest if base is not None else None, trusted)
        if verdict is not None:
            detail["tuf"] = {
                "hardware_id": self._hardware_id(),
                "targets_version": verdict.targets_version,
                "snapshot_version": verdict.snapshot_version,
                "timestamp_version": verdict.timestamp_version,
                "root_version": verdict.root_version,
            }
        ctx.state.verified = sorted({*ctx.state.verified, str(step.digest)})
        ctx.event("verified", step.digest, **detail)

    # ----------------------------------------------------------------------------------------------- TUF

    def tuf_enabled(self) -> bool:
        """Whether this device holds a TUF root: from then on every version must be a current TUF target."""
        return (self._ctx.data.root / "tuf" / "root.json").exists()

    def _tuf_client(self) -> TufClient:
        try:
            from slmops.tuf.client import TufClient
        except ImportError:
            raise MissingExtraError("agent", "TUF update metadata (this device holds a TUF root)", "tuf") from None

        client = self._ctx.require_client()
        return TufClient(self._ctx.data.root / "tuf", client.tuf_url, client.tuf_fetcher())

    def _hardware_id(self) -> str:
        ctx = self._ctx
        return device_class(ctx.capabilities or ctx.measure_capabilities())

    def _tuf_bootstrap(self, trusted: dict[str, Any]) -> bool:
        """Install the control plane's pinned root when a key this device trusts signed it; False: TUF is off."""
        from slmops.tuf.pin import verify_root_pin

        try:
            pin = self._ctx.require_client().tuf_root_pin()
        except UnavailableError:
            raise  # retry the verify later rather than skip TUF because the pin did not arrive
        except SLMOpsError:  # a control plane that predates the TUF routes: nothing to move to yet
            return False
        if pin is None:
            return False
        root = verify_root_pin(pin, trusted)
        version = self._tuf_client().install_root(root)
        self._ctx.event("tuf_root_installed", None, root_version=version, pin_key_id=pin.signature.key_id)
        return True

    def _tuf_check(self, digest: str, base_digest: str | None, trusted: dict[str, Any]) -> TufVerdict | None:
        if not self.tuf_enabled() and not self._tuf_bootstrap(trusted):
            return None
        from slmops.tuf.client import TufRejectedError

        client, hardware_id = self._tuf_client(), self._hardware_id()
        desired = self._ctx.state.desired
        try:
            verdict = client.check(digest, hardware_id)
            if base_digest is not None:
                client.check(base_digest, hardware_id)
        except TufRejectedError as exc:
            raise SignatureError(f"[tuf:{exc.check}] {exc.message}; keeping the current model") from None
        if desired is not None:
            self._tuf_checked = (desired.generation, digest)
        return verdict

    def _download(self, step: Step) -> None:
        ctx = self._ctx
        envelope = self._desired_envelope(step.digest)
        base = self._desired_base(step.digest)
        parts = (envelope, *([base] if base is not None else []))
        sizes = {f.digest: f.size for part in parts for f in part.manifest.files}
        wants = [BlobWant(blob, sizes[blob]) for blob in step.blobs]
        first_chunk = threading.Event()

        def on_chunk(_digest: str, _offset: int) -> None:
            if not first_chunk.is_set():
                first_chunk.set()
                pause("download_chunk")

        downloader = Downloader(
            ctx.require_client(), ctx.cache, ctx.data.download_dir, ctx.config.download, on_chunk=on_chunk
        )
        ctx.event("download_started", step.digest, blobs=len(wants), bytes=sum(w.size for w in wants))
        started = time.monotonic()
        report = downloader.fetch(wants)
        ctx.event(
            "downloaded",
            step.digest,
            blobs=len(report.fetched),
            bytes_received=report.bytes_received,
            attempts=report.attempts,
            resumed_from=report.resumed_from,
            seconds=round(time.monotonic() - started, 3),
        )

    def _probe(self, step: Step) -> None:
        ctx = self._ctx
        digest = str(step.digest)
        envelope = ctx.slots.manifest(digest)
        record = ctx.runtime.probe(
            ctx.slots.model_file(digest), envelope, ctx.runtime_config(), adapter_file=ctx.slots.adapter_file(digest)
        )
        ctx.state.probes[digest] = record
        if record.ok:
            ctx.event("probe_passed", digest, decode_tokens_per_s=record.decode_tokens_per_s)
        else:
            ctx.state.failed[digest] = f"health probe failed: {record.reason}"
            ctx.event("probe_failed", digest, reason=record.reason)
