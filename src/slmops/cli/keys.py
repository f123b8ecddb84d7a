"""`slmops keys …`: this registry's ed25519 signing key and the keys it trusts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.config import Settings
from slmops.errors import NotFoundError
from slmops.registry.signing import KeyRing

app = typer.Typer(help="Signing keys for manifests.", no_args_is_help=True)


def _ring() -> KeyRing:
    return KeyRing(Settings().key_dir)


@app.command()
def init(force: bool = typer.Option(False, "--force", help="Replace an existing signing key.")) -> None:
    """Create this registry's ed25519 signing key; new manifests are signed with it.

    Example: slmops keys init
    """
    key_id = _ring().init(force=force)
    console.print(f"created signing key {key_id} in {Settings().key_dir}; back up signing.key")


@app.command()
def show(json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Print this registry's public key, to give to sites that import its bundles.

    Example: slmops keys show > central.pub
    """
    signer = _ring().signer()
    text = _ring().public_key_text(signer.key_id)
    if json_out:
        print_json({"key_id": signer.key_id, "public_key": text.strip()})
    else:
        typer.echo(text, nl=False)


@app.command()
def trust(keyfile: Path = typer.Argument(..., help="A public key file written by `slmops keys show`.")) -> None:
    """Trust manifests signed by another registry's key.

    Example: slmops keys trust central.pub
    """
    if not keyfile.is_file():
        raise NotFoundError(f"{keyfile} does not exist; write it with `slmops keys show > FILE` on the signer")
    key_id = _ring().trust(keyfile.read_text(encoding="utf-8", errors="replace")[:4096], str(keyfile))
    console.print(f"trusting key {key_id}")


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """List trusted keys; the signing key is marked.

    Example: slmops keys list
    """
    ring = _ring()
    own = ring.signer().key_id if ring.has_signing_key else None
    keys = sorted(ring.trusted())
    if json_out:
        print_json([{"key_id": k, "signing": k == own} for k in keys])
        return
    table = Table("key id", "role")
    for key in keys:
        table.add_row(key, "signing (this registry)" if key == own else "trusted")
    console.print(table)
