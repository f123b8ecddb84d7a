"""Simulated users of a shop assistant: they ask about products and rate answers by a fixed answer format.

The shop wants every answer in one line, ``<product>: aisle <n>, <price> EUR`` (for example
``oat milk: aisle 4, 1.29 EUR``). A base model does not answer that way; a user rates an answer ``up`` when it has
the format and the right facts, and otherwise ``down`` with the correct line as a correction. That is the feedback
a fleet would send back (after redaction) and what a LoRA adapter learns from: the task the improve loop is measured
on (:data:`ANSWER_FORMAT`).

The catalogue and the questions are generated from a seed, so every run asks the same questions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "ANSWER_FORMAT",
    "Question",
    "UsersOutcome",
    "ask_and_rate",
    "feedback_records",
    "questions",
    "rate",
]

ANSWER_FORMAT = r"^[a-z][a-z ]+: aisle \d{1,2}, \d+\.\d{2} EUR$"
_FORMAT = re.compile(ANSWER_FORMAT)

_PRODUCTS = (
    "oat milk", "whole milk", "rye bread", "butter", "gouda", "eggs", "apples", "bananas", "carrots", "potatoes",
    "onions", "rice", "pasta", "olive oil", "coffee", "green tea", "orange juice", "sparkling water", "yoghurt",
    "honey", "jam", "cornflakes", "oats", "flour", "sugar", "salt", "pepper", "tomatoes", "cucumbers", "lettuce",
    "chicken", "salmon", "tofu", "lentils", "chickpeas", "peanut butter", "dark chocolate", "biscuits", "crisps",
    "toothpaste", "shampoo", "soap", "dish soap", "paper towels", "batteries", "light bulbs", "dog food", "cat food",
)  # fmt: skip
_TEMPLATES = (
    "Where can I find {p}?",
    "Do you have {p}, and where?",
    "How much is {p}?",
    "I am looking for {p}.",
    "Which aisle has {p}?",
    "What does {p} cost and where is it?",
)


@dataclass(frozen=True)
class Question:
    product: str
    prompt: str
    answer: str  # the line the shop wants


def _catalogue(seed: int) -> dict[str, tuple[int, float]]:
    rng = random.Random(seed)
    return {p: (rng.randint(1, 12), round(rng.uniform(0.5, 9.99), 2)) for p in _PRODUCTS}


def questions(count: int, seed: int = 0) -> list[Question]:
    """``count`` questions about the seeded catalogue, deterministic for (count, seed)."""
    catalogue = _catalogue(seed)
    rng = random.Random(seed + 1)
    out: list[Question] = []
    for _ in range(count):
        product = rng.choice(_PRODUCTS)
        aisle, price = catalogue[product]
        prompt = rng.choice(_TEMPLATES).format(p=product)
        out.append(Question(product, prompt, f"{product}: aisle {aisle}, {price:.2f} EUR"))
    return out


def rate(question: Question, answer: str) -> tuple[str, str | None]:
    """A simulated user's verdict: ``("up", None)`` for the right line in the right format, else the correction."""
    line = answer.strip().splitlines()[0].strip() if answer.strip() else ""
    if _FORMAT.match(line) and line == question.answer:
        return "up", None
    return "down", question.answer


@dataclass
class UsersOutcome:
    asked: int = 0
    up: int = 0
    down: int = 0
    in_format: int = 0
    feedback_accepted: int = 0
    errors: int = 0

    @property
    def format_rate(self) -> float:
        return self.in_format / self.asked if self.asked else 0.0


def ask_and_rate(
    base_url: str, asked: list[Question], *, max_tokens: int = 32, timeout_s: float = 60.0
) -> UsersOutcome:
    """Ask each question on an agent's local API (``http://127.0.0.1:<port>``), rate the answer, send the rating."""
    outcome = UsersOutcome()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        for question in asked:
            try:
                reply = http.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": question.prompt}],
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                    },
                )
                reply.raise_for_status()
                body: dict[str, Any] = reply.json()
                answer = str(body["choices"][0]["message"]["content"])
                outcome.asked += 1
                rating, correction = rate(question, answer)
                first = answer.strip().splitlines()[0].strip() if answer.strip() else ""
                outcome.in_format += 1 if _FORMAT.match(first) else 0
                outcome.up += rating == "up"
                outcome.down += rating == "down"
                rating_body: dict[str, Any] = {"completion_id": body["id"], "rating": rating}
                if correction is not None:
                    rating_body["correction"] = correction
                sent = http.post("/v1/feedback", json=rating_body)
                outcome.feedback_accepted += sent.status_code < 300
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                outcome.errors += 1
    return outcome


def feedback_records(asked: list[Question], answers: list[str]) -> list[dict[str, Any]]:
    """Rated samples as a curated dataset holds them, for benchmarks that skip the fleet (no device involved)."""
    records: list[dict[str, Any]] = []
    for question, answer in zip(asked, answers, strict=True):
        rating, correction = rate(question, answer)
        records.append(
            {
                "messages": [{"role": "user", "content": question.prompt}],
                "completion": correction if correction is not None else answer,
                "source": {"rating": rating},
            }
        )
    return records
