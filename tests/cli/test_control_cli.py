"""The control-plane commands against a real `slmops server` process on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cli import run
from slmops.registry.signing import format_public_key
from tests.servers import free_port, running_server

GiB = 1 << 30


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with running_server(tmp_path / "server.log") as url:
        yield url


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_operator_workflow_against_a_real_server(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = _json(capsys, ["token", "create", "--role", "admin", "--name", "root", "--json"])
    assert isinstance(admin, dict)
    monkeypatch.setenv("SLMOPS_SERVER_URL", server)
    monkeypatch.setenv("SLMOPS_TOKEN", admin["token"])

    enroll = _json(capsys, ["enroll-token", "create", "--uses", "2", "--label", "site=b3", "--json"])
    assert isinstance(enroll, dict) and enroll["labels"] == {"site": "b3"}
    key = Ed25519PrivateKey.generate()
    answer = httpx.post(
        f"{server}/api/v1/enroll",
        json={
            "token": enroll["token"],
            "public_key": format_public_key(key.public_key()).strip(),
            "capabilities": {"memory_bytes": 8 * GiB, "disk_free_bytes": GiB, "cpu_cores": 4, "arch": "x86_64"},
        },
    )
    device_id = answer.json()["device_id"]
    assert answer.status_code == 202

    pending = _json(capsys, ["device", "list", "--state", "pending", "--json"])
    assert isinstance(pending, list) and [d["id"] for d in pending] == [device_id]
    assert run(["device", "approve", device_id]) == 0
    assert run(["device", "label", device_id, "ring=canary", "site-"]) == 0
    shown = _json(capsys, ["device", "show", device_id, "--json"])
    assert isinstance(shown, dict) and shown["state"] == "approved" and shown["labels"] == {"ring": "canary"}
    assert shown["device_class"] == "x86_64-8gb" and shown["online"] is False

    blueprint = tmp_path / "bp.yaml"
    blueprint.write_text(
        "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: canary}\n"
        "spec:\n  priority: 5\n  selector: {labels: {ring: canary}}\n  model: {name: tiny}\n"
    )
    plan = _json(capsys, ["plan", "-f", str(blueprint), "--json"])
    assert isinstance(plan, dict) and plan["entries"][0]["winner"] == "canary@1"
    applied = _json(capsys, ["apply", "-f", str(blueprint), "--json"])
    again = _json(capsys, ["apply", "-f", str(blueprint), "--json"])
    assert isinstance(applied, dict) and isinstance(again, dict)
    assert (applied["created"], again["created"], again["revision"]) == (True, False, 1)
    listed = _json(capsys, ["blueprint", "list", "--json"])
    assert isinstance(listed, list) and listed[0]["model"] == "tiny@latest"

    capsys.readouterr()
    assert run(["device", "list"]) == 0
    assert run(["plan", "-f", str(blueprint)]) == 0
    assert run(["blueprint", "show", "canary"]) == 0
    out = capsys.readouterr().out
    assert device_id in out and "canary@1" in out and "ring: canary" in out

    viewer = _json(capsys, ["token", "create", "--role", "viewer", "--name", "v", "--json"])
    assert isinstance(viewer, dict)
    assert run(["apply", "-f", str(blueprint), "--token", viewer["token"]]) == 9
    assert "has role 'viewer'" in capsys.readouterr().err
    assert run(["device", "revoke", device_id]) == 0


def test_an_unreachable_server_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["device", "list", "--server", f"http://127.0.0.1:{free_port()}", "--token", "x"])

    err = capsys.readouterr().err
    assert code == 10 and "cannot reach the control plane" in err and "slmops server" in err
