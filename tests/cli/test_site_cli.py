"""`slmops site set|show` and the plan's site column, against the control-plane app on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cli import run
from slmops.registry.db import make_engine, migrate
from tests.control.conftest import Clock, Device, GiB, make_plane, register_variants
from tests.control.test_sites import BLUEPRINT, Api, serving


@pytest.fixture
def new_device() -> Callable[..., Device]:
    return lambda memory_gib=8: Device(Ed25519PrivateKey.generate(), int(memory_gib * GiB))


@pytest.fixture
def api(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    engine = make_engine(database_url)
    migrate(engine)
    plane = make_plane(engine, tmp_path / "home", Clock())
    register_variants(plane.registry, tmp_path)
    with serving(plane) as url:
        client = Api(url, plane)
        monkeypatch.setenv("SLMOPS_SERVER_URL", url)
        monkeypatch.setenv("SLMOPS_TOKEN", client.operator["Authorization"].removeprefix("Bearer "))
        yield client
        client.http.close()
    plane.close()
    engine.dispose()


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_site_set_merges_show_explains_and_clear_removes(
    api: Api, new_device: Callable[..., Device], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.apply(BLUEPRINT)
    device_id, _ = api.enroll(new_device(), {"site": "berlin-3"})
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Antworte auf Deutsch.\n", encoding="utf-8")

    code, _, err = _run(
        capsys, ["site", "set", "berlin-3", "--system-prompt-file", str(prompt), "--temperature", "0.4"]
    )
    assert code == 0, err
    code, out, err = _run(
        capsys, ["site", "set", "berlin-3", "--max-tokens", "999", "--adapter", "lora-shop", "--json"]
    )
    assert code == 0, err
    stored = json.loads(out)

    assert stored["adaptation"] == {
        "adapter": "lora-shop",
        "system_prompt": "Antworte auf Deutsch.",
        "sampling": {"temperature": 0.4, "top_p": None, "max_tokens": 999},
    }
    [effect] = stored["effects"]
    assert effect["devices"] == [device_id]
    assert (
        effect["local"]["system_prompt"] == "Antworte auf Deutsch."
        and effect["local"]["sampling"]["temperature"] == 0.4
    )
    assert effect["local"]["dropped"] == [
        "max_tokens 999: outside the blueprint's bounds [1, 256]",
        "adapter lora-shop: no adapter version of that name is in the registry",
    ]

    code, out, err = _run(capsys, ["site", "show", "berlin-3"])
    assert code == 0, err
    assert "system prompt (21 chars), temperature=0.4" in out and "shops@1" in out
    assert "max_tokens 999: outside the blueprint's bounds [1, 256]" in out

    code, out, err = _run(
        capsys, ["plan", "-f", str(_write(tmp_path, BLUEPRINT.replace("max_chars: 40", "max_chars: 5")))]
    )
    assert code == 0, err
    assert "site adaptations dropped:" in out
    assert f"{device_id} (site berlin-3): system prompt: 21 characters, more than the 5 the blueprint allows" in out

    code, out, err = _run(capsys, ["site", "set", "berlin-3", "--clear", "--json"])
    assert code == 0, err
    assert json.loads(out)["updated_by"] is None
    code, out, _ = _run(capsys, ["site", "show", "berlin-3"])
    assert "site berlin-3: sets nothing" in out


def test_site_set_refuses_bad_input_with_clear_messages(
    api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    both = _run(capsys, ["site", "set", "s1", "--system-prompt", "a", "--system-prompt-file", str(tmp_path / "p")])
    out_of_range = _run(capsys, ["site", "set", "s1", "--temperature", "7"])
    bad_name = _run(capsys, ["site", "show", "not a site"])
    viewer = _run(capsys, ["site", "set", "s1", "--temperature", "0.1", "--token", api.viewer["Authorization"][7:]])

    assert both[0] != 0 and "not both" in both[2]
    assert out_of_range[0] != 0 and "temperature" in out_of_range[2]
    assert bad_name[0] != 0 and "is not a valid label value" in bad_name[2]
    assert viewer[0] != 0 and "needs 'operator'" in viewer[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "blueprint.yaml"
    path.write_text(text, encoding="utf-8")
    return path
