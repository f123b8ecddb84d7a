"""``OperatorClient``: the operator side of the control-plane API over httpx, used by the CLI.

Errors come back as the matching :class:`~slmops.errors.SLMOpsError` with the server's public message; a server
that cannot be reached becomes :class:`~slmops.errors.UnavailableError`. Tests may pass ``transport`` (e.g. an
``httpx.MockTransport``) instead of talking to a real server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from slmops import errors as _errors
from slmops.control.schemas import (
    ApiTokenCreated,
    ApiTokenPublic,
    ApplyResult,
    BlueprintPublic,
    DeviceEventPublic,
    DevicePublic,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
    PlanPublic,
    ReleaseEventPublic,
    ReleasePublic,
    ReleaseStart,
    Role,
)
from slmops.core.wire import API_PREFIX, DesiredState
from slmops.errors import ConfigError, SLMOpsError, UnavailableError

if TYPE_CHECKING:
    from slmops.control.feedback import CurateResult, FeedbackPage
    from slmops.control.sites import SitePublic
    from slmops.core.adaptation import SiteAdaptation
    from slmops.feedback.curate import CurationParams, FeedbackRecord
    from slmops.registry.datasets import DatasetSummary, DatasetVersion

__all__ = ["DEFAULT_SERVER_URL", "OperatorClient", "error_for"]

DEFAULT_SERVER_URL = "http://127.0.0.1:8080"
T = TypeVar("T", bound=BaseModel)


def _error_classes() -> dict[str, type[SLMOpsError]]:
    found: dict[str, type[SLMOpsError]] = {}
    for name in _errors.__all__:
        cls = getattr(_errors, name)
        if isinstance(cls, type) and issubclass(cls, SLMOpsError) and cls is not _errors.MissingExtraError:
            found.setdefault(cls.code, cls)
    return found


_BY_CODE = _error_classes()
_BY_STATUS: dict[int, type[SLMOpsError]] = {
    401: _errors.AuthenticationError,
    403: _errors.PermissionDeniedError,
    404: _errors.NotFoundError,
    409: _errors.ConflictError,
    422: _errors.ConfigError,
    503: UnavailableError,
}


def error_for(response: httpx.Response) -> SLMOpsError:
    """The SLMOpsError for an error response, carrying the server's public message."""
    code, message = "", response.text[:500]
    try:
        body = response.json()
        if isinstance(body, dict):
            code, message = str(body.get("code", "")), str(body.get("message", message))
    except ValueError:
        pass
    if code == "invalid_request":
        return ConfigError(f"the control plane refused the request: {message}")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code, SLMOpsError)
    if response.status_code >= 500 and cls not in (UnavailableError,):
        return SLMOpsError(f"the control plane failed (HTTP {response.status_code}): {message}")
    return cls(message)


