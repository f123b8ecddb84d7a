"""The control plane: devices, enrollment, blueprints, desired state, blob serving (``slmops server``).

Importing this package loads nothing: :class:`OperatorClient` (httpx), :class:`ServerSettings` and
:func:`create_app` (FastAPI, the ``server`` extra) are loaded on first use, so ``import slmops.control.db`` stays
cheap for the registry and the CLI starts without FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from slmops.control.client import OperatorClient
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

__all__ = ["ControlPlane", "OperatorClient", "ServerSettings", "create_app"]

_LAZY = {
    "ControlPlane": "slmops.control.plane",
    "OperatorClient": "slmops.control.client",
    "ServerSettings": "slmops.control.settings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slmops.control' has no attribute {name!r}")


def create_app(settings: ServerSettings | None = None, plane: ControlPlane | None = None) -> FastAPI:
    from slmops.control.app import create_app as _create_app

    return _create_app(settings, plane)
