"""The control-plane client of the agent: the wire protocol of :mod:`slmops.core.wire` over httpx.

Tests pass an ``httpx`` transport (``httpx.MockTransport``, or a real server on loopback). Network failures and 5xx
answers become :class:`~slmops.errors.UnavailableError` (retry later); 401/403/404/409 become the matching errors.
The ``Retry-After`` of a 503 or 429 (a control plane shedding load) is kept until the caller takes it
(:meth:`ControlPlaneClient.take_retry_after`), so a later successful request of the same pass does not hide it.

:class:`Backoff` is how long the agent waits after a failed pass: exponential with full jitter, capped, and never
less than the server's ``Retry-After`` (see its docstring for why the jitter goes on top of it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from slmops import __version__
from slmops.core.feedback import FeedbackAck, FeedbackBatch
from slmops.core.wire import (
    API_PREFIX,
    ClaimRequest,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    StatusAck,
    StatusReport,
    TelemetryAck,
    TelemetryBatch,
)
from slmops.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    SLMOpsError,
    UnavailableError,
)

if TYPE_CHECKING:
    from slmops.tuf.client import HttpxFetcher
    from slmops.tuf.pin import RootPin

__all__ = ["Backoff", "ControlPlaneClient", "DesiredFetch", "parse_retry_after"]

_Answer = TypeVar("_Answer", bound=BaseModel)


@dataclass(frozen=True)
class DesiredFetch:
    changed: bool
    state: DesiredState | None  # None when unchanged (304)
    etag: str | None


MAX_RETRY_AFTER_S = 3600.0  # a Retry-After beyond this is read as this: a broken server cannot park agents for days


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), capped at
    :data:`MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


@dataclass
class Backoff:
    """The wait after the ``n``-th failure in a row: ``retry_after + uniform(0, min(cap_s, base_s * 2**(n - 1)))``.

    Full jitter (the whole window is random, not only a fringe of it) spreads a fleet that failed at the same moment
    (a control plane restart) over the window instead of bringing it back in waves. The ``Retry-After`` of a
    shedding server is a floor, and the jitter goes on top of it rather than ``max(retry_after, jitter)``: a server
    that sends every shed agent the same value would otherwise get them all back in the same second. The cap is
    the caller's (the daemon uses twice the poll interval: a fleet that keeps failing then averages one attempt per
    interval, no more load than when it is well). :meth:`succeeded` resets the count.
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def failed(self, retry_after_s: float | None = None) -> float:
        """Count a failure; the seconds to wait before the next attempt."""
        self.failures += 1
        window = min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 60))
        return (retry_after_s or 0.0) + self.rng.uniform(0.0, max(0.0, window))

    def succeeded(self) -> None:
        self.failures = 0


def _raise_for(response: httpx.Response, what: str) -> None:
    code = response.status_code
    if code < 400:
        return
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("detail") or body.get("message") or "")[:300]
    except ValueError:
        detail = ""
    suffix = f": {detail}" if detail else ""
    if code == 401:
        raise AuthenticationError(f"the control plane refused the credential for {what} (401){suffix}; re-enroll")
    if code == 403:
        raise PermissionDeniedError(f"the control plane forbids {what} (403){suffix}")
    if code == 404:
        raise NotFoundError(f"the control plane has nothing at {what} (404){suffix}")
    if code == 409:
        raise ConflictError(f"the control plane refused {what} as a conflict (409){suffix}")
    if code >= 500 or code in (408, 425, 429):
        raise UnavailableError(f"the control plane failed {what} with HTTP {code}{suffix}; retrying later")
    raise SLMOpsError(f"the control plane rejected {what} with HTTP {code}{suffix}")


def _parse(model: type[_Answer], response: httpx.Response, what: str) -> _Answer:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise UnavailableError(
            f"the control plane answered {what} with a body that is not a valid {model.__name__}: "
            f"{exc.errors()[0]['msg']}; is --server the slmops control plane?"
        ) from None


