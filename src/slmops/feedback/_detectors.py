"""Regex detectors for structured personal data, each a loose linear-time pattern plus a strict validator.

Every pattern is a single pass with bounded repetition, and starts with a negative lookbehind on its own character
class, so a match can only begin where a run of such characters begins: a long run that is not a match costs one
scan, not one scan per start position (Python's ``re`` backtracks; the lookbehind keeps it linear). Whatever the
pattern finds is then checked in Python: e-mail domains need an alphabetic TLD, IBANs the ISO 13616 mod-97
checksum and their country's length, card numbers the Luhn checksum and a plausible issuer digit, IP addresses the
``ipaddress`` module, phone numbers a shape (international ``+CC`` / ``00CC``, a national trunk ``0``, or the
North American ``(555) 123-4567`` / ``555-123-4567``) that dates, prices and order numbers do not have.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Span", "detect_all", "iban_valid", "luhn_valid"]


class Span(NamedTuple):
    start: int
    end: int
    type: str


# How specific a detector is: on an overlap of equal length, the lower rank wins.
RANK = {"EMAIL": 0, "IBAN": 1, "CARD": 2, "IP": 3, "PHONE": 4, "PERSON": 5, "LOCATION": 6}

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
_EMAIL_LOCAL = re.compile(r"[\w%+-]+(?:\.[\w%+-]+)*")


def _emails(text: str) -> Iterator[Span]:
    for match in _EMAIL.finditer(text):
        local, _, domain = match.group().partition("@")
        if not _EMAIL_LOCAL.fullmatch(local):
            continue
        labels = domain.split(".")
        # A sentence may end right after the address, and a TLD is letters only: drop trailing non-TLD labels.
        while len(labels) > 1 and not (labels[-1].isalpha() and len(labels[-1]) >= 2):
            labels.pop()
        if len(labels) < 2 or any(not label or label[0] == "-" or label[-1] == "-" for label in labels):
            continue
        end = match.start() + len(local) + 1 + len(".".join(labels))
        yield Span(match.start(), end, "EMAIL")


# ISO 13616 lengths of the countries we meet most; other countries: any length from 15 to 34.
_IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20,
    "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
    "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26,
}  # fmt: skip
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")


def iban_valid(compact: str) -> bool:
    """ISO 13616: the country's length, and the number (letters as 10..35, first four characters moved to the
    end) is 1 modulo 97."""
    compact = compact.upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    digits = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


def _ibans(text: str) -> Iterator[Span]:
    for match in _IBAN.finditer(text):
        raw = match.group()
        # The pattern may run on into the next word ("... 00 IBAN"): the longest prefix that validates wins.
        for cut in range(len(raw), 14, -1):
            if raw[cut - 1] == " " or (cut < len(raw) and raw[cut] != " "):
                continue  # a cut must fall between groups, not inside one
            if iban_valid(raw[:cut].replace(" ", "")):
                yield Span(match.start(), match.start() + cut, "IBAN")
                break


_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a string of digits."""
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = int(ch)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _issuer_plausible(digits: str) -> bool:
    """Issuers' first digits are 2-6 (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4, Discover/UnionPay 6); 13 digits
    only for old Visa cards, 14-15 only for Diners and Amex (3)."""
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    if len(digits) == 13:
        return digits[0] == "4"
    return len(digits) >= 16 or digits[0] == "3"


_IBAN_HEAD = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2} ?$")


def _cards(text: str) -> Iterator[Span]:
    for match in _CARD.finditer(text):
        if _IBAN_HEAD.search(text[max(0, match.start() - 6) : match.start()]):
            continue  # the digits of an IBAN-shaped string (one that failed its checksum): not a card
        raw = match.group()
        for cut in range(len(raw), 12, -1):
            if not raw[cut - 1].isdigit() or (cut < len(raw) and raw[cut].isdigit()):
                continue
            digits = re.sub(r"\D", "", raw[:cut])
            if _issuer_plausible(digits) and luhn_valid(digits):
                yield Span(match.start(), match.start() + cut, "CARD")
                break


_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:])")
# A dotted quad after one of these words is a version, not an address ("firmware 1.2.3.4", "v2.0.1.7").
_VERSION_CONTEXT = re.compile(
    r"(?:\b(?:version|ver|firmware|fw|build|release|update|software|sw|app|os|stand|softwarestand|patch)"
    r"(?:\s+(?:to|from|is|auf|von|ist))?\s*[:#]?\s*v?|\bv)$",
    re.IGNORECASE,
)


def _ips(text: str) -> Iterator[Span]:
    for match in _IPV4.finditer(text):
        if _VERSION_CONTEXT.search(text[max(0, match.start() - 24) : match.start()]):
            continue
        try:
            ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        yield Span(match.start(), match.end(), "IP")
    for match in _IPV6.finditer(text):
        candidate = match.group()
        groups = [g for g in re.split(r"[:.]", candidate) if g]
        if len(groups) < 2 or not any(ch.isdigit() for ch in candidate):
            continue  # "::", "ab::" and the like: too little to be anyone's address, too easy to hit by chance
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield Span(match.start(), match.end(), "IP")


# A run of digits and the separators phone numbers use; split into whitespace groups and tried window by window.
_PHONE_RUN = re.compile(r"(?<![\w+/-])\+?\(?\d[\d \t()./-]{0,40}")
_DATE_LIKE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")
_NANP = re.compile(r"(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}")
_TRUNK_PAREN = re.compile(r"\(0\d{1,5}\) ?\d[\d /-]*\d")
_MAX_PHONE_GROUPS = 7


def _phone_shape(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if candidate.startswith("+"):
        return 8 <= len(digits) <= 15 and digits[0] != "0"
    if candidate.startswith("00"):
        return 10 <= len(digits) - 2 <= 15 and digits[2] != "0" and not any(ch in candidate for ch in "./")
    if _NANP.fullmatch(candidate):
        return True
    if candidate.startswith("("):
        return bool(_TRUNK_PAREN.fullmatch(candidate)) and 9 <= len(digits) <= 13
    if candidate.startswith("0"):
        if not 9 <= len(digits) <= 13 or _DATE_LIKE.fullmatch(candidate):
            return False
        # Dots in a national number only as a French-style "01.23.45.67.89"; otherwise they are decimals.
        return "." not in candidate or bool(re.fullmatch(r"0\d(?:\.\d\d){4}", candidate))
    return False


def _phones(text: str) -> Iterator[Span]:
    for match in _PHONE_RUN.finditer(text):
        if _IBAN_HEAD.search(text[max(0, match.start() - 6) : match.start()]):
            continue  # the digit groups of an IBAN-shaped string
        raw = match.group()
        groups = [(m.start() + match.start(), m.end() + match.start()) for m in re.finditer(r"\S+", raw)]
        i = 0
        while i < len(groups):
            found = False
            for j in range(min(len(groups), i + _MAX_PHONE_GROUPS), i, -1):
                start, end = groups[i][0], groups[j - 1][1]
                while end > start and text[end - 1] in " \t(./-":
                    end -= 1  # a trailing separator belongs to the sentence
                candidate = text[start:end]
                if candidate.count("(") != candidate.count(")"):
                    continue
                if _phone_shape(candidate):
                    yield Span(start, end, "PHONE")
                    i, found = j, True
                    break
            if not found:
                i += 1


def detect_all(text: str) -> list[Span]:
    """Every validated candidate of every regex type; overlaps are resolved by the caller."""
    spans: list[Span] = []
    for detector in (_emails, _ibans, _cards, _ips, _phones):
        spans.extend(detector(text))
    return spans
