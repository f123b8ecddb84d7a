"""The dashboard in a real browser (Playwright driving Debian's chromium) against a real `slmops server` and a
simulated fleet speaking the real protocol.

One server, fleet and browser for the module; the tests run in order: log in and see the fleet; watch a healthy
release advance on its live page (the page refreshes itself; it is never reloaded) to completion; watch a release
that fails on one class halt, with the gate that failed and its numbers; as a viewer see no action buttons; as an
operator click abort and see what the page then shows. Every page is screenshotted into ``tests/ui/screenshots/``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.control.blueprints import apply_blueprint
from slmops.control.enrollment import create_enrollment_token
from slmops.core.manifest import SignedManifest
from slmops.sim import BackgroundFleet, FleetRun, parse_fleet
from tests.sim.test_sim_e2e import _register
from tests.tiny_gguf import write_tiny_gguf
from tests.ui.conftest import Dashboard, dashboard_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]

GiB = 1 << 30
PER_CLASS = 5
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shop}
spec:
  selector: {labels: {site: sim}}
  model: {name: tiny, ref: v1}
  variant:
    policy: {objective: best_quality, max_memory_fraction: 0.5}
"""
POLICY: dict[str, Any] = {
    "stages": [0.2, 0.6, 1.0],
    "soak_s": 2,
    "min_reporting_devices": 1,
    "gates": [
        {"name": "crashes", "metric": "crashes", "min_samples": 1, "critical": True},
        {"name": "rollbacks", "metric": "rollbacks", "min_samples": 1, "max_rate": 0.01, "critical": True},
        {"name": "errors", "metric": "errors", "min_samples": 40, "max_increase": 0.05, "critical": True},
    ],
}


def _fleet_yaml(bad: str) -> str:
    return f"""\
seed: 2
poll_interval_s: 1
profiles:
  small: {{memory_bytes: {2 * GiB}, arch: aarch64, speed_factor: 2.0}}
  medium: {{memory_bytes: {8 * GiB}}}
  large: {{memory_bytes: {16 * GiB}, cpu_cores: 8, speed_factor: 0.5}}
devices:
  - {{profile: small, count: {PER_CLASS}, labels: {{site: sim}}}}
  - {{profile: medium, count: {PER_CLASS}, labels: {{site: sim}}}}
  - {{profile: large, count: {PER_CLASS}, labels: {{site: sim}}}}
runtime:
  requests_per_window: 40
  telemetry_window_s: 2
  overrides:
    - {{profile: small, version: "{bad}", activation_failure_rate: 1.0}}
"""


@dataclass
class World:
    dash: Dashboard
    good: SignedManifest
    bad: SignedManifest
    third: SignedManifest
    fleet: BackgroundFleet
    shots: Path

    def api_get(self, path: str) -> Any:
        with self.dash.api() as api:
            answer = api.get(f"/api/v1{path}")
            answer.raise_for_status()
            return answer.json()

    def start(self, version: SignedManifest, policy: dict[str, Any] | None = None) -> str:
        body = {"blueprint": "shop", "to": f"tiny@{version.manifest.version}", "policy": policy or POLICY}
        with self.dash.api(self.dash.operator) as api:
            answer = api.post("/api/v1/rollouts", json=body)
        assert answer.status_code == 201, answer.text
        release_id: str = answer.json()["id"]
        return release_id


