from __future__ import annotations

from pathlib import Path

import pytest

import slmops
from slmops.errors import InvalidModelError, RuntimeBackendError
from slmops.runtime.chat import MAX_TEMPLATE_CHARS, render_chat

GEMMA = (Path(slmops.__file__).parent / "registry" / "templates" / "gemma3.jinja").read_text(encoding="utf-8")


def test_gemma_template_renders_turns_with_the_system_prompt_folded_into_the_first_user_turn() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi  "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Sea?"}]},
    ]

    prompt = render_chat(GEMMA, messages, bos_token="<bos>")

    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nSea?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert not render_chat(GEMMA, messages[:2], add_generation_prompt=False).endswith("<start_of_turn>model\n")


def test_gemma_template_rejecting_the_messages_is_a_runtime_backend_error() -> None:
    with pytest.raises(RuntimeBackendError, match="roles must alternate"):
        render_chat(GEMMA, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_no_template_falls_back_to_role_lines() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(None, messages) == "system: S\nuser: U\nassistant:"
    assert render_chat("", messages, add_generation_prompt=False) == "system: S\nuser: U"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}{{ x }}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_sandbox_escapes_fail_safely(template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises((InvalidModelError, RuntimeBackendError)):
        render_chat(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_unsafe_attribute_access_is_an_invalid_model() -> None:
    with pytest.raises(InvalidModelError, match="sandbox"):
        render_chat("{{ ''.__class__.__mro__ }}", [{"role": "user", "content": "hi"}])


def test_broken_and_oversized_templates_are_invalid_models() -> None:
    with pytest.raises(InvalidModelError, match="does not parse"):
        render_chat("{% for %}", [])
    with pytest.raises(InvalidModelError, match="characters"):
        render_chat("x" * (MAX_TEMPLATE_CHARS + 1), [])


def test_output_size_is_bounded() -> None:
    template = "{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}{% endfor %}"
    with pytest.raises(InvalidModelError, match="more than"):
        render_chat(template, [])


def test_template_helpers_are_available() -> None:
    template = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}{% break %}{% endfor %}"
    )
    assert render_chat(template, [{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]|4|'
