"""Dashboard fixtures: a real `slmops server` on loopback with its own home, the same database opened in the test
process for setup (tokens, models, blueprints), and a logged-in httpx client."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.settings import ServerSettings
from tests.servers import running_server

SCREENSHOTS = Path(__file__).parent / "screenshots"


@dataclass
class Dashboard:
    url: str
    plane: ControlPlane  # the server's database, opened in the test process
    home: Path
    admin: str
    operator: str
    viewer: str

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token or self.admin}"}, timeout=30)


@contextmanager
def dashboard_server(home: Path, env: dict[str, str] | None = None) -> Iterator[Dashboard]:
    """A control plane process on ``home`` (``SLMOPS_*`` settings from ``env``) and its database in this process."""
    settings = ServerSettings(home=home)
    plane = ControlPlane.open(settings)  # creates the database and the signing key before the server starts
    try:
        admin = create_api_token(plane, "root", "admin", "test").token
        operator = create_api_token(plane, "ops", "operator", "test").token
        viewer = create_api_token(plane, "watcher", "viewer", "test").token
        with ExitStack() as stack:
            with pytest.MonkeyPatch.context() as patch:  # the server process's environment
                for key in [k for k in os.environ if k.startswith("SLMOPS_")]:
                    patch.delenv(key)
                patch.setenv("SLMOPS_HOME", str(home))
                for key, value in (env or {}).items():
                    patch.setenv(key, value)
                url = stack.enter_context(running_server(home.parent / f"{home.name}-server.log"))
            yield Dashboard(url, plane, home, admin, operator, viewer)
    finally:
        plane.close()


def login(client: httpx.Client, token: str, next_path: str = "/ui/") -> httpx.Response:
    """Log ``client`` in through the login form, as a browser would (the form's CSRF value and this Origin)."""
    form = client.get("/ui/login")
    csrf = form_csrf(form.text)
    return client.post(
        "/ui/login",
        data={"token": token, "csrf": csrf, "next": next_path},
        headers={"Origin": str(client.base_url).rstrip("/")},
    )


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field in the page"
    return found.group(1)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
