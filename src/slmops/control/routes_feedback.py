"""Feedback endpoints: a device posts its redacted samples; operators list them and curate datasets from them.

Reading samples (their prompt and answer text) needs the ``operator`` role, as does curating; listing and showing
dataset versions needs ``viewer``. Dataset files are blobs: ``GET /api/v1/blobs/{digest}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from slmops.control._deps import READ, READ_ONE, Caller, Operator, Plane, Viewer, errors, invalid
from slmops.control.auth import require_device
from slmops.control.feedback import (
    MAX_LIST_LIMIT,
    CurateRequest,
    CurateResult,
    FeedbackPage,
    RatingFilter,
    curate_dataset,
    list_feedback,
    store_feedback,
)
from slmops.core.feedback import FeedbackAck, FeedbackBatch
from slmops.errors import ConfigError
from slmops.registry.datasets import DatasetRegistry, DatasetSummary, DatasetVersion

__all__ = ["router"]

router = APIRouter()

DeviceId = Annotated[str, Path(min_length=1, max_length=64)]
AFTER_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z/[0-9a-f]{64}$"
DatasetName = Annotated[str, Path(min_length=1, max_length=128)]


@router.post(
    "/devices/{device_id}/feedback",
    response_model=FeedbackAck,
    responses=errors(401, 403, 404, 409, 422),
    tags=["agents"],
    summary="Redacted, opt-in feedback samples of a device (idempotent by sample id; refused ones in `rejected`)",
)
def post_feedback(device_id: DeviceId, batch: FeedbackBatch, principal: Caller, plane: Plane) -> FeedbackAck:
    require_device(principal, device_id)
    return store_feedback(plane, device_id, batch)


@router.get(
    "/feedback",
    response_model=FeedbackPage,
    responses=errors(401, 403, 404, 422),
    tags=["feedback"],
    summary="Stored feedback samples, oldest first, without device identifiers",
)
def get_feedback(
    _: Operator,
    plane: Plane,
    version: Annotated[str | None, Query(min_length=1, max_length=200, description="a digest or NAME@REF")] = None,
    device_class: Annotated[str | None, Query(min_length=1, max_length=80)] = None,
    rating: Annotated[RatingFilter | None, Query(description="up, down, or correction (has one)")] = None,
    since: Annotated[
        str | None,
        Query(max_length=64, description="RFC 3339, on arrival (inclusive)", json_schema_extra={"format": "date-time"}),
    ] = None,
    until: Annotated[
        str | None, Query(max_length=64, description="RFC 3339 (exclusive)", json_schema_extra={"format": "date-time"})
    ] = None,
    after: Annotated[str | None, Query(pattern=AFTER_PATTERN, description="the `next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
) -> FeedbackPage:
    try:
        return list_feedback(
            plane,
            version=version,
            device_class=device_class,
            rating=rating,
            since=since,
            until=until,
            after=after,
            limit=limit,
        )
    except ConfigError as exc:
        raise invalid(("query",), exc.message) from None


@router.post(
    "/datasets",
    response_model=CurateResult,
    responses=errors(401, 403, 404, 409, 422),
    tags=["datasets"],
    summary="Curate stored feedback into the next version of a dataset (the same content: the existing version)",
)
def post_dataset(request: CurateRequest, principal: Operator, plane: Plane) -> CurateResult:
    try:
        return curate_dataset(plane, request, principal.label)
    except ConfigError as exc:
        raise invalid(("body",), exc.message) from None


@router.get(
    "/datasets",
    response_model=list[DatasetSummary],
    responses=READ,
    tags=["datasets"],
    summary="Datasets and their latest versions",
)
def get_datasets(_: Viewer, plane: Plane) -> list[DatasetSummary]:
    return DatasetRegistry.of(plane.registry).datasets()


@router.get(
    "/datasets/{name}/versions",
    response_model=list[DatasetVersion],
    responses=READ_ONE,
    tags=["datasets"],
    summary="Every version of a dataset, oldest first",
)
def get_dataset_versions(name: DatasetName, _: Viewer, plane: Plane) -> list[DatasetVersion]:
    return DatasetRegistry.of(plane.registry).versions(name)


@router.get(
    "/datasets/{name}/versions/{selector}",
    response_model=DatasetVersion,
    responses=READ_ONE,
    tags=["datasets"],
    summary="One version of a dataset: v2, latest or sha256:...",
)
def get_dataset_version(
    name: DatasetName, selector: Annotated[str, Path(min_length=1, max_length=80)], _: Viewer, plane: Plane
) -> DatasetVersion:
    return DatasetRegistry.of(plane.registry).resolve(f"{name}@{selector}")
