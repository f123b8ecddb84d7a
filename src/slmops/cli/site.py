"""`slmops site set|show`: what a site (the devices labelled ``site=<name>``) adapts locally, within its limits."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Column, Table

from slmops.cli._common import console, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.control.sites import SitePublic
from slmops.core.adaptation import LocalAdaptation, Sampling, SiteAdaptation
from slmops.core.sites import describe
from slmops.errors import ConfigError, NotFoundError

__all__ = ["app"]

app = typer.Typer(
    help="Site adaptations: an allowed adapter, a system prompt and sampling values, within the blueprint's limits.",
    no_args_is_help=True,
)
SiteArg = typer.Argument(..., help="The site: the value of the devices' 'site' label.")


def _prompt(text: str | None, file: Path | None) -> str | None:
    if text is not None and file is not None:
        raise ConfigError("give --system-prompt or --system-prompt-file, not both")
    if file is None:
        return text
    if not file.is_file():
        raise NotFoundError(f"{file} does not exist; write the system prompt into a UTF-8 text file")
    return file.read_text(encoding="utf-8").strip("\n")


@app.command("set")
def set_(
    site: str = SiteArg,
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="Put before every request's messages."),
    system_prompt_file: Path | None = typer.Option(None, "--system-prompt-file", help="Read the system prompt here."),
    adapter: str | None = typer.Option(None, "--adapter", help="An adapter variant the blueprint allows."),
    temperature: float | None = typer.Option(None, "--temperature", help="Default sampling temperature."),
    top_p: float | None = typer.Option(None, "--top-p", help="Default nucleus sampling top-p."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Default completion length, in tokens."),
    clear: bool = typer.Option(False, "--clear", help="Start from nothing instead of what the site set before."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Set what a site adapts; the values given replace the site's, the others stay (unless --clear).

    Each device of the site applies what fits its blueprint's spec.local limits; `slmops site show` says what was
    dropped and why.

    Example: slmops site set berlin-3 --adapter lora-shop --system-prompt "Answer in German." --temperature 0.3
    """
    prompt = _prompt(system_prompt, system_prompt_file)
    with client(server_url, token) as api:
        before = SiteAdaptation() if clear else api.site(site).adaptation
        sampling = before.sampling.model_dump()
        asked = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        sampling.update({k: v for k, v in asked.items() if v is not None})
        try:
            adaptation = SiteAdaptation(
                adapter=adapter if adapter is not None else before.adapter,
                system_prompt=prompt if prompt is not None else before.system_prompt,
                sampling=Sampling.model_validate(sampling),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid site adaptation: {exc}") from None
        result = api.set_site(site, adaptation)
    print_result(result, json_out, _print_site)


@app.command()
def show(
    site: str = SiteArg,
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show what a site set and, per device class, what its devices apply and what was dropped and why.

    Example: slmops site show berlin-3
    """
    with client(server_url, token) as api:
        result = api.site(site)
    print_result(result, json_out, _print_site)


def _print_site(result: SitePublic) -> None:
    asked = result.adaptation
    if asked == SiteAdaptation():
        console.print(f"site {result.site}: sets nothing")
    else:
        by = f" (by {result.updated_by}, {result.updated_at})" if result.updated_by else ""
        console.print(f"site {result.site}{by}:")
        console.print(f"  asked: {describe(LocalAdaptation.model_validate(asked.model_dump()))}")
        if asked.system_prompt:
            console.print(f"  system prompt: {asked.system_prompt!r}", highlight=False)
    if not result.effects:
        console.print("no approved device has the label site=" + result.site)
        return
    table = Table("class", "devices", Column("blueprint", no_wrap=True), "model", "in effect")
    for e in result.effects:
        table.add_row(e.device_class, str(len(e.devices)), e.blueprint or "-", e.model or "-", describe(e.local))
    console.print(table)
    for e in result.effects:
        for reason in e.local.dropped:
            console.print(
                f"dropped on {e.device_class} ({e.blueprint or '-'}): {reason}", highlight=False, soft_wrap=True
            )
