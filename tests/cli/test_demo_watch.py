"""The demo's way back against a real `slmops server` process: a simulated class whose prompts grow raises a drift
alert through the controller, the alert reaches a real webhook receiver with a valid signature, and the CLI's
drift, alerts and cost commands run against it (the same code `make demo` runs, with shorter drift steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slmops.cli._demo_watch import DRIFT_CLASS, prepare, show_the_way_back
from slmops.cli.demo import _Demo
from slmops.control.blueprints import apply_blueprint
from tests.tiny_gguf import write_tiny_gguf
from tests.ui.conftest import SCREENSHOTS, dashboard_server

CHROMIUM = shutil.which("chromium")


def _see_it_in_the_browser(url: str, token: str) -> None:
    """The dashboard's drift, alerts and cost pages in Debian's chromium, screenshotted (skipped without it)."""
    if CHROMIUM is None:
        return
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
            page.goto(f"{url}/ui/drift")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url("**/ui/drift")
            expect(page.locator(f'section.drift-entry[data-class="{DRIFT_CLASS}"]')).to_have_attribute(
                "data-level", "alert"
            )
            expect(
                page.locator(f'section[data-class="{DRIFT_CLASS}"] .plot[data-signal="prompt_tokens"]')
            ).to_have_count(1)
            page.screenshot(path=str(SCREENSHOTS / "drift-alert.png"), full_page=True)
            page.goto(f"{url}/ui/alerts")
            expect(page.locator('#alerts tr[data-rule="drift"][data-status="firing"]').first).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "alerts-firing.png"), full_page=True)
            page.goto(f"{url}/ui/cost")
            expect(page.locator("#cost-rows")).to_contain_text(DRIFT_CLASS)
            expect(page.locator("#edge-total")).not_to_have_text("-")
            page.screenshot(path=str(SCREENSHOTS / "cost-report.png"), full_page=True)
        finally:
            browser.close()


BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: counters}
spec:
  selector: {labels: {site: demo}}
  model: {name: tiny, ref: v1}
"""


def test_a_class_whose_prompts_grow_raises_a_drift_alert_delivered_to_the_webhook(tmp_path: Path) -> None:
    watch = prepare(tmp_path, drift_step_s=5, drift_reference_s=20)
    try:
        with dashboard_server(tmp_path / "home", {**watch.server_env, "SLMOPS_ROLLOUT_TICK_S": "1"}) as dash:
            dash.plane.registry.import_model(write_tiny_gguf(tmp_path / "tiny.gguf", seed=4), "tiny")
            apply_blueprint(dash.plane, BLUEPRINT, "test")
            operator = {"SLMOPS_SERVER_URL": dash.url, "SLMOPS_TOKEN": dash.operator}
            step = _Demo(tmp_path)

            try:
                show_the_way_back(step, dash.home, operator, dash.url, watch, shift_after_s=40)

                drift = step.capture(dash.home, "drift", "show", "--json", env=operator)
                cost = step.capture(dash.home, "cost", "--json", env=operator)
                _see_it_in_the_browser(dash.url, dash.viewer)
            finally:
                step.stop_all()
    finally:
        watch.receiver.stop()

    entry = next(e for e in drift if e["device_class"] == DRIFT_CLASS)
    levels = {s["signal"]: s["level"] for s in entry["signals"]}
    assert levels["prompt_tokens"] == "alert"
    assert levels["finish_reason"] != "alert" and levels["empty_output"] != "alert"  # only the prompts changed
    firing = [b for b in watch.receiver.received if b["type"] == "alert.firing" and b["alert"]["rule"] == "drift"]
    assert firing and firing[0]["alert"]["labels"]["device_class"] == DRIFT_CLASS
    assert watch.receiver.refused == 0
    assert {row["device_class"] for row in cost["rows"]} == {DRIFT_CLASS}
    assert sum(row["input_tokens"]["value"] for row in cost["rows"]) > 0
    svg = (tmp_path / "cost.svg").read_text()
    assert svg.startswith("<svg") or svg.startswith("<?xml")
    assert json.dumps(cost).count("source") > 0
