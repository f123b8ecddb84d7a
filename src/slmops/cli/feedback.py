"""`slmops feedback`: the redacted feedback devices uploaded, exported or curated into a dataset version."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from slmops.cli._common import console, print_json, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.errors import ConfigError

__all__ = ["app"]

app = typer.Typer(help="Feedback samples devices uploaded (opt-in, redacted on the device).", no_args_is_help=True)

_RATINGS = ("up", "down", "correction")
VersionOpt = typer.Option(None, "--version", help="Only samples about this model version (digest or NAME@REF).")
ClassOpt = typer.Option(None, "--class", help="Only samples from devices of this class.")
SinceOpt = typer.Option(None, "--since", help="Only samples that arrived at or after this RFC 3339 time.")
UntilOpt = typer.Option(None, "--until", help="Only samples that arrived before this RFC 3339 time.")


def _rating(value: str | None) -> str | None:
    if value is not None and value not in _RATINGS:
        raise ConfigError(f"--rating must be one of {', '.join(_RATINGS)}; got {value!r}")
    return value


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("list")
def list_(
    version: str | None = VersionOpt,
    device_class: str | None = ClassOpt,
    rating: str | None = typer.Option(None, "--rating", help="up, down, or correction (has one)."),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many samples."),
    after: str | None = typer.Option(None, "--after", help="Continue after this page marker (printed at the end)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List stored feedback samples, oldest first: version, device class, rating, prompt and answer.

    Example: slmops feedback list --rating down --since 2025-06-01T00:00:00Z
    """
    with client(server_url, token) as api:
        page = api.feedback(
            version=version,
            device_class=device_class,
            rating=_rating(rating),
            since=since,
            until=until,
            after=after,
            limit=limit,
        )

    def human(_: object) -> None:
        if not page.samples:
            console.print("no feedback samples")
            return
        table = Table("received", "version", "class", "rating", "prompt", "answer", "correction")
        for s in page.samples:
            verdict = s.rating or (f"{s.score:.2f}" if s.score is not None else "-")
            table.add_row(
                s.received_at,
                s.version_digest.removeprefix("sha256:")[:12],
                s.device_class,
                verdict,
                _short(s.messages[-1].content),
                _short(s.answer),
                _short(s.correction) if s.correction else "-",
            )
        console.print(table)
        if page.next:
            console.print(f"more: --after {page.next}")

    print_result(page, json_out, human)


@app.command("export")
def export(
    output: Path = typer.Argument(..., help="The JSONL file to write (one stored sample a line)."),
    version: str | None = VersionOpt,
    device_class: str | None = ClassOpt,
    rating: str | None = typer.Option(None, "--rating", help="up, down, or correction (has one)."),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Write the selected samples to a JSONL file, as stored (no device identifiers), for your own tools.

    Example: slmops feedback export feedback.jsonl --class cpu-8g
    """
    from slmops.feedback.curate import to_jsonl
    from slmops.registry.datasets import write_atomic

    with client(server_url, token) as api:
        samples = list(
            api.iter_feedback(
                version=version, device_class=device_class, rating=_rating(rating), since=since, until=until
            )
        )
    write_atomic(output, to_jsonl(samples))
    if json_out:
        print_json({"path": str(output), "samples": len(samples)})
    else:
        console.print(f"wrote {len(samples)} samples to {output}")


@app.command("curate")
def curate(
    name: str = typer.Argument(..., help="The dataset's name; each curation registers its next version."),
    version: list[str] = typer.Option([], "--version", help="Only this model version (repeatable)."),
    device_class: list[str] = typer.Option([], "--class", help="Only this device class (repeatable)."),
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    no_up: bool = typer.Option(False, "--no-up", help="Leave out samples rated up (keep corrections only)."),
    no_corrections: bool = typer.Option(False, "--no-corrections", help="Leave out corrected samples."),
    min_score: float | None = typer.Option(
        None, "--min-score", min=0.0, max=1.0, help="An up sample scored below this does not count as up."
    ),
    min_prompt_chars: int = typer.Option(1, "--min-prompt-chars", min=0),
    max_prompt_chars: int = typer.Option(8000, "--max-prompt-chars", min=1),
    min_completion_chars: int = typer.Option(1, "--min-completion-chars", min=0),
    max_completion_chars: int = typer.Option(8000, "--max-completion-chars", min=1),
    heldout: float = typer.Option(0.1, "--heldout", min=0.0, max=1.0, help="Share of prompts held out."),
    split_salt: str = typer.Option("", "--split-salt", help="Another salt gives another train/held-out split."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Dedupe, filter and split stored feedback into train.jsonl and heldout.jsonl, registered as a dataset
    version with its lineage (model versions, device classes, releases; no device ids).

    Example: slmops feedback curate support --class cpu-8g --heldout 0.2
    """
    from pydantic import ValidationError

    from slmops.feedback.curate import CurationParams

    try:
        params = CurationParams(
            versions=version,
            device_classes=device_class,
            since=since,
            until=until,
            include_up=not no_up,
            include_corrections=not no_corrections,
            min_score=min_score,
            min_prompt_chars=min_prompt_chars,
            max_prompt_chars=max_prompt_chars,
            min_completion_chars=min_completion_chars,
            max_completion_chars=max_completion_chars,
            heldout_fraction=heldout,
            split_salt=split_salt,
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid curation options: {exc.errors()[0]['msg']}") from None
    with client(server_url, token) as api:
        result = api.curate(name, params)

    def human(_: object) -> None:
        manifest = result.dataset.manifest
        state = "registered" if result.created else "unchanged: the same content is"
        console.print(f"{state} {result.dataset.reference} ({result.dataset.digest})")
        table = Table("count", "value")
        for key, value in manifest.counts.items():
            table.add_row(key, str(value))
        console.print(table)
        lineage = manifest.lineage
        models = [lineage.models.get(d, d.removeprefix("sha256:")[:12]) for d in lineage.versions]
        console.print(f"models: {', '.join(models) or '-'}")
        console.print(f"device classes: {', '.join(lineage.device_classes) or '-'}")
        console.print(f"releases: {', '.join(lineage.releases) or '-'}")

    print_result(result, json_out, human)
