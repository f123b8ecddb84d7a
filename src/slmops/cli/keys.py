"""`slmops keys …`: this registry's ed25519 signing key and the keys it trusts; `slmops keys tuf …`: the offline
TUF roles (root and targets keys, signed locally or in CI, then uploaded to the control plane)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.config import Settings
from slmops.errors import NotFoundError
from slmops.registry.signing import KeyRing

if TYPE_CHECKING:
    from slmops.control.client import OperatorClient
    from slmops.tuf.offline import OfflineRepo

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


# --------------------------------------------------------------------------------------------------- TUF

tuf_app = typer.Typer(
    help="TUF update metadata: root and targets keys kept offline (here or in CI), uploaded to the control plane.",
    no_args_is_help=True,
)
app.add_typer(tuf_app, name="tuf")

TufDir = typer.Argument(..., help="The offline TUF directory (keys/ and metadata/); keep it out of the server.")


def _now() -> datetime:
    return datetime.now(UTC)


def _offline(path: Path) -> OfflineRepo:
    from slmops.tuf.offline import OfflineRepo

    return OfflineRepo(path)


@tuf_app.command("online-keys")
def tuf_online_keys(server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    """Print the control plane's snapshot and timestamp public keys (JSON) for `slmops keys tuf init`.

    Example: slmops keys tuf online-keys > online.json
    """
    with client(server, token) as operator:
        typer.echo(json.dumps(operator._request("GET", "/tuf/online-keys").json(), indent=1))


@tuf_app.command("init")
def tuf_init(
    directory: Path = TufDir,
    online_keys: Path = typer.Option(..., "--online-keys", help="JSON from `slmops keys tuf online-keys`."),
    root_keys: int = typer.Option(3, "--root-keys", min=1, help="How many root keys to create."),
    root_threshold: int = typer.Option(2, "--root-threshold", min=1, help="How many root keys must sign a root."),
    targets_keys: int = typer.Option(1, "--targets-keys", min=1, help="How many targets keys to create."),
    json_out: bool = JsonOpt,
) -> None:
    """Create the offline root and targets keys, root v1 and an empty targets v1.

    Example: slmops keys tuf init ./tuf --online-keys online.json --root-keys 3 --root-threshold 2
    """
    if not online_keys.is_file():
        raise NotFoundError(f"{online_keys} does not exist; write it with `slmops keys tuf online-keys > FILE`")
    repo = _offline(directory)
    root = repo.init(
        json.loads(online_keys.read_text()),
        _now(),
        root_keys=root_keys,
        root_threshold=root_threshold,
        targets_keys=targets_keys,
    )
    result = {"root_version": root.signed.version, "expires": root.signed.expires.isoformat(), "dir": str(directory)}
    if json_out:
        print_json(result)
    else:
        console.print(
            f"created {root_keys} root keys (threshold {root_threshold}) and {targets_keys} targets key(s) in "
            f"{repo.key_dir}; root v1 expires {result['expires']}. Back up keys/ offline, then "
            f"`slmops keys tuf upload {directory}`"
        )


@tuf_app.command("add-target")
def tuf_add_target(
    directory: Path = TufDir,
    ref: str = typer.Argument(..., help="A model version in the local registry: NAME@vN, NAME@ALIAS or a digest."),
    hardware_ids: list[str] = typer.Option(..., "--hardware-id", help="A device class it is for (repeatable)."),
    json_out: bool = JsonOpt,
) -> None:
    """Release a model variant: list its manifest as a target for these device classes, sign targets.

    Example: slmops keys tuf add-target ./tuf gemma3-270m@v2 --hardware-id x86_64-8gb --hardware-id aarch64-4gb
    """
    from slmops.registry import Registry

    registry = Registry.open(Settings())
    try:
        envelope = registry.resolve(ref)
    finally:
        registry.close()
    manifest = envelope.manifest
    targets = _offline(directory).add_target(
        manifest.canonical(), hardware_ids, _now(), name=manifest.name, version=manifest.version
    )
    result = {"targets_version": targets.signed.version, "digest": envelope.digest, "hardware_ids": hardware_ids}
    if json_out:
        print_json(result)
    else:
        console.print(
            f"targets v{targets.signed.version}: {manifest.name}@{manifest.version} for {', '.join(hardware_ids)}"
        )


@tuf_app.command("remove-target")
def tuf_remove_target(
    directory: Path = TufDir,
    digest: str = typer.Argument(..., help="The manifest digest (sha256:...) to withdraw."),
) -> None:
    """Withdraw a released variant: devices stop installing it once the new targets are uploaded.

    Example: slmops keys tuf remove-target ./tuf sha256:0123...
    """
    targets = _offline(directory).remove_target(digest, _now())
    console.print(f"targets v{targets.signed.version} no longer lists {digest}")


@tuf_app.command("rotate")
def tuf_rotate(
    directory: Path = TufDir,
    role: str = typer.Argument(..., help="root, targets, snapshot or timestamp."),
    online_keys: Path | None = typer.Option(None, "--online-keys", help="New online public keys (JSON)."),
) -> None:
    """Replace a role's keys in a new root version, signed by the old and the new root keys here.

    Example: slmops keys tuf rotate ./tuf targets
    """
    keys = json.loads(online_keys.read_text()) if online_keys is not None else None
    root = _offline(directory).rotate(role, _now(), online_keys=keys)
    console.print(f"root v{root.signed.version} names new {role} keys; upload it with `slmops keys tuf upload`")


@tuf_app.command("renew")
def tuf_renew(
    directory: Path = TufDir,
    role: str = typer.Argument("targets", help="targets (every few weeks; expires after 90 days) or root (yearly)."),
) -> None:
    """Sign the next version of targets or root with a fresh expiry, unchanged otherwise; then upload it.

    Example: slmops keys tuf renew ./tuf targets && slmops keys tuf upload ./tuf
    """
    md = _offline(directory).renew(role, _now())
    console.print(f"{role} v{md.signed.version} expires {md.signed.expires.isoformat()}")


@tuf_app.command("sign")
def tuf_sign(
    metadata_file: Path = typer.Argument(..., help="A root or targets file in metadata/."),
    keys: list[Path] = typer.Option(..., "--key", help="A private key file (repeatable)."),
) -> None:
    """Append signatures to a metadata file (root keys held by several people sign in turn).

    Example: slmops keys tuf sign ./tuf/metadata/2.root.json --key /media/usb/root-2.key
    """
    md = _offline(metadata_file.parent.parent).sign_file(metadata_file, keys)
    console.print(f"{metadata_file.name} now has {len(md.signatures)} signature(s)")


@tuf_app.command("upload")
def tuf_upload(
    directory: Path = TufDir, server: str | None = ServerOpt, token: str | None = TokenOpt, json_out: bool = JsonOpt
) -> None:
    """Upload every root version the control plane lacks, then the latest targets if newer (needs an admin token).

    Example: slmops keys tuf upload ./tuf
    """
    repo = _offline(directory)
    uploaded: list[dict[str, object]] = []
    with client(server, token) as operator:
        have = {role: _server_version(operator, role) for role in ("root", "targets")}
        for role in ("root", "targets"):
            versions = [v for v in repo.versions(role) if v > have[role]]
            for version in versions if role == "root" else versions[-1:]:
                body = repo.file(role, version).read_bytes()
                headers = {"Content-Type": "application/json"}
                uploaded.append(operator._request("PUT", f"/tuf/{role}", content=body, headers=headers).json())
    if json_out:
        print_json(uploaded)
    elif not uploaded:
        console.print("the control plane already has every root and the latest targets")
    for item in [] if json_out else uploaded:
        console.print(
            f"uploaded {item['role']} v{item['version']}; published snapshot v{item['snapshot_version']}, "
            f"timestamp v{item['timestamp_version']}"
        )


def _server_version(operator: OperatorClient, role: str) -> int:
    try:
        body = operator._request("GET", f"/tuf/{role}.json").json()
    except NotFoundError:
        return 0
    return int(body["signed"]["version"])