class ControlPlaneClient:
    def __init__(
        self,
        base_url: str,
        credential: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self.retry_after_s: float | None = None  # the longest Retry-After (503/429) not yet taken
        self._http = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            headers={"User-Agent": f"slmops-agent/{__version__}"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take_retry_after(self) -> float | None:
        """The longest ``Retry-After`` received since the last call (None: none), forgotten once taken."""
        wait, self.retry_after_s = self.retry_after_s, None
        return wait

    def _auth(self) -> dict[str, str]:
        if not self.credential:
            raise AuthenticationError("this device has no credential yet; enroll it with --enroll-token")
        return {"Authorization": f"Bearer {self.credential}"}

    def _unreachable(self, what: str, exc: httpx.TransportError) -> UnavailableError:
        return UnavailableError(
            f"cannot reach the control plane at {self.base_url} for {what}: {type(exc).__name__}; retrying later"
        )

    def _request(self, method: str, path: str, what: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise self._unreachable(what, exc) from None
        if response.status_code in (429, 503):
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                self.retry_after_s = max(wait, self.retry_after_s or 0.0)
        _raise_for(response, what)
        return response

    def _post(self, path: str, what: str, body: BaseModel, answer: type[_Answer], *, auth: bool = True) -> _Answer:
        headers = {**(self._auth() if auth else {}), "Content-Type": "application/json"}
        response = self._request("POST", f"{API_PREFIX}{path}", what, content=body.model_dump_json(), headers=headers)
        return _parse(answer, response, what)

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        return self._post("/enroll", "enrollment", request, EnrollResponse, auth=False)

    def claim(self, request: ClaimRequest) -> EnrollResponse:
        return self._post("/enroll/claim", "the enrollment claim", request, EnrollResponse, auth=False)

    def desired(self, device_id: str, etag: str | None = None) -> DesiredFetch:
        headers = self._auth()
        if etag:
            headers["If-None-Match"] = etag
        response = self._request(
            "GET", f"{API_PREFIX}/devices/{device_id}/desired", "the desired state", headers=headers
        )
        if response.status_code == 304:
            return DesiredFetch(changed=False, state=None, etag=etag)
        state = _parse(DesiredState, response, "the desired state")
        return DesiredFetch(changed=True, state=state, etag=response.headers.get("ETag"))

    def post_status(self, device_id: str, report: StatusReport) -> StatusAck:
        return self._post(f"/devices/{device_id}/status", "the status report", report, StatusAck)

    def post_telemetry(self, device_id: str, batch: TelemetryBatch) -> TelemetryAck:
        return self._post(f"/devices/{device_id}/telemetry", "telemetry", batch, TelemetryAck)

    def post_feedback(self, device_id: str, batch: FeedbackBatch) -> FeedbackAck:
        """Upload redacted feedback samples (only ever sent when the blueprint and the site both opted in)."""
        return self._post(f"/devices/{device_id}/feedback", "feedback", batch, FeedbackAck)

    @contextmanager
    def blob(self, digest: str, offset: int = 0, etag: str | None = None) -> Iterator[httpx.Response]:
        """A streaming response for a blob; from ``offset`` with ``Range`` (+ ``If-Range`` when ``etag``)."""
        headers = self._auth()
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Range"] = etag
        what = f"blob {digest}"
        # With object storage the control plane answers 307 to a short-lived presigned URL; httpx drops the
        # Authorization header on that cross-origin hop and keeps Range/If-Range, so resumes work unchanged.
        url = f"{API_PREFIX}/blobs/{digest}"
        try:
            with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                if response.history and response.status_code in (400, 403):
                    response.read()
                    raise UnavailableError(
                        f"object storage refused the presigned URL for {what} (HTTP {response.status_code}: "
                        "expired, or this device's clock is off); asking the control plane for a new one"
                    )
                if response.status_code >= 400 and response.status_code != 416:
                    response.read()
                    _raise_for(response, what)
                yield response
        except httpx.TransportError as exc:
            try:
                failed: httpx.URL | None = exc.request.url
            except RuntimeError:
                failed = None
            base = self._http.base_url
            if failed is not None and (failed.scheme, failed.host, failed.port) != (base.scheme, base.host, base.port):
                raise UnavailableError(
                    f"the download of {what} from {failed.scheme}://{failed.host}:{failed.port} (object storage the "
                    f"control plane redirected to) failed: {type(exc).__name__}; retrying later from the bytes received"
                ) from None
            raise self._unreachable(what, exc) from None

    # ------------------------------------------------------------------------------------------------- TUF

    @property
    def tuf_url(self) -> str:
        """Where the control plane serves TUF metadata (``N.root.json``, ``timestamp.json``, ...)."""
        return f"{self.base_url}{API_PREFIX}/tuf/"

    def tuf_fetcher(self) -> HttpxFetcher:
        """A fetcher for ``tuf.ngclient`` over this client's connection pool, with the device credential."""
        from slmops.tuf.client import HttpxFetcher

        return HttpxFetcher(self._http, self._auth)

    def tuf_root_pin(self) -> RootPin | None:
        """The control plane's TUF root pin, or None when it serves no TUF metadata (404: TUF is off there)."""
        from slmops.tuf.pin import RootPin

        try:
            response = self._request("GET", f"{API_PREFIX}/tuf/bootstrap", "the TUF root pin", headers=self._auth())
        except NotFoundError:
            return None
        return _parse(RootPin, response, "the TUF root pin")
