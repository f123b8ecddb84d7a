"""Site adaptations over real HTTP on loopback: PUT/GET /api/v1/sites/{site}, who may do what, the desired state
(ETag) of that site's devices only, and the plan's local-adaptation column."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from tests.agent.simulator import SimServer
from tests.control.conftest import Device, Variants, bearer, register_variants

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shops}
spec:
  model: {name: tiny, ref: v1}
  local:
    adapters: [lora-shop]
    system_prompt_max_chars: 40
    sampling: {temperature: [0.0, 1.0], max_tokens: [1, 256]}
"""


@contextmanager
def serving(plane: ControlPlane) -> Iterator[str]:
    """The control-plane app on a loopback port; yields its URL."""
    server = SimServer(create_app(plane.settings, plane)).start()
    try:
        yield server.url
    finally:
        server.stop()


class Api:
    def __init__(self, url: str, plane: ControlPlane) -> None:
        self.http = httpx.Client(base_url=url + "/api/v1", timeout=10)
        self.admin = bearer(create_api_token(plane, "root", "admin", "test").token)
        self.operator = bearer(create_api_token(plane, "op", "operator", "test").token)
        self.viewer = bearer(create_api_token(plane, "view", "viewer", "test").token)

    def enroll(self, device: Device, labels: dict[str, str]) -> tuple[str, dict[str, str]]:
        token = self.http.post("/enrollment-tokens", json={"auto_approve": True}, headers=self.admin).json()["token"]
        answer = self.http.post("/enroll", json=device.enroll_request(token, labels).model_dump(mode="json"))
        assert answer.status_code == 200, answer.text
        return answer.json()["device_id"], bearer(answer.json()["credential"])

    def apply(self, source: str) -> None:
        answer = self.http.post("/blueprints", json={"source": source}, headers=self.operator)
        assert answer.status_code in (200, 201), answer.text


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[Api]:
    with serving(plane) as url:
        client = Api(url, plane)
        yield client
        client.http.close()


@pytest.fixture
def variants(plane: ControlPlane, tmp_path: Path) -> Variants:
    return register_variants(plane.registry, tmp_path)


def test_operators_set_a_site_and_viewers_read_it(api: Api, variants: Variants) -> None:
    body = {"system_prompt": "Be brief.", "sampling": {"temperature": 0.3}}

    refused = api.http.put("/sites/berlin-3", json=body, headers=api.viewer)
    stored = api.http.put("/sites/berlin-3", json=body, headers=api.operator)
    read = api.http.get("/sites/berlin-3", headers=api.viewer)
    bad_name = api.http.get("/sites/no spaces!", headers=api.viewer)
    bad_value = api.http.put("/sites/berlin-3", json={"sampling": {"temperature": 9}}, headers=api.operator)
    anonymous = api.http.get("/sites/berlin-3")

    assert refused.status_code == 403
    assert stored.status_code == 200, stored.text
    assert read.status_code == 200 and read.json()["adaptation"] == {
        "adapter": None,
        "system_prompt": "Be brief.",
        "sampling": {"temperature": 0.3, "top_p": None, "max_tokens": None},
    }
    assert read.json()["updated_by"] == "operator:op" and read.json()["effects"] == []
    assert bad_name.status_code == 422 and bad_value.status_code == 422 and anonymous.status_code == 401
    cleared = api.http.put("/sites/berlin-3", json={}, headers=api.operator)
    assert cleared.status_code == 200 and cleared.json()["updated_by"] is None


def test_a_site_change_changes_the_desired_state_of_that_sites_devices_only(
    api: Api, variants: Variants, new_device: Callable[..., Device]
) -> None:
    api.apply(BLUEPRINT)
    shop_id, shop_auth = api.enroll(new_device(), {"site": "berlin-3"})
    other_id, other_auth = api.enroll(new_device(), {"site": "paris-1"})
    shop_before = api.http.get(f"/devices/{shop_id}/desired", headers=shop_auth)
    other_before = api.http.get(f"/devices/{other_id}/desired", headers=other_auth)

    body = {"system_prompt": "x" * 41, "sampling": {"temperature": 0.5, "max_tokens": 999}, "adapter": "lora-x"}
    assert api.http.put("/sites/berlin-3", json=body, headers=api.operator).status_code == 200
    shop_after = api.http.get(
        f"/devices/{shop_id}/desired", headers={**shop_auth, "If-None-Match": shop_before.headers["etag"]}
    )
    other_after = api.http.get(
        f"/devices/{other_id}/desired", headers={**other_auth, "If-None-Match": other_before.headers["etag"]}
    )

    assert other_after.status_code == 304
    assert shop_after.status_code == 200 and shop_after.headers["etag"] != shop_before.headers["etag"]
    local = shop_after.json()["local"]
    assert local["site"] == "berlin-3" and local["system_prompt"] is None and local["adapter"] is None
    assert local["sampling"] == {"temperature": 0.5, "top_p": None, "max_tokens": None}
    assert local["bounds"] == {"temperature": [0.0, 1.0], "top_p": None, "max_tokens": [1, 256]}
    assert local["dropped"] == [
        "system prompt: 41 characters, more than the 40 the blueprint allows",
        "max_tokens 999: outside the blueprint's bounds [1, 256]",
        "adapter lora-x: the blueprint does not allow it (spec.local.adapters: lora-shop)",
    ]
    shown = api.http.get("/sites/berlin-3", headers=api.viewer).json()
    [effect] = shown["effects"]
    assert effect["devices"] == [shop_id] and effect["blueprint"] == "shops@1"
    assert effect["local"] == local


def test_the_plan_shows_each_devices_site_adaptation(
    api: Api, variants: Variants, new_device: Callable[..., Device]
) -> None:
    api.apply(BLUEPRINT)
    shop_id, _ = api.enroll(new_device(), {"site": "berlin-3"})
    api.http.put("/sites/berlin-3", json={"system_prompt": "Hallo!", "sampling": {"top_p": 0.9}}, headers=api.operator)

    plan = api.http.post(
        "/blueprints/plan", json={"source": BLUEPRINT.replace("max_chars: 40", "max_chars: 4")}, headers=api.operator
    )

    assert plan.status_code == 200, plan.text
    [entry] = plan.json()["entries"]
    assert entry["device_id"] == shop_id and entry["change"] == "reconfigure"
    assert entry["local"]["dropped"] == [
        "system prompt: 6 characters, more than the 4 the blueprint allows",
        "top_p 0.9: the blueprint sets no bounds for top_p, so a site may not set it",
    ]
