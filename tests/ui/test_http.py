"""The dashboard over plain HTTP against a real `slmops server` on loopback: login and the session cookie, CSRF and
Origin checks on every form, roles, revocation, hostile ids and HTML escaping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token, revoke_api_token
from slmops.control.devices import get_device, label_device
from slmops.control.enrollment import create_enrollment_token
from slmops.control.rollouts import release
from tests.control.conftest import Device, register_variants
from tests.ui.conftest import Dashboard, dashboard_server, form_csrf, login

BLUEPRINT = "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: all}\nspec: {model: {name: tiny, ref: v1}}\n"
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("ui-http")
    # the session re-reads its token's row on every request, so a revocation shows at once
    with dashboard_server(root / "home", {"SLMOPS_AUTH_CACHE_TTL_S": "0", "SLMOPS_ROLLOUT_TICK_S": "1"}) as dash:
        yield dash


@pytest.fixture(scope="module")
def fleet(dash: Dashboard, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A blueprint, a pending device with a hostile hostname and label, and a running release."""
    plane = dash.plane
    register_variants(plane.registry, tmp_path_factory.mktemp("v1"))
    register_variants(plane.registry, tmp_path_factory.mktemp("v4"))  # tiny@v4, the release's target
    apply_blueprint(plane, BLUEPRINT, "test")
    token = create_enrollment_token(
        plane, max_uses=5, expires_in_s=None, auto_approve=False, labels={}, created_by="test"
    ).token
    body = Device(Ed25519PrivateKey.generate()).enroll_request(token, {"site": "lab"}).model_dump(mode="json")
    body["hostname"] = HOSTILE
    with dash.api() as api:
        enrolled = api.post("/api/v1/enroll", json=body)
        assert enrolled.status_code == 202, enrolled.text
        device_id: str = enrolled.json()["device_id"]
        label_device(plane, device_id, {"note": HOSTILE}, [])  # the API refuses such a value; an old row may not
        started = api.post("/api/v1/rollouts", json={"blueprint": "all", "to": "tiny@v4", "policy": {"soak_s": 3600}})
        assert started.status_code == 201, started.text
    return {"device": device_id, "release": started.json()["id"]}


@pytest.fixture
def client(dash: Dashboard) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dash.url, timeout=30) as client:
        yield client


def _origin(dash: Dashboard) -> dict[str, str]:
    return {"Origin": dash.url}


