"""The evaluation and calibration data shipped in ``slmops/optimize/data`` (see its README for sources and licence)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from slmops.errors import BlueprintError

__all__ = ["BUILTIN_PREFIX", "TaskItem", "load_tasks", "read_text"]

BUILTIN_PREFIX = "builtin:"


def _builtin(name: str) -> str:
    resource = resources.files("slmops.optimize").joinpath("data", name)
    if not resource.is_file():
        available = sorted(p.name for p in resources.files("slmops.optimize").joinpath("data").iterdir())
        raise BlueprintError(f"no shipped data file '{name}'; shipped files: {', '.join(available)}")
    return resource.read_text(encoding="utf-8")


def read_text(spec: str, base: Path | None = None) -> str:
    """``builtin:NAME`` (a shipped file) or a path (relative to ``base``, the recipe's directory)."""
    if spec.startswith(BUILTIN_PREFIX):
        return _builtin(spec.removeprefix(BUILTIN_PREFIX))
    path = Path(spec)
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintError(
            f"cannot read the text file {path}: {exc.strerror or exc}; give a readable UTF-8 file, "
            f"or '{BUILTIN_PREFIX}eval.txt' for the shipped one"
        ) from None


@dataclass(frozen=True)
class TaskItem:
    id: str
    prompt: str
    options: tuple[str, ...]
    answer: int  # index into options


def load_tasks(spec: str, base: Path | None = None) -> list[TaskItem]:
    """A JSON-lines multiple-choice set: ``{"id", "prompt", "options": [...], "answer": index}`` per line."""
    items: list[TaskItem] = []
    for number, line in enumerate(read_text(spec, base).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = TaskItem(
                str(raw["id"]), str(raw["prompt"]), tuple(str(o) for o in raw["options"]), int(raw["answer"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BlueprintError(
                f"{spec} line {number}: expected a JSON object with id, prompt, options and answer ({exc})"
            ) from None
        if not 2 <= len(item.options) <= 8 or not 0 <= item.answer < len(item.options):
            raise BlueprintError(f"{spec} line {number}: need 2-8 options and an answer index among them")
        items.append(item)
    return items
