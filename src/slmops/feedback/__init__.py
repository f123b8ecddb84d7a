"""Feedback and privacy: on-device redaction of personal data, and differential-privacy noise on the aggregates a
device reports (:mod:`slmops.feedback.dp`). Import the submodules; nothing heavy is imported here."""

from __future__ import annotations

from slmops.feedback.redact import Redacted, Redactor

__all__ = ["Redacted", "Redactor"]
