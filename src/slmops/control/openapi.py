"""The control plane's OpenAPI document, made to say what the server does.

FastAPI derives the document from the routes and their models. What it cannot see is added here:

- every operation that reads a JSON body answers ``400`` (an :class:`~slmops.control.schemas.ErrorBody`) when the
  body is not JSON;
- request fields that the server checks beyond their wire model (``slmops.core`` cannot import the control
  plane's label types or the key parser) get schemas that accept what the server accepts: enrollment labels,
  the device public key, rollout stages, the rollup's times (RFC 3339, or empty for the default);
- the blob download's ``Range`` says when it is refused and when it is ignored.

Constraints JSON Schema cannot state (a blueprint's YAML must parse into a valid blueprint; stages must grow and
end at 1.0) stay in the descriptions, and such requests are answered ``422``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter

from slmops.control.schemas import Labels
from slmops.core.wire import API_PREFIX

__all__ = ["PUBLIC_KEY_PATTERN", "bad_json_response", "install_openapi", "refine"]

PUBLIC_KEY_PATTERN = r"^ed25519 [A-Za-z0-9+/]{43}=\n?$"  # what registry.signing.parse_public_key accepts (one line)


def bad_json_response() -> dict[str, Any]:
    """The ``400`` response of an operation that reads a JSON body."""
    return {
        "description": "The body is not valid JSON",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


_STAGES_DESCRIPTION = (
    "fractions of each device class in (0, 1], strictly growing, the last 1.0; e.g. [0.01, 0.1, 0.5, 1.0]"
)


def _field(document: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    try:
        field: dict[str, Any] = document["components"]["schemas"][model]["properties"][name]
    except KeyError:
        raise KeyError(
            f"the OpenAPI document has no field {model}.{name} to refine; update slmops.control.openapi"
        ) from None
    return field


def _parameter(document: dict[str, Any], method: str, path: str, name: str) -> dict[str, Any]:
    for parameter in document.get("paths", {}).get(API_PREFIX + path, {}).get(method, {}).get("parameters", []):
        if parameter.get("name") == name:
            found: dict[str, Any] = parameter
            return found
    raise KeyError(
        f"the OpenAPI document has no parameter {name!r} of {method.upper()} {path} to refine; "
        "update slmops.control.openapi"
    )


def _labels(field: dict[str, Any]) -> None:
    field.clear()
    field.update(TypeAdapter(Labels).json_schema(), title="Labels")


def _public_key(field: dict[str, Any]) -> None:
    field["pattern"] = PUBLIC_KEY_PATTERN
    field["description"] = "one line 'ed25519 <base64 of the 32-byte public key>'"


def _stages(field: dict[str, Any]) -> None:
    field.update(minItems=1, description=_STAGES_DESCRIPTION)
    field["items"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}


def _range(parameter: dict[str, Any]) -> None:
    # no pattern: a malformed Range is refused (416) only when it is read, and an If-Range that names another
    # file means it is not read at all
    parameter["description"] = (
        "one range: bytes=START-END, bytes=START- or bytes=-SUFFIX; 416 when malformed or outside the blob; "
        "ignored when If-Range names another version of the file"
    )


def _time(parameter: dict[str, Any]) -> None:
    parameter["schema"] = {
        "anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "maxLength": 0}],
        "description": f"{parameter.get('description', 'RFC 3339')}; empty means the default",
    }


_NARROWED: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("EnrollRequest", "labels"): _labels,
    ("EnrollRequest", "public_key"): _public_key,
    ("RolloutPolicy", "stages"): _stages,
}
_NARROWED_PARAMETERS: dict[tuple[str, str, str], Callable[[dict[str, Any]], None]] = {
    ("get", "/blobs/{digest}", "range"): _range,
    ("get", "/telemetry/rollup", "since"): _time,
    ("get", "/telemetry/rollup", "until"): _time,
}


def refine(document: dict[str, Any]) -> dict[str, Any]:
    """Add what FastAPI leaves out of ``document`` (in place) and return it."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" in operation:
                operation.setdefault("responses", {}).setdefault("400", bad_json_response())
    for (model, name), narrow in _NARROWED.items():
        narrow(_field(document, model, name))
    for (method, path, name), narrow in _NARROWED_PARAMETERS.items():
        narrow(_parameter(document, method, path, name))
    return document


def install_openapi(app: FastAPI) -> None:
    """Serve the refined document at ``/openapi.json`` (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = refine(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
