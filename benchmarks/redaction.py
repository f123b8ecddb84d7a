"""On-device redaction: recall and precision per type on the labelled set.

    python -m benchmarks.redaction [--presidio] [--spacy-model en_core_web_sm] [--write]

The set is ``tests/feedback/data/redaction_labelled.jsonl``: realistic shop, clinic and factory chat lines in
English and German, with the character spans and types of the personal data in them, and hard negatives (dates,
prices, SKUs and order numbers, EANs, IBANs and card numbers with a wrong checksum, dotted version numbers, MAC
addresses, times). A found span counts as a true positive when it overlaps a labelled span of its type
(:func:`slmops.feedback.redact.evaluate`). The regex detectors were written and tuned with this set in view, so
their numbers are in-sample: they show the detectors do what they claim on these formats, not how they do on
unseen text. With ``--presidio`` the table adds PERSON and LOCATION from Presidio over the given spaCy pipeline,
per language (it needs ``slmops[privacy]`` and the model installed as a package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks._report import write_section
from slmops.feedback.redact import DEFAULT_SPACY_MODEL, REGEX_TYPES, Redactor, TypeScore, evaluate

__all__ = ["LABELLED", "load", "main", "markdown"]

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "feedback" / "data" / "redaction_labelled.jsonl"
Example = tuple[str, list[tuple[int, int, str]]]


def load(path: Path = LABELLED) -> list[tuple[str, Example]]:
    """``(language, (text, spans))`` per labelled line."""
    out: list[tuple[str, Example]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append((row["lang"], (row["text"], [(s["start"], s["end"], s["type"]) for s in row["spans"]])))
    return out


def _rows(label: str, scores: dict[str, TypeScore]) -> list[str]:
    return [
        f"| {label} | {s.type} | {s.labelled} | {s.found} | {s.true_positives} | {s.recall:.3f} | {s.precision:.3f} |"
        for s in scores.values()
    ]


def markdown(presidio: bool, spacy_model: str, command: str) -> str:
    data = load()
    started = time.perf_counter()
    lines = [
        "## Redaction (on-device, before feedback is stored for upload)",
        "",
        f"Labelled set: {len(data)} lines ({sum(1 for lang, _ in data if lang == 'en')} English, "
        f"{sum(1 for lang, _ in data if lang == 'de')} German), "
        f"{sum(len(e[1]) for _, e in data)} labelled spans, the rest hard negatives. Regex numbers are in-sample "
        "(the detectors were tuned on this set).",
        "",
        "| detector | type | labelled | found | true positives | recall | precision |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += _rows("regex (all lines)", evaluate(Redactor(), [e for _, e in data], REGEX_TYPES))
    if presidio:
        redactor = Redactor(presidio=True, spacy_model=spacy_model)
        for lang in ("en", "de"):
            examples = [e for language, e in data if language == lang]
            lines += _rows(f"Presidio + {spacy_model} ({lang})", evaluate(redactor, examples, ("PERSON", "LOCATION")))
    lines += ["", f"Total {time.perf_counter() - started:.1f} s. Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--presidio", action="store_true", help="also PERSON and LOCATION through Presidio")
    parser.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="installed spaCy pipeline for Presidio")
    parser.add_argument("--write", action="store_true", help="replace the redaction section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = ("python -m benchmarks.redaction " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    section = markdown(args.presidio, args.spacy_model, command)
    print(section)
    if args.write:
        write_section(section, "redaction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
