"""`slmops dataset`: the dataset versions curated from feedback, listed, shown and exported."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from slmops.cli._common import console, human_bytes, print_json, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.registry.datasets import DatasetSummary, DatasetVersion

__all__ = ["app"]

app = typer.Typer(help="Dataset versions curated from feedback (`slmops feedback curate`).", no_args_is_help=True)


def _print_summaries(found: list[DatasetSummary]) -> None:
    if not found:
        console.print("no datasets (make one with `slmops feedback curate NAME`)")
        return
    table = Table("name", "versions", "latest", "digest", "created")
    for d in found:
        table.add_row(d.name, str(d.versions), d.latest, d.latest_digest.removeprefix("sha256:")[:12], d.created_at)
    console.print(table)


def _print_versions(found: list[DatasetVersion]) -> None:
    table = Table("version", "digest", "train", "heldout", "created", "by")
    for v in found:
        counts = v.manifest.counts
        table.add_row(
            v.reference,
            v.digest.removeprefix("sha256:")[:12],
            str(counts.get("train", "-")),
            str(counts.get("heldout", "-")),
            v.created_at,
            v.created_by,
        )
    console.print(table)


@app.command("list")
def list_(
    name: str | None = typer.Argument(None, help="A dataset: list its versions."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List datasets, or the versions of one.

    Example: slmops dataset list support
    """
    with client(server_url, token) as api:
        if name is None:
            print_result(api.datasets(), json_out, _print_summaries)
        else:
            print_result(api.dataset_versions(name), json_out, _print_versions)


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME, NAME@v2, NAME@latest or NAME@sha256:..."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a dataset version: its files, counts, curation parameters and lineage.

    Example: slmops dataset show support@v2
    """
    with client(server_url, token) as api:
        version = api.dataset(ref)

    def human(v: DatasetVersion) -> None:
        m = v.manifest
        console.print(f"{v.reference}  {v.digest}  created {v.created_at} by {v.created_by}  ({m.format})")
        files = Table("file", "records", "size", "digest")
        for f in m.files:
            files.add_row(f.path, str(f.records), human_bytes(f.size), f.digest)
        console.print(files)
        console.print("counts: " + ", ".join(f"{k}={n}" for k, n in m.counts.items()))
        console.print("curation: " + ", ".join(f"{k}={val}" for k, val in sorted(m.curation.items())))
        models = [m.lineage.models.get(d, d) for d in m.lineage.versions]
        console.print(f"models: {', '.join(models) or '-'}")
        console.print(f"device classes: {', '.join(m.lineage.device_classes) or '-'}")
        console.print(f"releases: {', '.join(m.lineage.releases) or '-'}")

    print_result(version, json_out, human)


@app.command("export")
def export(
    ref: str = typer.Argument(..., help="NAME, NAME@v2, NAME@latest or NAME@sha256:..."),
    directory: Path = typer.Argument(..., help="Where to write train.jsonl, heldout.jsonl and manifest.json."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Download a dataset version's files, checked against their digests, with its manifest.

    Example: slmops dataset export support@latest ./data/support
    """
    with client(server_url, token) as api:
        written = api.export_dataset(ref, directory)
    if json_out:
        print_json({"files": [str(p) for p in written]})
    else:
        for path in written:
            console.print(f"wrote {path}")
