"""On-device redaction: personal data in feedback text becomes ``<TYPE>`` placeholders before anything is stored
for upload.

Structured data is found by regex detectors with checksum or parser validation (:mod:`._detectors`): ``EMAIL``,
``PHONE``, ``IBAN`` (mod-97), ``CARD`` (Luhn), ``IP`` (v4 and v6, through :mod:`ipaddress`). Names and places
(``PERSON``, ``LOCATION``) need a statistical model: with ``presidio=True`` the redactor also runs Presidio's
analyzer over a spaCy pipeline (``pip install 'slmops[privacy]'`` plus an installed spaCy model, by default
``en_core_web_sm``; nothing is downloaded at run time).

Overlapping findings are resolved before replacing: the longest span wins, and on equal length the more specific
type (``EMAIL`` > ``IBAN`` > ``CARD`` > ``IP`` > ``PHONE`` > ``PERSON`` > ``LOCATION``). Spans are replaced right
to left, so earlier offsets stay valid.

Input is bounded: text beyond :data:`~slmops.core.feedback.MAX_FEEDBACK_TEXT_CHARS` characters is dropped (and
``Redacted.truncated`` says so); a span that the cut would split is replaced whole, so no part of it is kept.
Every pattern runs in time linear in the input.

::

    >>> Redactor().redact("Mail anna@example.org or call +49 30 1234567").text
    'Mail <EMAIL> or call <PHONE>'
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slmops.core.feedback import MAX_FEEDBACK_TEXT_CHARS, REDACTION_TYPES
from slmops.errors import ConfigError, MissingExtraError
from slmops.feedback._detectors import RANK, Span, detect_all

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine

__all__ = [
    "DEFAULT_SPACY_MODEL",
    "PRESIDIO_ENTITIES",
    "REGEX_TYPES",
    "Redacted",
    "Redactor",
    "TypeScore",
    "evaluate",
    "resolve_overlaps",
]

PRESIDIO_ENTITIES = ("PERSON", "LOCATION")
DEFAULT_SPACY_MODEL = "en_core_web_sm"
REGEX_TYPES = ("EMAIL", "PHONE", "IBAN", "CARD", "IP")
_SCAN_MARGIN_CHARS = 256  # longer than any span a detector can return
# spaCy NER labels (OntoNotes for English pipelines, WikiNER PER/LOC for German ones) → our types; the rest ignored.
_NER_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION"}
_NER_LABELS_IGNORED = (
    *("CARDINAL", "DATE", "EVENT", "LANGUAGE", "LAW", "MISC", "MONEY", "NORP", "ORDINAL", "ORG", "PERCENT"),
    *("PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"),
)


@dataclass(frozen=True)
class Redacted:
    """The redacted text and how many spans of each placeholder type were replaced."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)
    spans: tuple[tuple[int, int, str], ...] = ()  # (start, end, type) in the (possibly truncated) input
    truncated: bool = False  # the input was longer than MAX_FEEDBACK_TEXT_CHARS; the rest was dropped


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans in text order: longest first, then the more specific type, then the earlier one."""
    chosen: list[Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), RANK[s.type], s.start)):
        if span.end > span.start and all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return sorted(chosen)


class Redactor:
    """Replaces personal data with ``<TYPE>`` placeholders. Reusable and safe to share between requests once built;
    the Presidio engine (when asked for) loads on first use."""

    def __init__(self, presidio: bool = False, *, spacy_model: str = DEFAULT_SPACY_MODEL, language: str = "en"):
        if presidio and importlib.util.find_spec("presidio_analyzer") is None:
            raise MissingExtraError(
                "privacy", "redacting names and locations (feedback.redaction.presidio)", "presidio-analyzer"
            )
        self.presidio = presidio
        self.spacy_model = spacy_model
        self.language = language
        self._analyzer: AnalyzerEngine | None = None

    def redact(self, text: str) -> Redacted:
        truncated = len(text) > MAX_FEEDBACK_TEXT_CHARS
        # Scan a little beyond the bound, so a span the cut would split is still found and replaced whole.
        scanned = text[: MAX_FEEDBACK_TEXT_CHARS + _SCAN_MARGIN_CHARS]
        candidates = detect_all(scanned)
        if self.presidio:
            candidates.extend(self._presidio_spans(scanned))
        spans = [s for s in resolve_overlaps(candidates) if s.start < MAX_FEEDBACK_TEXT_CHARS]
        pieces: list[str] = []
        position = 0
        for span in spans:  # one pass over non-overlapping spans in order: the same as replacing right to left
            pieces += (scanned[position : span.start], f"<{span.type}>")
            position = span.end
        pieces.append(scanned[position : max(position, MAX_FEEDBACK_TEXT_CHARS)])
        counts = Counter(span.type for span in spans)
        ordered = {t: counts[t] for t in REDACTION_TYPES if counts[t]}
        return Redacted("".join(pieces), ordered, tuple((s.start, s.end, s.type) for s in spans), truncated)

    def _presidio_spans(self, text: str) -> list[Span]:
        analyzer = self._engine()
        results: list[Any] = analyzer.analyze(text=text, language=self.language, entities=list(PRESIDIO_ENTITIES))
        return [Span(r.start, r.end, r.entity_type) for r in results if r.entity_type in PRESIDIO_ENTITIES]

    def _engine(self) -> AnalyzerEngine:
        if self._analyzer is None:
            self._analyzer = _build_analyzer(self.spacy_model, self.language)
        return self._analyzer


def _build_analyzer(spacy_model: str, language: str) -> AnalyzerEngine:
    import spacy.util
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import SpacyRecognizer

    # Presidio downloads a missing spaCy model from the internet; a device must not, so refuse instead.
    if not spacy.util.is_package(spacy_model):
        raise ConfigError(
            f"Presidio redaction needs the spaCy model '{spacy_model}', which is not installed; install its wheel "
            f"(for example `python -m spacy download {spacy_model}` where the device may reach the internet, or "
            "`pip install` a copy from your own package index), or set feedback.redaction.presidio to false"
        )
    ner = NerModelConfiguration(
        model_to_presidio_entity_mapping=dict(_NER_LABELS), labels_to_ignore=list(_NER_LABELS_IGNORED)
    )
    engine = SpacyNlpEngine(models=[{"lang_code": language, "model_name": spacy_model}], ner_model_configuration=ner)
    engine.load()
    # Only the NER recognizer: the regex types are ours (with checksums), and the other predefined recognizers
    # (URLs, crypto wallets, ...) are not what this redactor promises.
    registry = RecognizerRegistry(supported_languages=[language])
    registry.add_recognizer(SpacyRecognizer(supported_language=language, supported_entities=list(PRESIDIO_ENTITIES)))
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=[language])


@dataclass(frozen=True)
class TypeScore:
    """Span-level counts for one type: a found span is a true positive when it overlaps a labelled span of its
    type; each labelled span is recalled at most once."""

    type: str
    labelled: int
    found: int
    true_positives: int
    recalled: int

    @property
    def recall(self) -> float:
        return self.recalled / self.labelled if self.labelled else 1.0

    @property
    def precision(self) -> float:
        return self.true_positives / self.found if self.found else 1.0


def evaluate(
    redactor: Redactor, examples: Iterable[tuple[str, Iterable[tuple[int, int, str]]]], types: Iterable[str]
) -> dict[str, TypeScore]:
    """Recall and precision per type of ``redactor`` on labelled ``(text, [(start, end, type), ...])`` examples.
    Labels and findings of types outside ``types`` are ignored (a regex-only redactor is not scored on names)."""
    wanted = tuple(types)
    tally = {t: [0, 0, 0, 0] for t in wanted}  # labelled, found, true positives, recalled
    for text, gold_spans in examples:
        gold = [g for g in gold_spans if g[2] in wanted]
        found = [s for s in redactor.redact(text).spans if s[2] in wanted]

        def hit(a: tuple[int, int, str], b: tuple[int, int, str]) -> bool:
            return a[2] == b[2] and a[0] < b[1] and b[0] < a[1]

        for g in gold:
            tally[g[2]][0] += 1
            tally[g[2]][3] += any(hit(g, s) for s in found)
        for s in found:
            tally[s[2]][1] += 1
            tally[s[2]][2] += any(hit(s, g) for g in gold)
    return {t: TypeScore(t, *tally[t]) for t in wanted}
