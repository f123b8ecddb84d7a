"""Device-class profiles for the fleet simulator: what a kind of simulated device has and how it misbehaves.

A profile is a value. Its memory, cores and architecture become the :class:`~slmops.core.wire.Capabilities` the
simulated device reports, so the control plane puts it in a real device class (``aarch64-4gb``...) and chooses a
variant for it exactly as it would for a real device. The other fields drive the simulation: ``speed_factor``
scales inference latency (1.0 = the reference device, 2.0 = twice as slow), ``bandwidth_bytes_per_s`` sets the
pretended download time, ``failure_rate`` is the probability that an activation fails for reasons unrelated to
the model (the device rolls back), ``flaky_network_probability`` the probability that one HTTP request is lost,
and ``offline_every_s`` / ``offline_duration_s`` the mean time between offline periods and their length.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmops.core.wire import Capabilities

__all__ = ["BUILTIN_PROFILES", "DeviceProfile"]

_GIB = 1 << 30


class DeviceProfile(BaseModel):
    """One simulated device class."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    arch: str = "x86_64"
    memory_bytes: int = Field(gt=0)
    disk_free_bytes: int = Field(default=32 * _GIB, ge=0)
    cpu_cores: int = Field(default=4, ge=1, le=1024)
    cpu_flags: tuple[str, ...] = ()
    accelerator: str | None = None
    speed_factor: float = Field(default=1.0, gt=0, le=1000)
    bandwidth_bytes_per_s: float = Field(default=50e6, gt=0)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    flaky_network_probability: float = Field(default=0.0, ge=0, lt=1)
    offline_every_s: float = Field(default=0.0, ge=0)  # mean seconds between offline periods; 0 = never offline
    offline_duration_s: float = Field(default=0.0, ge=0)

    def capabilities(self) -> Capabilities:
        """What a device of this class reports about itself."""
        return Capabilities(
            memory_bytes=self.memory_bytes,
            disk_free_bytes=self.disk_free_bytes,
            cpu_cores=self.cpu_cores,
            cpu_flags=list(self.cpu_flags),
            accelerator=self.accelerator,
            os="linux",
            arch=self.arch,
            probe_decode_tokens_per_s=round(40.0 / self.speed_factor, 3),
        )


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    profile.name: profile
    for profile in (
        DeviceProfile(
            name="pi-2gb",
            arch="aarch64",
            memory_bytes=2 * _GIB,
            cpu_cores=4,
            cpu_flags=("neon",),
            speed_factor=4.0,
            bandwidth_bytes_per_s=5e6,
            failure_rate=0.01,
            flaky_network_probability=0.05,
            offline_every_s=600.0,
            offline_duration_s=30.0,
        ),
        DeviceProfile(
            name="till-8gb",
            memory_bytes=8 * _GIB,
            cpu_cores=4,
            cpu_flags=("avx", "avx2", "fma", "f16c"),
            speed_factor=1.5,
            bandwidth_bytes_per_s=20e6,
            failure_rate=0.005,
            flaky_network_probability=0.02,
            offline_every_s=1800.0,
            offline_duration_s=60.0,
        ),
        DeviceProfile(
            name="workstation-16gb",
            memory_bytes=16 * _GIB,
            cpu_cores=8,
            cpu_flags=("avx", "avx2", "avx512f", "fma", "f16c"),
            speed_factor=1.0,
            bandwidth_bytes_per_s=100e6,
            flaky_network_probability=0.005,
        ),
    )
}
