"""Writing a benchmark's section of BENCHMARKS.md: each benchmark owns the text between its two markers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BENCHMARKS", "write_section"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(section: str, name: str, path: Path = BENCHMARKS) -> None:
    """Replace the ``name`` section of ``path`` (between ``<!-- name:begin -->`` and ``<!-- name:end -->``), or
    append it when the file has none yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