class OperatorClient:
    """The control-plane API for operators. ``base_url`` is the server (``http://host:port``)."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SLMOPS_SERVER_URL") or DEFAULT_SERVER_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("SLMOPS_TOKEN")
        self.transport = transport
        self.timeout_s = timeout_s
        self._client: httpx.Client | None = None

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.Client(
                base_url=self.base_url + API_PREFIX, headers=headers, transport=self.transport, timeout=self.timeout_s
            )
        return self._client

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http().request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UnavailableError(
                f"cannot reach the control plane at {self.base_url} ({type(exc).__name__}: {exc}); "
                "is `slmops server` running? (set --server or SLMOPS_SERVER_URL)"
            ) from None
        if response.status_code == 401 and not self.token:
            raise _errors.AuthenticationError(
                "the control plane needs a token: pass --token or set SLMOPS_TOKEN "
                "(create one with `slmops token create --role operator --name NAME`)"
            )
        if response.status_code >= 400:
            raise error_for(response)
        return response

    def _one(self, model: type[T], method: str, path: str, **kwargs: Any) -> T:
        return model.model_validate(self._request(method, path, **kwargs).json())

    def _many(self, model: type[T], path: str, **kwargs: Any) -> list[T]:
        return TypeAdapter(list[model]).validate_python(self._request("GET", path, **kwargs).json())  # type: ignore[valid-type]

    # ------------------------------------------------------------------ devices

    def health(self) -> dict[str, Any]:
        value: dict[str, Any] = self._request("GET", "/health").json()
        return value

    def devices(self, state: str | None = None) -> list[DevicePublic]:
        return self._many(DevicePublic, "/devices", params={"state": state} if state else None)

    def device(self, device_id: str) -> DevicePublic:
        return self._one(DevicePublic, "GET", f"/devices/{device_id}")

    def device_events(self, device_id: str, limit: int = 20) -> list[DeviceEventPublic]:
        return self._many(DeviceEventPublic, f"/devices/{device_id}/events", params={"limit": limit})

    def desired(self, device_id: str) -> DesiredState:
        return self._one(DesiredState, "GET", f"/devices/{device_id}/desired")

    def approve(self, device_id: str) -> DevicePublic:
        return self._one(DevicePublic, "POST", f"/devices/{device_id}/approve")

    def revoke(self, device_id: str) -> DevicePublic:
        return self._one(DevicePublic, "POST", f"/devices/{device_id}/revoke")

    def decommission(self, device_id: str) -> DevicePublic:
        return self._one(DevicePublic, "POST", f"/devices/{device_id}/decommission")

    def label(self, device_id: str, set_labels: dict[str, str], remove: list[str]) -> DevicePublic:
        body = {"set": set_labels, "remove": remove}
        return self._one(DevicePublic, "POST", f"/devices/{device_id}/labels", json=body)

    # ------------------------------------------------------------------ tokens

    def create_enrollment_token(
        self,
        *,
        max_uses: int = 1,
        expires_in_s: float | None = None,
        auto_approve: bool = False,
        labels: dict[str, str] | None = None,
    ) -> EnrollmentTokenCreated:
        body = {
            "max_uses": max_uses,
            "expires_in_s": expires_in_s,
            "auto_approve": auto_approve,
            "labels": labels or {},
        }
        return self._one(EnrollmentTokenCreated, "POST", "/enrollment-tokens", json=body)

    def enrollment_tokens(self) -> list[EnrollmentTokenPublic]:
        return self._many(EnrollmentTokenPublic, "/enrollment-tokens")

    def create_token(self, name: str, role: Role) -> ApiTokenCreated:
        return self._one(ApiTokenCreated, "POST", "/tokens", json={"name": name, "role": role})

    def tokens(self) -> list[ApiTokenPublic]:
        return self._many(ApiTokenPublic, "/tokens")

    # ------------------------------------------------------------------ blueprints

    def apply(self, source: str) -> ApplyResult:
        return self._one(ApplyResult, "POST", "/blueprints", json={"source": source})

    def plan(self, source: str) -> PlanPublic:
        return self._one(PlanPublic, "POST", "/blueprints/plan", json={"source": source})

    def blueprints(self) -> list[BlueprintPublic]:
        return self._many(BlueprintPublic, "/blueprints")

    def blueprint(self, name: str, revision: int | None = None) -> BlueprintPublic:
        params = {"revision": revision} if revision is not None else None
        return self._one(BlueprintPublic, "GET", f"/blueprints/{name}", params=params)

    # ------------------------------------------------------------------ rollouts

    def start_rollout(self, request: ReleaseStart) -> ReleasePublic:
        return self._one(ReleasePublic, "POST", "/rollouts", json=request.model_dump(mode="json", exclude_none=True))

    def rollouts(self, state: str | None = None) -> list[ReleasePublic]:
        return self._many(ReleasePublic, "/rollouts", params={"state": state} if state else None)

    def rollout(self, release_id: str) -> ReleasePublic:
        return self._one(ReleasePublic, "GET", f"/rollouts/{release_id}")

    def rollout_events(self, release_id: str, after: int = 0, limit: int = 500) -> list[ReleaseEventPublic]:
        return self._many(ReleaseEventPublic, f"/rollouts/{release_id}/events", params={"after": after, "limit": limit})

    def pause_rollout(self, release_id: str) -> ReleasePublic:
        return self._one(ReleasePublic, "POST", f"/rollouts/{release_id}/pause")

    def resume_rollout(self, release_id: str) -> ReleasePublic:
        return self._one(ReleasePublic, "POST", f"/rollouts/{release_id}/resume")

    def abort_rollout(self, release_id: str) -> ReleasePublic:
        return self._one(ReleasePublic, "POST", f"/rollouts/{release_id}/abort")

    def promote_rollout(self, release_id: str) -> ReleasePublic:
        return self._one(ReleasePublic, "POST", f"/rollouts/{release_id}/promote")

    # ------------------------------------------------------------------ feedback and datasets

    def feedback(
        self,
        *,
        version: str | None = None,
        device_class: str | None = None,
        rating: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> FeedbackPage:
        """One page of stored feedback samples (oldest first); pass the page's ``next`` as ``after``."""
        from slmops.control.feedback import FeedbackPage

        given = {"version": version, "device_class": device_class, "rating": rating, "since": since}
        given |= {"until": until, "after": after}
        params: dict[str, Any] = {k: v for k, v in given.items() if v is not None} | {"limit": limit}
        return self._one(FeedbackPage, "GET", "/feedback", params=params)

    def iter_feedback(
        self,
        *,
        version: str | None = None,
        device_class: str | None = None,
        rating: str | None = None,
        since: str | None = None,
        until: str | None = None,
        page_size: int = 500,
    ) -> Iterator[FeedbackRecord]:
        """Every stored sample the filters (those of :meth:`feedback`) select, page by page."""
        after: str | None = None
        while True:
            page = self.feedback(
                version=version,
                device_class=device_class,
                rating=rating,
                since=since,
                until=until,
                after=after,
                limit=page_size,
            )
            yield from page.samples
            if page.next is None:
                return
            after = page.next

    def curate(self, name: str, params: CurationParams) -> CurateResult:
        """Curate stored feedback into the next version of dataset ``name`` (or the existing same one)."""
        from slmops.control.feedback import CurateRequest, CurateResult

        body = CurateRequest(name=name, params=params).model_dump(mode="json")
        return self._one(CurateResult, "POST", "/datasets", json=body)

    def datasets(self) -> list[DatasetSummary]:
        from slmops.registry.datasets import DatasetSummary

        return self._many(DatasetSummary, "/datasets")

    def dataset_versions(self, name: str) -> list[DatasetVersion]:
        from slmops.registry.datasets import DatasetVersion

        return self._many(DatasetVersion, f"/datasets/{name}/versions")

    def dataset(self, ref: str) -> DatasetVersion:
        """A dataset version by NAME, NAME@v2, NAME@latest or NAME@sha256:..."""
        from slmops.registry.datasets import DatasetVersion

        name, _, selector = ref.partition("@")
        return self._one(DatasetVersion, "GET", f"/datasets/{name}/versions/{selector or 'latest'}")

    def export_dataset(self, ref: str, directory: Path) -> list[Path]:
        """Download a dataset version's files (checked against their digests) and its ``manifest.json``."""
        import hashlib

        from slmops.core.manifest import canonical_json
        from slmops.errors import IntegrityError
        from slmops.registry.datasets import write_atomic

        version = self.dataset(ref)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in version.manifest.files:
            data = self._request("GET", f"/blobs/{entry.digest}").content
            if "sha256:" + hashlib.sha256(data).hexdigest() != entry.digest:
                raise IntegrityError(
                    f"{entry.path} of {version.reference} arrived with other bytes than its digest {entry.digest}; "
                    "nothing was written for it: retry the export"
                )
            written.append(write_atomic(directory / entry.path, data))
        written.append(write_atomic(directory / "manifest.json", canonical_json(version.model_dump(mode="json"))))
        return written

    # ------------------------------------------------------------------------------------------------- sites

    def site(self, name: str) -> SitePublic:
        """``GET /api/v1/sites/{site}``: what a site set, and what is in effect per device class."""
        from slmops.control.sites import SitePublic, validate_site_name

        return self._one(SitePublic, "GET", f"/sites/{validate_site_name(name)}")

    def set_site(self, name: str, adaptation: SiteAdaptation) -> SitePublic:
        """``PUT /api/v1/sites/{site}`` (an empty adaptation removes what the site set)."""
        from slmops.control.sites import SitePublic, validate_site_name

        body = adaptation.model_dump(mode="json", exclude_none=True)
        return self._one(SitePublic, "PUT", f"/sites/{validate_site_name(name)}", json=body)
