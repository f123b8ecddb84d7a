"""Adapter versions in the desired state, over real HTTP on loopback: the base's signed manifest comes along, the
device may download the blobs of both, the pair's memory decides whether it fits, and a site's adapter trained for
another base than the one chosen for the device is dropped with the reason."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops.control.plane import ControlPlane
from slmops.core.manifest import SignedManifest
from slmops.registry.signing import verify_envelope
from tests.control.conftest import Device, Variants, register_variants
from tests.control.test_sites import Api, serving
from tests.tiny_lora import register_tiny_adapter

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: shops}}
spec:
  model: {{name: tiny, ref: {ref}}}
  variant: {variant}
  local: {{adapters: [lora-shop]}}
"""


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[Api]:
    with serving(plane) as url:
        client = Api(url, plane)
        yield client
        client.http.close()


@pytest.fixture
def variants(plane: ControlPlane, tmp_path: Path) -> Variants:
    return register_variants(plane.registry, tmp_path)


def _adapter_of(plane: ControlPlane, base: SignedManifest, tmp_path: Path) -> SignedManifest:
    path = tmp_path / f"adapter-{base.digest[7:15]}.gguf"
    path.write_bytes(b"GGUF" + secrets.token_bytes(500))
    return register_tiny_adapter(plane.registry, base, path)


def test_a_pinned_adapter_carries_its_signed_base_and_both_blobs_may_be_downloaded(
    api: Api, plane: ControlPlane, variants: Variants, new_device: Callable[..., Device], tmp_path: Path
) -> None:
    adapter = _adapter_of(plane, variants.q4, tmp_path)
    api.apply(BLUEPRINT.format(ref="v1", variant="{pin: lora-shop}"))
    device_id, auth = api.enroll(new_device(8), {"site": "anywhere"})

    desired = api.http.get(f"/devices/{device_id}/desired", headers=auth).json()

    model = desired["model"]
    assert model["digest"] == adapter.digest and model["variant"] == "lora-shop"
    base = SignedManifest.model_validate_json(json.dumps(model["base"]))
    assert base.digest == variants.q4.digest
    verify_envelope(base, plane.registry.keys.trusted())  # signed by the registry like the adapter itself
    for allowed in (adapter.manifest.files[0].digest, variants.q4.manifest.files[0].digest):
        reply = api.http.get(f"/blobs/{allowed}", headers=auth)
        assert reply.status_code == 200, reply.text
    refused = api.http.get(f"/blobs/{variants.q8.manifest.files[0].digest}", headers=auth)
    assert refused.status_code == 403


def test_an_adapter_whose_base_does_not_fit_is_not_chosen_with_a_reason(
    api: Api, plane: ControlPlane, variants: Variants, new_device: Callable[..., Device], tmp_path: Path
) -> None:
    adapter = _adapter_of(plane, variants.base, tmp_path)  # over the 6 GiB base
    api.apply(BLUEPRINT.format(ref=adapter.digest, variant="{}"))  # a release or alias naming the adapter
    small_id, small_auth = api.enroll(new_device(8), {})  # half of 8 GiB: 4 GiB
    large_id, large_auth = api.enroll(new_device(16), {})

    small = api.http.get(f"/devices/{small_id}/desired", headers=small_auth).json()
    large = api.http.get(f"/devices/{large_id}/desired", headers=large_auth).json()

    assert small["model"] is None
    assert (
        "tiny@v4 (lora-shop) does not fit: needs 6.00 GiB (its base tiny@v1 6.00 GiB + the adapter" in small["reason"]
    )
    assert large["model"]["digest"] == adapter.digest and large["model"]["base"]["digest"] == variants.base.digest


def test_a_sites_adapter_applies_only_over_the_base_it_was_trained_for(
    api: Api, plane: ControlPlane, variants: Variants, new_device: Callable[..., Device], tmp_path: Path
) -> None:
    adapter = _adapter_of(plane, variants.q4, tmp_path)  # trained for q4_k_m
    api.apply(BLUEPRINT.format(ref="v1", variant="{}"))
    small_id, small_auth = api.enroll(new_device(2), {"site": "shop"})  # 1 GiB budget: q4_k_m
    large_id, large_auth = api.enroll(new_device(8), {"site": "shop"})  # 4 GiB budget: q8_0
    assert api.http.put("/sites/shop", json={"adapter": "lora-shop"}, headers=api.operator).status_code == 200

    small = api.http.get(f"/devices/{small_id}/desired", headers=small_auth).json()
    large = api.http.get(f"/devices/{large_id}/desired", headers=large_auth).json()

    assert small["model"]["digest"] == adapter.digest and small["model"]["base"]["digest"] == variants.q4.digest
    assert small["local"]["adapter"] == "lora-shop" and small["local"]["dropped"] == []
    assert large["model"]["digest"] == variants.q8.digest and large["model"]["base"] is None
    assert large["local"]["adapter"] is None
    assert large["local"]["dropped"] == [
        "adapter lora-shop was trained for tiny@v3 (q4_k_m), the device now runs tiny@v2 (q8_0)"
    ]
    shown = api.http.get("/sites/shop", headers=api.viewer).json()
    assert sorted(e["model"] for e in shown["effects"]) == ["tiny@v2 (q8_0)", "tiny@v4 (lora-shop)"]
