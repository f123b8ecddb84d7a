"""`slmops feedback list|export|curate` and `slmops dataset list|show|export` against a real server on loopback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token
from slmops.control.feedback import store_feedback
from slmops.core.feedback import FeedbackBatch, FeedbackMessage, FeedbackSample
from slmops.feedback.curate import read_jsonl
from tests.cli.test_alerts_cli import Control, _json, _out, serve_control
from tests.control.alerting_support import enroll
from tests.control.conftest import register_variants

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: all}
spec:
  selector: {}
  model: {name: tiny, ref: v1}
  variant: {pin: q8_0}
  feedback: {mode: opt_in, max_samples_per_day: 1000}
"""


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Control]:
    for served in serve_control(tmp_path, monkeypatch):
        monkeypatch.setenv("SLMOPS_TOKEN", create_api_token(served.plane, "curator", "operator", "test").token)
        yield served


def _samples(control: Control) -> str:
    variants = register_variants(control.plane.registry, control.tmp_path)
    apply_blueprint(control.plane, BLUEPRINT, "test")
    device_id, _ = enroll(control.plane, 8)
    samples = [
        FeedbackSample(
            id=uuid.uuid4().hex,
            completion_id=uuid.uuid4().hex,
            version_digest=variants.q8.digest,
            time="2025-06-01T11:00:00Z",
            rating="down" if i == 0 else "up",
            correction="The right answer." if i == 1 else None,
            messages=[FeedbackMessage(role="user", content=f"Question {i}: call <EMAIL> please?")],
            answer=f"Answer {i}.",
            redactions={"EMAIL": 1},
        )
        for i in range(12)
    ]
    ack = store_feedback(control.plane, device_id, FeedbackBatch(samples=samples))
    assert len(ack.accepted_ids) == 12, ack.rejected
    return device_id


def test_feedback_list_export_and_curate_then_dataset_show_and_export(
    control: Control, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = _samples(control)
    out = control.tmp_path / "exported.jsonl"

    shown = _out(capsys, ["feedback", "list", "--limit", "5"])
    listed = _json(capsys, ["feedback", "list", "--rating", "down"])
    exported = _json(capsys, ["feedback", "export", str(out)])
    curated = _json(capsys, ["feedback", "curate", "support", "--heldout", "0.25"])
    again = _out(capsys, ["feedback", "curate", "support", "--heldout", "0.25"])
    datasets = _json(capsys, ["dataset", "list"])
    versions = _out(capsys, ["dataset", "list", "support"])
    show = _out(capsys, ["dataset", "show", "support@v1"])
    _json(capsys, ["dataset", "export", "support@latest", str(control.tmp_path / "ds")])
    bad = _out(capsys, ["feedback", "list", "--rating", "meh"], code=2)
    missing = _out(capsys, ["dataset", "show", "support@v9"], code=3)

    assert ": call <EMAIL> please?" in shown and "more: --after" in shown
    assert len(listed["samples"]) == 1 and listed["samples"][0]["rating"] == "down"
    assert exported == {"path": str(out), "samples": 12}
    assert len(out.read_text().splitlines()) == 12 and device_id not in out.read_text()
    manifest = curated["dataset"]["manifest"]
    assert curated["created"] is True and manifest["counts"]["train"] + manifest["counts"]["heldout"] == 11
    assert manifest["counts"]["excluded_down"] == 1
    assert "unchanged: the same content is support@v1" in again
    assert [(d["name"], d["latest"]) for d in datasets] == [("support", "v1")]
    assert "support@v1" in versions and "tiny@v2" in show and "train.jsonl" in show
    train = read_jsonl((control.tmp_path / "ds" / "train.jsonl").read_bytes())
    heldout = read_jsonl((control.tmp_path / "ds" / "heldout.jsonl").read_bytes())
    assert len(train) + len(heldout) == 11 and any(r.completion == "The right answer." for r in train + heldout)
    on_disk = json.loads((control.tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk["digest"] == curated["dataset"]["digest"]
    assert "--rating must be one of" in bad and "no version 'v9'" in missing


def test_feedback_list_needs_an_operator_token(
    control: Control, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMOPS_TOKEN", create_api_token(control.plane, "peek", "viewer", "test").token)

    refused = _out(capsys, ["feedback", "list"], code=9)

    assert "needs 'operator'" in refused
    assert "no datasets" in _out(capsys, ["dataset", "list"])
