"""YAML into a pydantic model, with errors that name the bad field and its line (``yaml.safe_load`` only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from slmops.errors import ConfigError

__all__ = ["load_yaml_model", "require_unique"]

M = TypeVar("M", bound=BaseModel)


def require_unique(what: str, names: Sequence[str]) -> None:
    """Raise ``ValueError`` (pydantic turns it into a validation error) naming the names given more than once."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"each {what} may appear once; given more than once: {', '.join(twice)}")


def _duplicate_key(node: yaml.Node | None) -> tuple[str, int] | None:
    """The first key given twice in one mapping (PyYAML would keep the last one silently), with its line."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                return name, key.start_mark.line + 1
            seen.add(name)
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def _locate(node: yaml.Node | None, loc: Sequence[int | str]) -> tuple[str, int | None]:
    """A readable path (``rules[1].threshold``) and the line of the deepest node that exists.

    Elements of ``loc`` that are not in the document (the tag pydantic adds for a discriminated union) are skipped,
    except a last one: that is a missing field, named at its parent's line."""
    path = ""
    line = node.start_mark.line + 1 if node is not None else None
    for i, part in enumerate(loc):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in node.value if str(k.value) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None and (i < len(loc) - 1 or isinstance(node, yaml.ScalarNode)):
            continue  # a union member's tag, not a key of the document
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        node = child
        if node is not None:
            line = node.start_mark.line + 1
    return path or "(top level)", line


def load_yaml_model(text: str, model: type[M], *, origin: str, hint: str) -> M:
    """Parse ``text`` (``origin`` names it in errors) into ``model``; ``hint`` ends every error message."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{origin}: not valid YAML{where}: {problem}; {hint}") from exc
    duplicate = _duplicate_key(root)
    if duplicate:
        raise ConfigError(f"{origin}: key '{duplicate[0]}' given twice (line {duplicate[1]}); {hint}")
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc += (str(error.get("ctx", {}).get("discriminator", "")).strip("'\""),)
            path, line = _locate(root, loc)
            at = f" (line {line})" if line is not None else ""
            problems.append(f"{path}{at}: {error['msg']}")
        raise ConfigError(f"{origin}: {'; '.join(problems)}; {hint}") from exc
