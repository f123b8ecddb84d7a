"""Dashboard sessions: who is logged in, held on the server, named by a signed cookie.

Logging in takes an operator API token (any role; a device credential is refused). The cookie never holds the
token: it holds a random session id and its HMAC-SHA256 under a secret drawn when the process starts, so a forged
or altered cookie is refused before any lookup. The session keeps the token's *hash* (as the database does), the
token's name and role, a CSRF token and an absolute expiry. A request looks at the token's row again when it was
last looked at more than ``auth_cache_ttl_s`` ago (the cache time of device credentials), so revoking the API
token ends its sessions within that time. Logging out forgets the session at once.

Sessions live in this process's memory: a restart logs everyone out, and several replicas behind a load balancer
need sticky sessions for the dashboard (the API is unaffected).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session as DbSession

from slmops.control.auth import DEVICE_PREFIX, hash_secret
from slmops.control.credentials import authenticate
from slmops.control.repository import ControlRepository
from slmops.control.schemas import ROLES, Role
from slmops.errors import AuthenticationError, PermissionDeniedError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["COOKIE_NAME", "LoginError", "SessionStore", "UiSession"]

COOKIE_NAME = "slmops_ui"


class LoginError(Exception):
    """A token that cannot log in, with the message the login page shows."""


@dataclass
class UiSession:
    id: str
    token_hash: str
    name: str
    role: Role
    csrf: str
    expires_at: float  # time.monotonic() seconds
    checked_at: float = field(default=0.0)

    def has_role(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def can_operate(self) -> bool:
        return self.has_role("operator")


class SessionStore:
    """Sessions by id, with the secret that signs their cookies."""

    MAX_SESSIONS = 10_000

    def __init__(self, lifetime_s: float = 12 * 3600.0) -> None:
        self.lifetime_s = lifetime_s
        self._secret = secrets.token_bytes(32)
        self._sessions: dict[str, UiSession] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ cookies

    def _sign(self, value: str) -> str:
        return hmac.new(self._secret, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def cookie_value(self, session: UiSession) -> str:
        return f"{session.id}.{self._sign(session.id)}"

    def _session_id(self, cookie: str | None) -> str | None:
        if not cookie or len(cookie) > 200 or "." not in cookie:
            return None
        session_id, signature = cookie.rsplit(".", 1)
        expected = self._sign(session_id)
        return session_id if hmac.compare_digest(signature.encode("utf-8"), expected.encode("utf-8")) else None

    def sign_value(self, value: str) -> str:
        """An HMAC of ``value`` (the login form's pre-session CSRF token is checked with it)."""
        return self._sign(value)

    # ------------------------------------------------------------------ life cycle

    def login(self, plane: ControlPlane, token: str) -> UiSession:
        """A new session for an operator API token; :class:`LoginError` says why one cannot log in."""
        token = token.strip()
        if not token:
            raise LoginError("paste an API token (slmops_op_...)")
        if token.startswith(DEVICE_PREFIX):
            raise LoginError("that is a device credential; log in with an operator API token (slmops_op_...)")
        try:
            principal = authenticate(plane, token)
        except (AuthenticationError, PermissionDeniedError) as exc:
            raise LoginError(exc.message) from None
        if principal.kind != "operator" or principal.role is None:
            raise LoginError("log in with an operator API token (slmops_op_...)")
        now = time.monotonic()
        session = UiSession(
            id=secrets.token_urlsafe(32),
            token_hash=hash_secret(token),
            name=principal.name,
            role=principal.role,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + self.lifetime_s,
            checked_at=now,
        )
        with self._lock:
            if len(self._sessions) >= self.MAX_SESSIONS:
                self._evict(now)
            self._sessions[session.id] = session
        return session

    def current(self, plane: ControlPlane, cookie: str | None) -> UiSession | None:
        """The live session a cookie names, or None (unsigned, unknown, expired, or its token was revoked)."""
        session_id = self._session_id(cookie)
        if session_id is None:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now >= session.expires_at:
            self.logout(session_id)
            return None
        if now - session.checked_at >= plane.settings.auth_cache_ttl_s:
            if not _token_active(plane, session.token_hash):
                self.logout(session_id)
                return None
            session.checked_at = now
        return session

    def logout(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def logout_cookie(self, cookie: str | None) -> None:
        session_id = self._session_id(cookie)
        if session_id is not None:
            self.logout(session_id)

    def _evict(self, now: float) -> None:
        """Drop expired sessions; if none expired, the oldest tenth (held under the lock)."""
        expired = [k for k, s in self._sessions.items() if s.expires_at <= now]
        if not expired:
            oldest = sorted(self._sessions.values(), key=lambda s: s.expires_at)
            expired = [s.id for s in oldest[: max(1, len(oldest) // 10)]]
        for key in expired:
            del self._sessions[key]


def _token_active(plane: ControlPlane, token_hash: str) -> bool:
    with DbSession(plane.engine) as db:
        row = ControlRepository(db).api_token_by_hash(token_hash)
        return row is not None and not row.revoked
