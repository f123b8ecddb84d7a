"""The shipped Prometheus example: `promtool` accepts the config and the rules, the rules' unit tests pass, and every
metric the rules use is one slmops serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.control.test_metrics_exposition import DOCUMENTED

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")

AGENT_FAMILIES = {
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
    "slmops_agent_phase",
    "slmops_agent_active_version",
    "slmops_agent_committed",
    "slmops_agent_staged_slots",
    "slmops_agent_download_partial_bytes",
    "slmops_agent_outbox_events",
    "slmops_agent_outbox_events_bytes",
    "slmops_agent_outbox_telemetry",
    "slmops_agent_outbox_telemetry_bytes",
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yml", cwd=EXAMPLE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tested = promtool("test", "rules", "alerts_test.yml", cwd=EXAMPLE)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_promtool_checks_the_config_with_its_token_file_and_rules(tmp_path: Path) -> None:
    # As shipped: the syntax (its token file and targets live on the Prometheus host, not here).
    syntax = promtool("check", "config", "--syntax-only", "prometheus.yml", cwd=EXAMPLE)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # In full, with the files it names present: the token file and the rule file it loads.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "slmops-scrape-token").write_text("a-scrape-token")
    text = (EXAMPLE / "prometheus.yml").read_text()
    assert "/etc/prometheus/secrets/slmops-scrape-token" in text
    text = text.replace("/etc/prometheus/secrets/", f"{secrets}/").replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(EXAMPLE / "alerts.yml", tmp_path / "alerts.yml")
    full = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "18 rules found" in full.stdout or "rules found" in full.stdout


def test_every_metric_the_rules_use_is_served() -> None:
    served = set(DOCUMENTED) | AGENT_FAMILIES
    suffixes = ("_total", "_bucket", "_count", "_sum")
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            # Metric names, not label names: leave out the selectors {...} and the by/on/without (...) lists.
            expr = re.sub(r"\{[^}]*\}|\b(?:by|on|without|ignoring)\s*\([^)]*\)", " ", rule["expr"])
            used |= set(re.findall(r"\b((?:slmops|gen_ai)_[a-z_]+)\b", expr))
    assert used
    unknown = set()
    for name in used:
        base = next(
            (name.removesuffix(s) for s in suffixes if name.endswith(s) and name.removesuffix(s) in served), name
        )
        if base not in served:
            unknown.add(name)
    assert not unknown, f"alerts.yml uses metrics nobody serves: {sorted(unknown)}"
    jobs = {job["job_name"] for job in yaml.safe_load((EXAMPLE / "prometheus.yml").read_text())["scrape_configs"]}
    for group in rules["groups"]:
        for rule in group["rules"]:
            for job in re.findall(r'job="([^"]+)"', rule["expr"]):
                assert job in jobs, (rule["alert"], job)
