from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from slmops.agent.capabilities import cpu_flags, detect_accelerator, measure_capabilities
from slmops.agent.identity import IdentityStore
from slmops.agent.outbox import Outbox, OutboxConfig, new_event
from slmops.agent.slots import Slots
from slmops.agent.state import AgentLock, AgentState, DataDir, StateStore
from slmops.errors import ConfigError, ConflictError, NotFoundError
from slmops.registry.blobstore import DirectoryBlobStore
from tests.agent.conftest import Models


def test_the_outbox_is_bounded_counts_what_it_drops_and_deletes_only_acknowledged_ids(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", OutboxConfig(max_events=5, max_bytes=1 << 20)).open()
    try:
        events = [new_event("tick", detail={"n": n}) for n in range(8)]
        for event in events:
            outbox.add(event)
        outbox.add(events[-1])  # the same id again is stored once

        pending = outbox.pending()
        assert pending[0].kind == "events_dropped" and pending[0].detail["count"] == 3
        assert [e.id for e in pending[1:]] == [e.id for e in events[3:]]
        assert outbox.pending() == pending  # stable ids: a resend is recognisable

        removed = outbox.acknowledge([pending[0].id, events[3].id, "unknown"])
        assert removed == 2
        assert [e.id for e in outbox.pending()] == [e.id for e in events[4:]]
        assert outbox.dropped() == 0
    finally:
        outbox.close()


def test_the_outbox_is_bounded_by_bytes_and_survives_a_reopen(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", OutboxConfig(max_events=1000, max_bytes=2000)).open()
    for n in range(30):
        outbox.add(new_event("tick", detail={"reason": "x" * 50, "n": n}))
    count, size = outbox.size()
    outbox.close()

    again = Outbox(tmp_path / "o.db").open()
    try:
        assert again.size() == (count, size)
        assert size <= 2000 and count < 30
        assert again.dropped() == 30 - count
    finally:
        again.close()


def test_two_agents_cannot_share_a_data_dir(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "a")
    data.initialize()
    first, second = AgentLock(data.lock_file), AgentLock(data.lock_file)
    first.acquire()
    try:
        with pytest.raises(ConflictError, match=f"pid {os.getpid()}"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()
    assert stat.S_IMODE(data.root.stat().st_mode) == 0o700


def test_state_is_written_atomically_and_secrets_are_private(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "a")
    data.initialize()
    store = StateStore(data.state_file)
    store.save(AgentState(failed={"sha256:" + "1" * 64: "probe"}, crash_counts={"x": 2}))
    identities = IdentityStore(data)
    key = identities.key()
    identities.save_credential("secret")

    assert store.load().crash_counts == {"x": 2}
    assert identities.key().public_text == key.public_text
    for path in (data.state_file, data.key_file, data.credential_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in data.root.iterdir() if p.name.startswith(".")] == []
    data.state_file.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        store.load()


def test_slots_stage_switch_and_roll_back_atomically(models: Models, tmp_path: Path) -> None:
    cache = DirectoryBlobStore(tmp_path / "cache")
    cache.initialize()
    for envelope in (models.v1, models.v2):
        for entry in envelope.manifest.files:
            cache.put_file(models.registry.blob_path(entry.digest), entry.digest)
    slots = Slots(tmp_path / "slots", cache)

    with pytest.raises(NotFoundError, match="stage it first"):
        slots.switch(models.v1.digest)
    slots.stage(models.v1)
    slots.stage(models.v1)  # idempotent
    slots.stage(models.v2)
    assert slots.staged() == {models.v1.digest, models.v2.digest}
    model_file = slots.model_file(models.v1.digest)
    assert model_file.stat().st_ino == cache.path(models.v1.manifest.files[0].digest).stat().st_ino  # a hard link
    slots.verify(models.v2.digest)

    assert slots.switch(models.v1.digest) is None
    assert slots.switch(models.v2.digest) == models.v1.digest
    assert (slots.current(), slots.previous()) == (models.v2.digest, models.v1.digest)
    assert os.readlink(slots.root / "current") == models.v2.digest.removeprefix("sha256:")

    assert slots.rollback() == models.v1.digest
    assert (slots.current(), slots.previous()) == (models.v1.digest, None)
    assert slots.gc(set()) == [models.v2.digest]
    assert slots.rollback() is None and slots.current() is None
    assert [p.name for p in slots.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_staging_refuses_a_version_whose_blobs_are_not_cached(models: Models, tmp_path: Path) -> None:
    cache = DirectoryBlobStore(tmp_path / "cache")
    cache.initialize()
    slots = Slots(tmp_path / "slots", cache)

    with pytest.raises(NotFoundError, match="not in the cache"):
        slots.stage(models.v1)

    assert slots.staged() == frozenset()
    assert list(slots.root.iterdir()) == []


def test_cpu_flags_from_x86_and_arm_cpuinfo() -> None:
    x86 = "processor: 0\nflags\t\t: fpu sse avx avx2 fma f16c avx512f avx512bw amx_tile\n"
    arm = "processor: 0\nFeatures\t: fp asimd evtstrm aes sve\n"

    assert cpu_flags(x86) == ["amx", "avx", "avx2", "avx512bw", "avx512f", "f16c", "fma"]
    assert cpu_flags(arm) == ["asimd", "neon", "sve"]
    assert cpu_flags("") == []


def test_accelerator_presence_is_read_from_dev(tmp_path: Path) -> None:
    assert detect_accelerator(tmp_path) is None
    (tmp_path / "dri").mkdir()
    (tmp_path / "dri" / "renderD128").touch()
    assert detect_accelerator(tmp_path) == "gpu?"
    (tmp_path / "nvidia0").touch()
    assert detect_accelerator(tmp_path) == "cuda?"


def test_capabilities_are_measured_and_can_be_overridden(tmp_path: Path) -> None:
    measured = measure_capabilities(tmp_path)
    assert measured.memory_bytes > 0 and measured.cpu_cores >= 1 and measured.disk_free_bytes > 0
    assert measured.arch and measured.os

    caps_file = tmp_path / "caps.json"
    caps_file.write_text('{"cpu_flags": ["neon"], "arch": "aarch64", "memory_bytes": 1}')
    overridden = measure_capabilities(tmp_path, memory_bytes=2 << 30, cpu_cores=4, capabilities_file=caps_file)
    assert (overridden.memory_bytes, overridden.cpu_cores, overridden.arch) == (2 << 30, 4, "aarch64")
    assert overridden.cpu_flags == ["neon"]

    caps_file.write_text('{"cpu_cores": 0}')
    with pytest.raises(ConfigError, match="not valid"):
        measure_capabilities(tmp_path, capabilities_file=caps_file)


def test_the_capabilities_file_is_read_leniently_as_json_numbers_and_numeric_strings(tmp_path: Path) -> None:
    caps_file = tmp_path / "caps.json"
    caps_file.write_text('{"memory_bytes": 8e9, "cpu_cores": "4"}')

    caps = measure_capabilities(tmp_path, capabilities_file=caps_file)

    assert (caps.memory_bytes, caps.cpu_cores) == (8_000_000_000, 4)
    caps_file.write_text('{"memory_bytes": 8.5e9, "cpu_cores": "four"}')
    with pytest.raises(ConfigError, match="not valid"):
        measure_capabilities(tmp_path, capabilities_file=caps_file)


def test_agent_help_and_status_need_only_the_core_dependencies(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.cli.test_cli import _BLOCK_HEAVY

    data = DataDir(tmp_path / "agent")
    data.initialize()
    for argv in (["agent", "--help"], ["agent", "status", "--data-dir", str(data.root), "--json"]):
        result = subprocess.run(
            [sys.executable, "-c", _BLOCK_HEAVY, *argv], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
    assert '"enrollment": "not enrolled"' in result.stdout