def _wait(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, screenshots: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("ui-browser")
    env = {
        "SLMOPS_ROLLOUT_TICK_S": "1",
        "SLMOPS_ROLLOUT_LEASE_S": "3",
        "SLMOPS_DESIRED_CACHE_TTL_S": "1",
        "SLMOPS_AUTH_CACHE_TTL_S": "1",
        "SLMOPS_DEVICE_OFFLINE_AFTER_S": "15",
        "SLMOPS_DEVICE_OFFLINE_GRACE_S": "5",
    }
    with dashboard_server(root / "home", env) as dash:
        plane = dash.plane
        _register(plane.registry, root)
        versions = [
            plane.registry.import_model(write_tiny_gguf(root / "models" / f"{n}.gguf", seed=s), "tiny").envelope
            for n, s in (("good", 7), ("bad", 8), ("third", 9))
        ]
        apply_blueprint(plane, BLUEPRINT, "test")
        enroll = create_enrollment_token(
            plane, max_uses=3 * PER_CLASS, expires_in_s=None, auto_approve=True, labels={}, created_by="test"
        ).token
        fleet = BackgroundFleet(
            FleetRun(parse_fleet(_fleet_yaml(versions[1].digest)), dash.url, enroll, max_connections=8)
        )
        fleet.start()
        try:
            world = World(dash, *versions, fleet=fleet, shots=screenshots)
            _wait(
                "every simulated device enrolled and running a version",
                lambda: len(d := world.api_get("/devices")) == 3 * PER_CLASS and all(x["active_digest"] for x in d),
                120,
            )
            yield world
        finally:
            fleet.stop()


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _page(browser: Any, world: World, token: str, path: str = "/ui/") -> Any:
    """A fresh browser context logged in with ``token`` through the login form, showing ``path``."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.goto(world.dash.url + path)
    assert "/ui/login" in page.url  # not logged in yet: sent to the login page
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{path}")
    return page


def _shot(page: Any, world: World, name: str) -> None:
    page.screenshot(path=str(world.shots / f"{name}.png"), full_page=True)


def test_log_in_and_see_the_fleet(browser: Any, world: World) -> None:
    page = _page(browser, world, world.dash.operator)
    expect = sync_api.expect

    expect(page.locator("#total-devices")).to_have_text(str(3 * PER_CLASS))
    classes = page.locator("#version-map tr th:first-child a").all_inner_texts()
    assert sorted(classes) == ["aarch64-2gb", "x86_64-16gb", "x86_64-8gb"]
    expect(page.locator("#version-map")).to_contain_text("tiny@v3 (q4_0)")  # the 2 GiB class's variant
    _shot(page, world, "fleet")

    page.click("#version-map a >> text=aarch64-2gb")
    expect(page.locator("#devices tr")).to_have_count(PER_CLASS + 1)
    _shot(page, world, "devices")
    page.locator("#devices a.mono").first.click()
    expect(page.locator("#capabilities")).to_contain_text("2.0 GiB")
    expect(page.locator("#slots")).to_contain_text("tiny@v3 (q4_0)")
    expect(page.locator("#events")).to_contain_text("activated")
    _shot(page, world, "device")

    page.click("nav >> text=blueprints")
    page.click("#blueprints >> text=shop")
    expect(page.locator("#plan tr")).to_have_count(3 * PER_CLASS + 1)
    _shot(page, world, "blueprint")

    page.click("nav >> text=models")
    page.click("#models >> text=tiny")
    expect(page.locator("#lineage li")).to_have_count(6)
    expect(page.locator("#pareto .plot")).to_have_count(3)
    small = page.locator('#pareto .plot[data-class="aarch64-2gb"]')
    assert small.locator('circle[data-status="too big"]').count() >= 1  # q8_0 and the base need more than 1 GiB
    assert small.locator("circle.running").count() == 1
    _shot(page, world, "model")
    page.context.close()


def test_watch_a_healthy_release_advance_to_completion(browser: Any, world: World) -> None:
    expect = sync_api.expect
    release_id = world.start(world.good)
    page = _page(browser, world, world.dash.operator, f"/ui/releases/{release_id}")
    page.evaluate("window.__not_reloaded = true")
    expect(page.locator("#release-state")).to_have_text("running")
    _shot(page, world, "release-running")

    expect(page.locator("#stages .stage.current")).to_contain_text("stage 2", timeout=90_000)
    _shot(page, world, "release-stage-2")
    expect(page.locator("#release-state")).to_have_text("completed", timeout=120_000)

    assert page.evaluate("window.__not_reloaded") is True  # the page refreshed itself; it was not reloaded
    expect(page.locator("#stages .stage.done")).to_have_count(3)
    expect(page.locator("#gates")).to_contain_text("errors")
    expect(page.locator("#actions")).to_have_count(0)  # nothing to do on a finished release
    kinds = page.locator("#events tr td:nth-child(3)").all_inner_texts()
    assert [k for k in reversed(kinds) if k != "hold"] == ["started", "promoted", "promoted", "completed"]
    _shot(page, world, "release-completed")
    page.context.close()


def test_a_release_bad_on_one_class_halts_and_shows_the_gate_numbers(browser: Any, world: World) -> None:
    expect = sync_api.expect
    _wait(
        "every device on the good version",
        lambda: {d["active_digest"] for d in world.api_get("/devices")} == {world.good.digest},
        60,
    )
    release_id = world.start(world.bad)
    page = _page(browser, world, world.dash.operator, f"/ui/releases/{release_id}")

    expect(page.locator("#release-state")).to_have_text("halted", timeout=90_000)

    expect(page.locator("#halt-message")).to_contain_text("class aarch64-2gb")
    failed = page.locator("#halt-gates tr", has=page.locator("td.verdict-fail"))
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text("rollbacks")
    expect(failed).to_contain_text("events=1")  # the canary that rolled the version back, with the test's numbers
    expect(failed).to_contain_text("p_value=")
    expect(page.locator("#stages .stage.current")).to_contain_text("stage 1")
    expect(page.locator("#actions")).to_have_count(0)
    _shot(page, world, "release-halted")
    page.goto(world.dash.url + "/ui/releases")
    expect(page.locator("#releases")).to_contain_text("halted")
    _shot(page, world, "releases")
    page.context.close()


def test_a_viewer_sees_no_buttons_and_an_operator_aborts(browser: Any, world: World) -> None:
    expect = sync_api.expect
    slow = {**POLICY, "soak_s": 600}  # stays in stage 1 until aborted
    release_id = world.start(world.third, slow)
    path = f"/ui/releases/{release_id}"

    viewer = _page(browser, world, world.dash.viewer, path)
    expect(viewer.locator("#release-state")).to_have_text("running")
    expect(viewer.locator("button[name=action]")).to_have_count(0)
    expect(viewer.locator("header .who")).to_contain_text("viewer")
    _shot(viewer, world, "release-viewer")

    operator = _page(browser, world, world.dash.operator, path)
    expect(operator.locator("#action-abort")).to_be_visible()
    expect(operator.locator("#action-pause")).to_be_visible()
    operator.click("#action-abort")

    expect(operator.locator("#flash")).to_contain_text("abort")
    expect(operator.locator("#release-state")).to_have_text("aborted")
    expect(operator.locator("#release-reason")).to_contain_text("aborted by ops")
    expect(operator.locator("#halt-message")).to_contain_text("aborted by ops")
    expect(operator.locator("button[name=action]")).to_have_count(0)
    expect(operator.locator("#events tr").nth(1)).to_contain_text("aborted")
    _shot(operator, world, "release-aborted")
    # the viewer's page follows by itself, its last refresh showing the end
    expect(viewer.locator("#release-state")).to_have_text("aborted", timeout=15_000)
    assert world.api_get(f"/rollouts/{release_id}")["state"] == "aborted"
    viewer.context.close()
    operator.context.close()


def test_the_other_pages_render_in_the_browser(browser: Any, world: World) -> None:
    page = _page(browser, world, world.dash.viewer)
    for name in ("drift", "alerts", "cost"):
        page.click(f"nav >> text={name}")
        sync_api.expect(page.locator("h1")).to_be_visible()
        _shot(page, world, name)
    with httpx.Client(base_url=world.dash.url) as client:
        assert client.get("/ui/static/live.js").status_code == 200
    page.context.close()
