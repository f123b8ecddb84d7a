"""Chat templates: turn OpenAI-style messages into one prompt string with the model's own Jinja template.

Templates come from model files and manifests, so they are rendered in Jinja's ``ImmutableSandboxedEnvironment``
(no attribute starting with ``_``, no mutation of lists or dicts, bounded ``range``), with the helpers Hugging Face
templates expect (``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape). Template size and
output size are bounded. A template that loops forever without output is not caught: templates are part of a
signed manifest, so they are trusted not to be malicious, only not to be well written.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from slmops.errors import InvalidModelError, RuntimeBackendError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["MAX_RENDERED_CHARS", "MAX_TEMPLATE_CHARS", "message_text", "render_chat"]

MAX_TEMPLATE_CHARS = 131_072
MAX_RENDERED_CHARS = 1_048_576


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the ``text`` parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    raise RuntimeBackendError(
        f"message content must be a string or a list of content parts, not {type(content).__name__}"
    )


def _fallback(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    lines = [f"{message.get('role', 'user')}: {message_text(message.get('content'))}" for message in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRejectedError(str(message))


class _TemplateRejectedError(Exception):
    """Raised by a template's own ``raise_exception(...)``: the template refuses these messages."""


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


@lru_cache(maxsize=8)
def _compile(template: str) -> Template:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise InvalidModelError(
            f"the model's chat template does not parse ({type(exc).__name__}: {exc}); "
            "fix the template in the model's manifest (slmops model import --chat-template FILE)"
        ) from exc


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` (``{"role", "content"}`` dicts) into a prompt with the Jinja chat ``template``.

    Without a template (``None`` or empty) the prompt falls back to plain lines ``role: content`` followed by
    ``assistant:`` when ``add_generation_prompt``: good enough to talk to a base model, but not the format an
    instruction-tuned model was trained on.

    Raises :class:`InvalidModelError` when the template is too large, does not parse, or tries something the
    sandbox forbids (the template is the model's fault), and :class:`RuntimeBackendError` when the template
    rejects these messages (its ``raise_exception``, e.g. roles that do not alternate) or fails on them.
    """
    if not template:
        return _fallback(messages, add_generation_prompt)
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidModelError(
            f"the model's chat template has {len(template)} characters, more than the {MAX_TEMPLATE_CHARS} allowed; "
            "use a shorter template"
        )
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    compiled = _compile(template)
    pieces: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        ):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise InvalidModelError(
                    f"the model's chat template produced more than {MAX_RENDERED_CHARS} characters; "
                    "the template or the messages are too large"
                )
            pieces.append(piece)
    except _TemplateRejectedError as exc:
        raise RuntimeBackendError(f"the model's chat template rejected these messages: {exc}") from exc
    except SecurityError as exc:
        raise InvalidModelError(
            f"the model's chat template tried an operation the sandbox forbids ({exc}); the template is unsafe, "
            "replace it in the model's manifest"
        ) from exc
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError) as exc:
        raise RuntimeBackendError(
            f"the model's chat template failed on these messages ({type(exc).__name__}: {exc}); "
            "check the roles and content types of the messages"
        ) from exc
    return "".join(pieces)
