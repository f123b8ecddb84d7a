"""The base class of every wire schema: frozen, no unknown fields, JSON types exactly as the OpenAPI document says."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Wire"]


class Wire(BaseModel):
    # strict: JSON types exactly as the OpenAPI document says ("1" is no number, 0 no boolean)
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
