"""The dashboard's parts without a server: sessions, the login redirect target, and the SVG chart."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.control.credentials import create_api_token, revoke_api_token
from slmops.control.plane import ControlPlane
from slmops.registry.db import make_engine, migrate
from slmops.ui.auth import safe_next
from slmops.ui.charts import ParetoPoint, pareto_svg, statuses
from slmops.ui.session import LoginError, SessionStore
from tests.control.conftest import Clock, make_plane

MiB = 1 << 20


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    yield make_plane(engine, tmp_path / "home", Clock())
    engine.dispose()


def test_a_session_is_named_by_a_signed_id_and_never_by_the_token(plane: ControlPlane) -> None:
    token = create_api_token(plane, "ops", "operator", "test").token
    store = SessionStore()

    session = store.login(plane, token)
    cookie = store.cookie_value(session)

    assert token not in cookie and session.token_hash not in cookie
    assert store.current(plane, cookie) is session
    assert session.role == "operator" and session.can_operate
    session_id, signature = cookie.rsplit(".", 1)
    assert store.current(plane, f"{session_id}.{signature[::-1]}") is None
    assert SessionStore().current(plane, cookie) is None  # another process's secret: not its cookie
    assert store.current(plane, None) is None and store.current(plane, "") is None


def test_a_session_ends_on_logout_expiry_or_revocation(plane: ControlPlane) -> None:
    token = create_api_token(plane, "ops", "operator", "test").token
    viewer = create_api_token(plane, "v", "viewer", "test").token
    store = SessionStore()
    first, second = store.login(plane, token), store.login(plane, viewer)
    expired = SessionStore(lifetime_s=0)
    gone = expired.login(plane, token)

    store.logout(first.id)
    revoke_api_token(plane, "v")  # auth_cache_ttl_s is 5 s: the next check after that sees it
    second.checked_at -= plane.settings.auth_cache_ttl_s

    assert store.current(plane, store.cookie_value(first)) is None
    assert store.current(plane, store.cookie_value(second)) is None
    assert expired.current(plane, expired.cookie_value(gone)) is None


@pytest.mark.parametrize(
    ("token", "message"),
    [("", "paste an API token"), ("slmops_dev_x", "device credential"), ("slmops_op_x", "unknown or revoked")],
)
def test_a_token_that_cannot_log_in_says_why(plane: ControlPlane, token: str, message: str) -> None:
    with pytest.raises(LoginError, match=message):
        SessionStore().login(plane, token)


@given(st.text(max_size=80))
def test_the_page_after_login_is_always_on_the_dashboard(value: str) -> None:
    target = safe_next(value)
    assert target == "/ui/" or target == value
    assert target.startswith("/ui") and not target.startswith("//") and "\\" not in target and ".." not in target


@pytest.mark.parametrize("value", ["/ui/releases/rel-1", "/ui/devices?state=pending", "/ui"])
def test_a_dashboard_path_is_kept_after_login(value: str) -> None:
    assert safe_next(value) == value


def test_the_pareto_frontier_is_drawn_over_the_variants_that_fit() -> None:
    points = [
        ParetoPoint("base", 600 * MiB, 10.0, fits=False),
        ParetoPoint("q8_0", 300 * MiB, 10.2),
        ParetoPoint("q4_0", 160 * MiB, 11.0, running=4),
        ParetoPoint("bad", 400 * MiB, 12.0),
    ]
    assert statuses(points) == ["too big", "frontier", "frontier", "dominated"]

    svg = str(pareto_svg(points, "x86_64-8gb: size vs perplexity"))
    root = ElementTree.fromstring(svg)  # well-formed XML
    ns = {"s": "http://www.w3.org/2000/svg"}
    marks = {c.get("data-status") for c in root.iterfind(".//s:circle[@class='point']", ns)}
    assert marks == {"too big", "frontier", "dominated"}
    assert len(root.findall(".//s:circle[@class='running']", ns)) == 1
    assert len(root.findall(".//s:polyline", ns)) == 1


def test_chart_labels_are_escaped() -> None:
    svg = str(pareto_svg([ParetoPoint("<script>alert(1)</script>", MiB, 9.0)], "<b>title</b>"))
    assert "<script>" not in svg and "<b>" not in svg
    assert "&lt;script&gt;" in svg
    ElementTree.fromstring(svg)


def test_an_empty_chart_says_so() -> None:
    svg = str(pareto_svg([], "none"))
    assert re.search(r">no evaluated variant<", svg)
    ElementTree.fromstring(svg)
