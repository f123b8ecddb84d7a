"""The Update Framework for slmops releases, through python-tuf (the ``tuf`` package, in the ``server`` and
``agent`` extras): roles and their checks (:mod:`~slmops.tuf.metadata`), key files (:mod:`~slmops.tuf.keys`), the
operator's offline directory (:mod:`~slmops.tuf.offline`), the device's client (:mod:`~slmops.tuf.client`) and the
migration root pin (:mod:`~slmops.tuf.pin`, which needs no ``tuf``). Import the submodule you need: this package
imports nothing, so an agent without TUF configured never loads ``tuf``."""

from __future__ import annotations

__all__: list[str] = []
