"""Shared pieces of the CLI: consoles, byte progress bars, JSON output, sizes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from slmops.registry.blobstore import Progress as ProgressCallback
from slmops.registry.service import ProgressFactory

__all__ = ["byte_progress", "console", "err_console", "human_bytes", "print_json", "print_result", "progress_bars"]

T = TypeVar("T", bound=BaseModel | Sequence[BaseModel])

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def print_result(result: T, json_out: bool, human: Callable[[T], None]) -> None:
    """With ``--json`` print ``result`` (an API model or a list of them) as JSON, else let ``human`` render it."""
    if not json_out:
        human(result)
    elif isinstance(result, BaseModel):
        print_json(result.model_dump(mode="json"))
    else:
        print_json([item.model_dump(mode="json") for item in result])


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@contextmanager
def byte_progress(enabled: bool = True) -> Iterator[ProgressFactory]:
    """A progress factory that shows one Rich bar per file on a terminal (stderr), and nothing elsewhere."""
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not enabled or not err_console.is_terminal,
    )

    def factory(description: str, total: int) -> ProgressCallback:
        task = bars.add_task(description, total=total)

        def advance(done: int) -> None:
            bars.update(task, advance=done)

        return advance

    with bars:
        yield factory


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich progress bars on stderr, one per description; a factory of progress callbacks (off when not a tty)."""
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not enabled or not err_console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def factory(description: str) -> Any:
        task = tasks.get(description)
        if task is None:
            task = tasks[description] = bars.add_task(description, total=None)

        def update(done: float, total: float) -> None:
            bars.update(task, completed=done, total=total)

        return update

    with bars:
        yield factory
