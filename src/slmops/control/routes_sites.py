"""Operator endpoints of site adaptations: ``GET`` (viewers) and ``PUT`` (operators) ``/sites/{site}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from slmops.control import sites
from slmops.control._deps import READ_ONE, WRITE_ONE, Operator, Plane, Viewer
from slmops.control.sites import SITE_PATTERN, SitePublic
from slmops.core.adaptation import SiteAdaptation

__all__ = ["router"]

router = APIRouter()
Site = Annotated[str, Path(min_length=1, max_length=128, pattern=SITE_PATTERN)]


@router.get("/sites/{site}", response_model=SitePublic, responses=READ_ONE, tags=["sites"])
def show_site(site: Site, _: Viewer, plane: Plane) -> SitePublic:
    """What a site set, and per device class what its devices apply (and what was dropped, and why)."""
    return sites.get_site(plane, site)


@router.put("/sites/{site}", response_model=SitePublic, responses=WRITE_ONE, tags=["sites"])
def set_site(site: Site, adaptation: SiteAdaptation, caller: Operator, plane: Plane) -> SitePublic:
    """Replace what a site set (an empty body removes it); only that site's devices get a new desired state."""
    return sites.put_site(plane, site, adaptation, caller.label)
