"""Control-plane settings from ``SLMOPS_`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops.config import Settings

__all__ = ["ServerSettings"]


class ServerSettings(BaseSettings):
    """How ``slmops server`` runs.

    It shares ``SLMOPS_HOME`` (database, blob directory, signing keys) and ``SLMOPS_DATABASE_URL`` with the
    registry: the control plane serves the registry's blobs and manifests and keeps its own tables in the same
    database.
    """

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".slmops")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    device_poll_interval_s: float = Field(default=30.0, gt=0)
    device_offline_after_s: float = Field(default=90.0, gt=0)  # no heartbeat for this long: offline ...
    device_offline_grace_s: float = Field(default=30.0, ge=0)  # ... plus this grace
    enroll_claim_max_skew_s: float = Field(default=300.0, gt=0)
    enrollment_token_default_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    blob_chunk_bytes: int = Field(default=1 << 20, ge=4096)
    blob_url_expires_s: int = Field(default=300, ge=1, le=7 * 86400)  # presigned blob URLs (S3 store) last this long
    auth_cache_ttl_s: float = Field(default=5.0, ge=0)  # how long an approved device credential is remembered
    desired_cache_ttl_s: float = Field(default=2.0, ge=0)  # how stale blueprints/releases/registry may be per poll
    rollout_controller: bool = True  # run the rollout controller loop in this server (one replica holds the lease)
    rollout_tick_s: float = Field(default=5.0, gt=0)  # how often the controller evaluates running releases
    rollout_lease_s: float = Field(default=30.0, gt=0)  # a replica that stops renewing loses the lease after this
    metrics: bool = True  # serve GET /metrics and count HTTP requests per route; off: neither (no middleware)
    metrics_token: str | None = None  # a bearer token that may scrape GET /metrics (besides viewer tokens)
    metrics_cache_s: float = Field(default=5.0, ge=0)  # how long the fleet gauges of /metrics are reused
    alert_rules_file: Path | None = None  # YAML alert rules (telemetry/alert_rules.py); none: no alerts evaluated
    drift_step_s: float = Field(default=3600.0, gt=0)  # drift compares the fleet's telemetry in steps this long
    drift_reference_s: float = Field(default=2 * 86400.0, gt=0)  # unpinned reference: a version's first this long
    drift_current_steps: int = Field(default=3, ge=1)  # the last this many steps are compared with the reference
    drift_horizon_s: float = Field(default=7 * 86400.0, gt=0)  # how far back a shift's start is searched
    price_table_file: Path | None = None  # YAML cloud prices and edge profiles for the cost report; none: the example
    ui: bool = True  # serve the dashboard at /ui
    # MQTT nudges (control/nudge.py): mqtt://host:1883 or mqtts://host:8883; none: off (devices only poll)
    mqtt_url: str | None = None
    mqtt_username: str | None = None  # a broker user that may only publish on mqtt_topic_prefix/#
    mqtt_password: str | None = None
    mqtt_ca_file: Path | None = None  # mqtts: the CA of the broker's certificate (default: the system's)
    mqtt_topic_prefix: str = Field(default="slmops/nudge", min_length=1, pattern=r"^[^#+\x00]+$")
    nudge_tick_s: float = Field(default=1.0, gt=0)  # how often the nudger looks for a changed world
    nudge_rescan_s: float = Field(default=300.0, gt=0)  # and compares every device with its report anyway
    nudge_retry_s: float = Field(default=120.0, ge=0)  # a device still behind this long after its nudge: again
    nudge_rate_per_s: float = Field(default=500.0, gt=0)  # at most this many nudges published per second
    nudge_batch: int = Field(default=500, ge=1, le=10_000)  # devices read per query of a scan
    nudge_lease_s: float = Field(default=30.0, gt=0)  # one replica nudges; it loses the lease after this
    # load shedding (control/shedding.py) of device requests: beyond these bounds, 503 + Retry-After at once
    shed_max_in_flight: int = Field(default=64, ge=0)  # device requests served at once; beyond: wait, then 503 (0: off)
    shed_max_queued: int = Field(default=256, ge=0)  # device requests that may wait for a slot ...
    shed_queue_wait_s: float = Field(default=0.5, ge=0)  # ... this long, then 503 + Retry-After
    shed_retry_after_s: int = Field(default=5, ge=0)  # Retry-After of a shed request: this ...
    shed_retry_after_jitter_s: int = Field(default=10, ge=0)  # ... plus up to this many seconds, uniformly

    def registry_settings(self) -> Settings:
        return Settings(home=self.home, database_url=self.database_url)

    @property
    def resolved_database_url(self) -> str:
        return self.registry_settings().resolved_database_url
