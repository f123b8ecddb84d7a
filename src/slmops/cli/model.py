"""`slmops model …`: import, pull, list, show, tag, lineage, verify, export, import-bundle, rm, gc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.tree import Tree

from slmops.cli._common import byte_progress, console, human_bytes, print_json
from slmops.core.lineage import HEADLINE_METRICS, LineageNode, step_summary
from slmops.core.manifest import RuntimeHints, SignedManifest
from slmops.errors import IntegrityError, NotFoundError
from slmops.registry import Registry, export_bundle, import_bundle
from slmops.registry import pull as pull_model
from slmops.registry.pull import KNOWN_MODELS

app = typer.Typer(help="Model versions in the local registry.", no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _open() -> Registry:
    return Registry.open()


def _version_row(envelope: SignedManifest) -> dict[str, Any]:
    m = envelope.manifest
    return {
        "name": m.name,
        "version": m.version,
        "digest": envelope.digest,
        "variant": m.variant,
        "format": m.format,
        "architecture": m.facts.architecture,
        "parameters": m.facts.parameter_count,
        "quantization": m.facts.quantization,
        "size_bytes": m.total_size,
        "created_at": m.created_at,
        "parents": m.lineage.parents,
    }


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _params(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A .gguf file, or a Hugging Face (safetensors) or ONNX model directory."),
    name: str = typer.Option(..., "--name", "-n", help="Model name, e.g. gemma3-270m."),
    chat_template: Path | None = typer.Option(None, help="A Jinja chat template file to record in the manifest."),
    json_out: bool = JsonOpt,
) -> None:
    """Validate a model and register it as the next version of NAME (idempotent).

    Example: slmops model import ./qwen2.5-0.5b-instruct-q4_k_m.gguf --name qwen2.5-0.5b
    """
    registry = _open()
    hints = RuntimeHints(chat_template=chat_template.read_text(encoding="utf-8")) if chat_template else None
    with byte_progress(not json_out) as progress:
        result = registry.import_model(path, name, runtime=hints, progress=progress)
    _report_import(result.envelope, result.created, json_out, result.skipped)


def _report_import(envelope: SignedManifest, created: bool, json_out: bool, skipped: list[str] | None = None) -> None:
    if json_out:
        print_json({"created": created, "skipped": skipped or [], **_version_row(envelope)})
        return
    m = envelope.manifest
    verb = "registered" if created else "already registered as"
    console.print(
        f"{verb} [bold]{m.name}@{m.version}[/] {_short(envelope.digest)}  {m.format}, "
        f"{m.facts.architecture or '?'}, {_params(m.facts.parameter_count)} parameters, "
        f"{m.facts.quantization or '?'}, {human_bytes(m.total_size)}"
    )
    if skipped:
        console.print(f"skipped hidden entries: {', '.join(skipped[:8])}")


@app.command()
def pull(
    model: str = typer.Argument(..., help=f"A known model: {', '.join(sorted(KNOWN_MODELS))}."),
    name: str | None = typer.Option(None, "--name", "-n", help="Register under another name."),
    json_out: bool = JsonOpt,
) -> None:
    """Import a known model from its installed weights package (no network needed).

    Example: slmops model pull gemma3-270m
    """
    registry = _open()
    with byte_progress(not json_out) as progress:
        result = pull_model(registry, model, name=name, progress=progress)
    _report_import(result.envelope, result.created, json_out)


@app.command("list")
def list_(
    name: str | None = typer.Argument(None, help="Show the versions of this model."),
    json_out: bool = JsonOpt,
) -> None:
    """List models, or the versions of one model.

    Example: slmops model list gemma3-270m --json
    """
    registry = _open()
    if name is None:
        summaries = registry.models()
        if json_out:
            print_json([s.__dict__ for s in summaries])
            return
        table = Table("model", "versions", "latest", "aliases", "formats", "size")
        for s in summaries:
            aliases = ", ".join(f"{a}→{v}" for a, v in s.aliases.items())
            table.add_row(s.name, str(s.versions), s.latest, aliases, ", ".join(s.formats), human_bytes(s.total_bytes))
        if not summaries:
            console.print("the registry is empty; try `slmops model pull gemma3-270m`")
            return
        console.print(table)
        return
    versions = registry.versions(name)
    labels = registry.aliases(name)
    if json_out:
        print_json(
            [
                {**_version_row(v), "aliases": [a for a, lbl in labels.items() if lbl == v.manifest.version]}
                for v in versions
            ]
        )
        return
    table = Table("version", "digest", "variant", "format", "arch", "params", "quant", "size", "aliases", "created")
    for v in versions:
        m = v.manifest
        tags = ", ".join(a for a, lbl in labels.items() if lbl == m.version)
        table.add_row(
            m.version,
            _short(v.digest),
            m.variant or "",
            m.format,
            m.facts.architecture or "?",
            _params(m.facts.parameter_count),
            m.facts.quantization or "?",
            human_bytes(m.total_size),
            tags,
            m.created_at,
        )
    console.print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="NAME, NAME@v2, NAME@ALIAS or NAME@sha256:DIGEST."),
    json_out: bool = JsonOpt,
) -> None:
    """Show a version's manifest: facts, files, runtime hints, requirements, lineage, signature.

    Example: slmops model show gemma3-270m@latest
    """
    envelope = _open().resolve(ref)
    if json_out:
        print_json(envelope.model_dump(mode="json", by_alias=True))
        return
    m = envelope.manifest
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows: list[tuple[str, str]] = [
        ("model", f"{m.name}@{m.version}" + (f" ({m.variant})" if m.variant else "")),
        ("digest", envelope.digest),
        ("format", m.format),
        ("architecture", m.facts.architecture or "?"),
        ("parameters", f"{m.facts.parameter_count:,}" if m.facts.parameter_count else "?"),
        ("quantization", m.facts.quantization or "?"),
        ("vocabulary", f"{m.facts.vocab_size:,}" if m.facts.vocab_size else "?"),
        ("context length", f"{m.facts.context_length:,}" if m.facts.context_length else "?"),
        ("chat template", f"{len(m.runtime.chat_template)} characters" if m.runtime.chat_template else "none"),
        ("stop tokens", ", ".join(m.runtime.stop_tokens) or "-"),
        ("memory to load", f"~{human_bytes(m.requirements.memory_load_bytes)} (estimate)"),
    ]
    for run in m.requirements.memory_run:
        rows.append((f"memory at {run.context_tokens} ctx", f"~{human_bytes(run.bytes)} (estimate)"))
    rows += [
        ("metrics", ", ".join(f"{k}={v:g}" for k, v in sorted(m.metrics.items())) or "not evaluated yet"),
        ("parents", ", ".join(_short(p) for p in m.lineage.parents) or "none (imported)"),
        ("recipe", step_summary(m) or "-"),
        ("source", f"{m.source.kind}: {m.source.origin}"),
        ("license", f"{m.license.name}" if m.license else "-"),
        ("created", m.created_at),
        ("signed by", ", ".join(s.key_id for s in envelope.signatures) or "unsigned"),
    ]
    for key, value in rows:
        facts.add_row(key, value)
    console.print(facts)
    files = Table("file", "digest", "size")
    for entry in m.files:
        files.add_row(entry.path, _short(entry.digest), human_bytes(entry.size))
    console.print(files)
    if m.license and m.license.notice:
        console.print(f"[dim]{m.license.notice}[/]")


@app.command()
def tag(
    ref: str = typer.Argument(..., help="The version to point at, e.g. gemma3-270m@v2."),
    alias: str = typer.Argument(..., help="Alias name, e.g. stable."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias instead (REF is then the model name)."),
) -> None:
    """Point an alias (stable, canary, any name) at a version, or remove it.

    Example: slmops model tag gemma3-270m@v1 stable
    """
    registry = _open()
    if delete:
        registry.untag(ref.partition("@")[0], alias)
        console.print(f"removed alias {alias} of {ref.partition('@')[0]}")
        return
    envelope = registry.tag(ref, alias)
    console.print(f"{envelope.manifest.name}@{alias} → {envelope.manifest.version} ({_short(envelope.digest)})")


def _tree_label(node: LineageNode) -> str:
    m = node.manifest
    parts = [f"[bold]{m.name}@{m.version}[/]", _short(node.envelope.digest), m.format]
    if m.variant:
        parts.append(f"variant {m.variant}")
    parts.append(m.facts.quantization or "?")
    parts.append(human_bytes(m.total_size))
    step = step_summary(m)
    if step:
        parts.append(f"[cyan]{step}[/]")
    metrics = [f"{k}={m.metrics[k]:g}" for k in HEADLINE_METRICS if k in m.metrics]
    if metrics:
        parts.append(" ".join(metrics))
    return "  ".join(parts)


@app.command()
def lineage(
    name: str = typer.Argument(..., help="Model name."),
    json_out: bool = JsonOpt,
) -> None:
    """Print the derivation tree: each version with the variants made from it, their recipe step and metrics.

    Example: slmops model lineage gemma3-270m --json
    """
    roots = _open().lineage(name)
    if json_out:
        print_json([r.to_json() for r in roots])
        return
    tree = Tree(f"[bold]{name}[/]")

    def add(branch: Tree, node: LineageNode) -> None:
        sub = branch.add(_tree_label(node))
        for child in node.children:
            add(sub, child)

    for root in roots:
        add(tree, root)
    console.print(tree)


@app.command()
def verify(
    ref: str = typer.Argument(..., help="NAME, NAME@v2, NAME@ALIAS or NAME@sha256:DIGEST."),
    json_out: bool = JsonOpt,
) -> None:
    """Check the manifest signature and re-hash every file; exits non-zero and names each bad file.

    Example: slmops model verify gemma3-270m@v1
    """
    registry = _open()
    with byte_progress(not json_out) as progress:
        report = registry.verify(ref, progress)
    if json_out:
        print_json(
            {
                "ok": report.ok,
                "name": report.name,
                "version": report.version,
                "digest": report.digest,
                "signed_by": report.signed_by,
                "files_checked": report.files_checked,
                "bytes_checked": report.bytes_checked,
                "problems": [p.__dict__ for p in report.problems],
            }
        )
        if not report.ok:
            raise typer.Exit(IntegrityError.exit_code)
        return
    if report.ok:
        console.print(
            f"[green]ok[/] {report.name}@{report.version}: signature by key {report.signed_by} verified, "
            f"{report.files_checked} file(s), {human_bytes(report.bytes_checked)} re-hashed"
        )
        return
    lines = "\n  ".join(f"{p.path}: expected {p.expected}, got {p.actual}" for p in report.problems)
    raise IntegrityError(
        f"{report.name}@{report.version} failed verification:\n  {lines}\n"
        "re-import the model, or restore the blob store from backup"
    )


@app.command("export")
def export(
    refs: list[str] = typer.Argument(..., help="NAME (all versions) or NAME@VERSION, one or more."),
    output: Path = typer.Option(..., "--output", "-o", help="The bundle file to write (a tar)."),
    without_ancestors: bool = typer.Option(False, help="Leave out the versions these were derived from."),
    json_out: bool = JsonOpt,
) -> None:
    """Write versions, their ancestors, blobs, signatures and signer keys to one tar for an air-gapped site.

    Example: slmops model export gemma3-270m@v1 -o gemma.tar
    """
    registry = _open()
    with byte_progress(not json_out) as progress:
        contents = export_bundle(registry, refs, output, with_ancestors=not without_ancestors, progress=progress)
    if json_out:
        print_json(
            {
                "bundle": str(output),
                "versions": [_version_row(e) for e in contents.manifests],
                "blobs": contents.blob_count,
                "bytes": contents.blob_bytes,
            }
        )
        return
    names = ", ".join(f"{e.manifest.name}@{e.manifest.version}" for e in contents.manifests)
    console.print(
        f"wrote {output}: {len(contents.manifests)} version(s) ({names}), {contents.blob_count} blob(s), "
        f"{human_bytes(contents.blob_bytes)}"
    )


@app.command("import-bundle")
def import_bundle_cmd(
    bundle: Path = typer.Argument(..., help="A bundle written by `slmops model export`."),
    trust: bool = typer.Option(False, "--trust", help="Trust the bundle's signing keys (check their ids first)."),
    json_out: bool = JsonOpt,
) -> None:
    """Verify everything in a bundle, then register it (idempotent; nothing is registered if anything fails).

    Example: slmops model import-bundle gemma.tar --trust
    """
    registry = _open()
    with byte_progress(not json_out) as progress:
        contents = import_bundle(registry, bundle, trust_signers=trust, progress=progress)
    if json_out:
        print_json(
            {
                "versions": [_version_row(e) for e in contents.manifests],
                "added": contents.added,
                "keys_trusted": contents.keys_trusted,
                "blobs": contents.blob_count,
                "bytes": contents.blob_bytes,
            }
        )
        return
    for key in contents.keys_trusted:
        console.print(f"now trusting signing key {key}")
    for envelope in contents.manifests:
        m = envelope.manifest
        state = "added" if envelope.digest in contents.added else "already present"
        console.print(f"{state}: {m.name}@{m.version} {_short(envelope.digest)} (verified)")


@app.command("rm")
def rm(
    ref: str = typer.Argument(..., help="NAME@VERSION to unregister."),
    force: bool = typer.Option(False, "--force", help="Remove even if variants derive from it."),
) -> None:
    """Unregister a version (its blobs are freed by `slmops model gc`).

    Example: slmops model rm gemma3-270m@v3
    """
    if "@" not in ref:
        raise NotFoundError(f"give the version to remove, e.g. {ref}@v1 (see `slmops model list {ref}`)")
    envelope = _open().remove(ref, force=force)
    console.print(f"removed {envelope.manifest.name}@{envelope.manifest.version} ({_short(envelope.digest)})")


@app.command()
def gc(
    grace_s: float = typer.Option(3600.0, "--grace-s", help="Keep unreferenced blobs younger than this (seconds)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be deleted."),
    json_out: bool = JsonOpt,
) -> None:
    """Delete blobs that no registered version references.

    Example: slmops model gc --dry-run
    """
    report = _open().gc(grace_s=grace_s, dry_run=dry_run)
    if json_out:
        print_json(report.__dict__)
        return
    verb = "would free" if dry_run else "freed"
    console.print(
        f"{verb} {human_bytes(report.freed_bytes)} in {len(report.removed)} blob(s); "
        f"kept {report.kept_young} young unreferenced blob(s); removed {report.temporary_removed} stale temp file(s)"
    )
