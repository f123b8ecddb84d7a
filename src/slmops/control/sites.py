"""Site adaptations on the control plane: store what a site set, and show what its devices apply.

A site is the set of devices with the label ``site=<name>``. ``PUT /api/v1/sites/{site}`` replaces what the site set
(an empty adaptation removes it); every device of that site then gets a new desired-state generation (and only
those: the value enters the state through :func:`slmops.core.sites.resolve`, per device, against the limits of the
device's winning blueprint). ``GET`` shows, per device class, what is in effect and what was dropped and why.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow
from slmops.control.site_tables import SiteAdaptationRow
from slmops.core.adaptation import LocalAdaptation, SiteAdaptation
from slmops.core.sites import SITE_LABEL
from slmops.errors import ConfigError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "SITE_PATTERN",
    "SiteEffect",
    "SitePublic",
    "get_site",
    "load_site_adaptations",
    "put_site",
    "validate_site_name",
]

log = logging.getLogger(__name__)
SITE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$"
_SITE_RE = re.compile(SITE_PATTERN)


class SiteEffect(BaseModel):
    """What the devices of one class (and one winning blueprint) at a site apply."""

    model_config = ConfigDict(extra="forbid")

    device_class: str
    devices: list[str]
    blueprint: str | None  # "name@revision" that wins on them
    model: str | None  # "name@vN (variant)" they should run, the site's adapter included
    local: LocalAdaptation  # in effect, with the reasons for what was dropped


class SitePublic(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str
    adaptation: SiteAdaptation = Field(default_factory=SiteAdaptation)  # what the site set
    updated_at: str | None = None
    updated_by: str | None = None
    effects: list[SiteEffect] = Field(default_factory=list)


def validate_site_name(site: str) -> str:
    if not _SITE_RE.match(site):
        raise ConfigError(
            f"site name {site!r} is not a valid label value: expected 1-128 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit (the value of the devices' 'site' label)"
        )
    return site


def load_site_adaptations(session: Session) -> dict[str, SiteAdaptation]:
    """Every stored site adaptation, by site name (for desired state)."""
    rows = session.scalars(select(SiteAdaptationRow).order_by(SiteAdaptationRow.site)).all()
    return {row.site: SiteAdaptation.model_validate(row.adaptation) for row in rows}


def put_site(plane: ControlPlane, site: str, adaptation: SiteAdaptation, updated_by: str) -> SitePublic:
    """Replace what ``site`` set; an empty adaptation removes it. Returns the site as :func:`get_site` shows it."""
    validate_site_name(site)
    empty = adaptation == SiteAdaptation()
    with Session(plane.engine) as session:
        row = session.get(SiteAdaptationRow, site)
        if empty:
            if row is not None:
                session.delete(row)
        else:
            value = adaptation.model_dump(mode="json", exclude_none=True)
            if row is None:
                session.add(
                    SiteAdaptationRow(site=site, adaptation=value, updated_at=plane.now_iso(), updated_by=updated_by)
                )
            else:
                row.adaptation, row.updated_at, row.updated_by = value, plane.now_iso(), updated_by
        session.commit()
    plane.world_cache.invalidate()
    log.info("site %s adaptation %s by %s", site, "cleared" if empty else "set", updated_by)
    return get_site(plane, site)


def get_site(plane: ControlPlane, site: str) -> SitePublic:
    """What ``site`` set, and per device class what its approved devices apply (and what was dropped, and why)."""
    from slmops.control.desired_state import desired_state_for

    validate_site_name(site)
    with Session(plane.engine) as session:
        row = session.get(SiteAdaptationRow, site)
        devices = [
            (d.id, d.device_class)
            for d in session.scalars(select(DeviceRow).where(DeviceRow.state == "approved").order_by(DeviceRow.id))
            if d.labels.get(SITE_LABEL) == site
        ]
    groups: dict[tuple[str, str | None, str | None, str], SiteEffect] = {}
    for device_id, device_class in devices:
        state = desired_state_for(plane, device_id)
        model = state.model
        label = None
        if model is not None:
            m = model.envelope.manifest
            label = f"{m.name}@{m.version}" + (f" ({m.variant})" if m.variant else "")
        key = (device_class, state.blueprint, label, json.dumps(state.local.model_dump(mode="json"), sort_keys=True))
        if key in groups:
            groups[key].devices.append(device_id)
        else:
            groups[key] = SiteEffect(
                device_class=device_class,
                devices=[device_id],
                blueprint=state.blueprint,
                model=label,
                local=state.local,
            )
    return SitePublic(
        site=site,
        adaptation=SiteAdaptation.model_validate(row.adaptation) if row is not None else SiteAdaptation(),
        updated_at=row.updated_at if row is not None else None,
        updated_by=row.updated_by if row is not None else None,
        effects=sorted(groups.values(), key=lambda e: (e.device_class, e.blueprint or "", e.model or "")),
    )
