"""Who is calling: operators with API tokens and roles, or devices with their credential.

Secrets are random and long (``secrets.token_urlsafe(32)``) and stored only as their sha256, so a stolen
database reveals no usable token. The prefix says what a secret is: ``slmops_op_`` (operator API token),
``slmops_dev_`` (device credential), ``slmops_enr_`` (enrollment token).

Roles are ordered: a ``viewer`` reads; an ``operator`` also approves and labels devices, applies and plans
blueprints and creates enrollment tokens; an ``admin`` also manages API tokens. A device credential can read only
its own desired state, post only its own status and download only the blobs of the model version its desired
state names. A device calling with another device's id gets ``403`` whether or not that id exists, so device ids
cannot be probed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from slmops.control.schemas import ROLES, Role
from slmops.errors import PermissionDeniedError

__all__ = [
    "DEVICE_PREFIX",
    "ENROLL_PREFIX",
    "OPERATOR_PREFIX",
    "Principal",
    "hash_secret",
    "new_secret",
    "require_device",
    "require_role",
]

OPERATOR_PREFIX = "slmops_op_"
DEVICE_PREFIX = "slmops_dev_"
ENROLL_PREFIX = "slmops_enr_"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    kind: Literal["operator", "device"]
    name: str  # the token name, or the device id
    role: Role | None = None  # operators only

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    def has_role(self, role: Role) -> bool:
        return self.kind == "operator" and self.role is not None and ROLES.index(self.role) >= ROLES.index(role)


def require_role(principal: Principal, role: Role) -> None:
    if principal.kind != "operator":
        raise PermissionDeniedError(
            f"this call needs an operator token with role '{role}'; a device credential was sent"
        )
    if not principal.has_role(role):
        raise PermissionDeniedError(
            f"token '{principal.name}' has role '{principal.role}', this call needs '{role}' or higher; "
            "ask an admin for a token with `slmops token create --role ROLE`"
        )


def require_device(principal: Principal, device_id: str) -> None:
    """A device may act only for itself."""
    if principal.kind != "device":
        raise PermissionDeniedError("this call needs a device credential")
    if principal.name != device_id:
        raise PermissionDeniedError("a device credential can act only for its own device")