def _post(client: httpx.Client, path: str, data: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return client.post(path, data=data, headers=headers)


def test_a_logged_out_page_redirects_to_the_login_page(dash: Dashboard, client: httpx.Client) -> None:
    for path in ("/ui/", "/ui/releases", "/ui/devices/x", "/ui/models/tiny?x=1"):
        answer = client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login?next=/ui/")
    assert client.get("/ui").headers["location"] == "/ui/"
    assert client.get("/ui/static/ui.css").status_code == 200  # the stylesheet needs no session


def test_login_sets_an_httponly_samesite_cookie_that_is_not_the_token(dash: Dashboard, client: httpx.Client) -> None:
    answer = login(client, dash.operator)

    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("slmops_ui="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert "secure" not in flags  # plain http on loopback
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert dash.operator not in value and dash.operator.removeprefix("slmops_op_") not in value
    page = client.get("/ui/")
    assert page.status_code == 200 and "ops" in page.text and "operator" in page.text


def test_the_cookie_is_secure_behind_an_https_proxy(dash: Dashboard, client: httpx.Client) -> None:
    form = client.get("/ui/login", headers={"X-Forwarded-Proto": "https"})
    login_cookie = form.headers["set-cookie"]
    assert "secure" in [part.strip().lower() for part in login_cookie.split(";")]
    answer = client.post(  # the browser would send the Secure cookie over https; httpx here is on http
        "/ui/login",
        data={"token": dash.viewer, "csrf": form_csrf(form.text), "next": "/ui/"},
        headers={"Origin": dash.url, "X-Forwarded-Proto": "https", "Cookie": login_cookie.split(";", 1)[0]},
    )
    assert answer.status_code == 303
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("slmops_ui="))
    assert "secure" in [part.strip().lower() for part in cookie.split(";")]


def test_a_bad_token_or_a_device_credential_does_not_log_in(dash: Dashboard, client: httpx.Client) -> None:
    for token, expected in (("slmops_op_nope", "unknown or revoked"), ("slmops_dev_abc", "device credential")):
        answer = login(client, token)
        assert answer.status_code == 401 and expected in answer.text
        assert not any(c.startswith("slmops_ui=") for c in answer.headers.get_list("set-cookie"))


def test_a_login_post_without_the_forms_own_csrf_value_or_from_another_origin_is_refused(
    dash: Dashboard, client: httpx.Client
) -> None:
    no_form = client.post("/ui/login", data={"token": dash.operator, "csrf": "x"}, headers=_origin(dash))
    form = client.get("/ui/login")
    foreign = client.post(
        "/ui/login",
        data={"token": dash.operator, "csrf": form_csrf(form.text)},
        headers={"Origin": "http://evil.example"},
    )
    assert no_form.status_code == 403 and foreign.status_code == 403
    assert client.get("/ui/").status_code == 303  # still logged out


def test_login_never_redirects_off_the_dashboard(dash: Dashboard, client: httpx.Client) -> None:
    for target in ("//evil.example/ui/", "https://evil.example/", "/ui\\@evil.example", "/api/v1/devices"):
        answer = login(client, dash.viewer, target)
        assert answer.headers["location"] == "/ui/", target


def test_a_post_without_or_with_a_wrong_csrf_token_or_origin_is_refused_and_changes_nothing(
    dash: Dashboard, client: httpx.Client, fleet: dict[str, str]
) -> None:
    login(client, dash.operator)
    device = fleet["device"]
    page = client.get(f"/ui/devices/{device}")
    csrf = form_csrf(page.text)
    path = f"/ui/devices/{device}/approve"

    refused = {
        "no token": _post(client, path, {}, _origin(dash)),
        "wrong token": _post(client, path, {"csrf": csrf[:-2] + "xx"}, _origin(dash)),
        "another site": _post(client, path, {"csrf": csrf}, {"Origin": "http://evil.example"}),
        "no origin": _post(client, path, {"csrf": csrf}, {}),
        "json body": client.post(path, json={"csrf": csrf}, headers=_origin(dash)),
    }

    for why, answer in refused.items():
        assert answer.status_code in (403, 415), (why, answer.status_code)
        assert answer.headers["content-type"].startswith("text/html"), why
    assert get_device(dash.plane, device).state == "pending"
    # the release page's forms are refused the same way
    abort = _post(client, f"/ui/releases/{fleet['release']}/abort", {"csrf": "nope"}, _origin(dash))
    assert abort.status_code == 403 and release(dash.plane, fleet["release"]).state == "running"
    # a GET never changes state
    assert client.get(path).status_code in (404, 405)
    assert get_device(dash.plane, device).state == "pending"


def test_a_viewer_sees_no_action_and_gets_403_on_post(
    dash: Dashboard, client: httpx.Client, fleet: dict[str, str]
) -> None:
    login(client, dash.viewer)
    device_page = client.get(f"/ui/devices/{fleet['device']}")
    release_page = client.get(f"/ui/releases/{fleet['release']}")
    csrf = form_csrf(release_page.text)  # the logout form's

    assert device_page.status_code == 200 and 'id="approve"' not in device_page.text
    assert release_page.status_code == 200 and "action-abort" not in release_page.text
    assert "action-pause" not in release_page.text
    approve = _post(client, f"/ui/devices/{fleet['device']}/approve", {"csrf": csrf}, _origin(dash))
    pause = _post(client, f"/ui/releases/{fleet['release']}/pause", {"csrf": csrf}, _origin(dash))
    assert approve.status_code == 403 and pause.status_code == 403
    assert get_device(dash.plane, fleet["device"]).state == "pending"
    assert release(dash.plane, fleet["release"]).state == "running"


def test_an_operator_pauses_and_resumes_a_release(dash: Dashboard, client: httpx.Client, fleet: dict[str, str]) -> None:
    login(client, dash.operator)
    page = client.get(f"/ui/releases/{fleet['release']}")
    assert 'id="action-pause"' in page.text and 'id="action-resume"' not in page.text
    csrf = form_csrf(page.text)

    paused = _post(client, f"/ui/releases/{fleet['release']}/pause", {"csrf": csrf}, _origin(dash))
    after = client.get(paused.headers["location"])
    assert paused.status_code == 303 and release(dash.plane, fleet["release"]).state == "paused"
    assert 'id="action-resume"' in after.text and "paused by ops" in after.text
    again = _post(client, f"/ui/releases/{fleet['release']}/pause", {"csrf": csrf}, _origin(dash))
    assert again.status_code == 409 and "only a running release" in again.text
    resumed = _post(client, f"/ui/releases/{fleet['release']}/resume", {"csrf": csrf}, _origin(dash))
    assert resumed.status_code == 303 and release(dash.plane, fleet["release"]).state == "running"


def test_revoking_the_api_token_ends_its_session(dash: Dashboard, client: httpx.Client) -> None:
    create_api_token(dash.plane, "short-lived", "operator", "test")
    token = create_api_token(dash.plane, "revoked-soon", "viewer", "test").token
    login(client, token)
    assert client.get("/ui/").status_code == 200

    revoke_api_token(dash.plane, "revoked-soon")
    answer = client.get("/ui/")

    assert answer.status_code == 303 and "ended=1" in answer.headers["location"]
    assert "session ended" in client.get(answer.headers["location"]).text


def test_logout_ends_the_session_on_the_server(dash: Dashboard, client: httpx.Client) -> None:
    login(client, dash.viewer)
    cookie = client.cookies.get("slmops_ui")
    page = client.get("/ui/")
    out = _post(client, "/ui/logout", {"csrf": form_csrf(page.text)}, _origin(dash))
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"

    with httpx.Client(base_url=dash.url, cookies={"slmops_ui": cookie or ""}) as replay:
        assert replay.get("/ui/").status_code == 303  # the old cookie names no session any more


def test_a_forged_cookie_is_refused(dash: Dashboard, client: httpx.Client) -> None:
    login(client, dash.viewer)
    session_id, _signature = (client.cookies.get("slmops_ui") or "").rsplit(".", 1)
    for forged in (f"{session_id}.{'0' * 64}", session_id, "x" * 500, "<script>"):
        with httpx.Client(base_url=dash.url, cookies={"slmops_ui": forged}) as other:
            assert other.get("/ui/").status_code == 303, forged


@pytest.mark.parametrize(
    "path",
    [
        "/ui/devices/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "/ui/releases/..%2F..%2Fetc%2Fpasswd",
        "/ui/blueprints/%27%20OR%201%3D1%20--",
        "/ui/models/%00",
        "/ui/releases/rel-0000000000",
        "/ui/no/such/page%3Cb%3E",
    ],
)
def test_a_hostile_or_unknown_id_gives_a_404_page(dash: Dashboard, client: httpx.Client, path: str) -> None:
    login(client, dash.viewer)
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in answer.text and "<b>" not in answer.text.split("<main>", 1)[1]
    assert 'id="error-message"' in answer.text


def test_labels_and_hostnames_are_shown_escaped(dash: Dashboard, client: httpx.Client, fleet: dict[str, str]) -> None:
    login(client, dash.operator)
    for path in ("/ui/", "/ui/devices", f"/ui/devices/{fleet['device']}"):
        page = client.get(path)
        assert page.status_code == 200
        assert HOSTILE not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path
    policy = client.get(f"/ui/devices/{fleet['device']}").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_an_operator_approves_a_pending_device(dash: Dashboard, client: httpx.Client, fleet: dict[str, str]) -> None:
    login(client, dash.operator)
    page = client.get(f"/ui/devices/{fleet['device']}")
    answer = _post(client, f"/ui/devices/{fleet['device']}/approve", {"csrf": form_csrf(page.text)}, _origin(dash))
    assert answer.status_code == 303
    assert get_device(dash.plane, fleet["device"]).state == "approved"
    assert "device approved" in client.get(answer.headers["location"]).text


def test_every_page_renders_for_a_viewer(dash: Dashboard, client: httpx.Client, fleet: dict[str, str]) -> None:
    login(client, dash.viewer)
    for path in (
        "/ui/",
        "/ui/devices?device_class=x86_64-8gb",
        "/ui/blueprints",
        "/ui/blueprints/all",
        "/ui/releases",
        "/ui/models",
        "/ui/models/tiny",
        "/ui/drift",
        "/ui/alerts",
        "/ui/cost",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:500])
        assert "<main>" in answer.text


def test_the_openapi_document_lists_no_dashboard_route(dash: Dashboard, client: httpx.Client, tmp_path: Path) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/ui")]
