"""Simulated shop users: deterministic questions, and ratings that reward only the shop's exact one-line answer."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from slmops.sim.users import ANSWER_FORMAT, feedback_records, questions, rate


def test_questions_are_deterministic_and_their_answers_have_the_format() -> None:
    first, again = questions(50, seed=3), questions(50, seed=3)

    assert first == again and questions(50, seed=4) != first
    assert all(re.match(ANSWER_FORMAT, q.answer) for q in first)


def test_only_the_exact_line_is_rated_up_and_everything_else_is_corrected() -> None:
    question = questions(1, seed=0)[0]

    assert rate(question, question.answer + "\nanything after the first line") == ("up", None)
    assert rate(question, question.answer.upper()) == ("down", question.answer)
    assert rate(question, "") == ("down", question.answer)
    records = feedback_records([question, question], [question.answer, "no idea"])
    assert [r["completion"] for r in records] == [question.answer, question.answer]
    assert [r["source"]["rating"] for r in records] == ["up", "down"]


@given(st.text(max_size=200))
def test_any_answer_gets_a_rating_and_a_wrong_one_a_correction(answer: str) -> None:
    question = questions(1, seed=1)[0]
    rating, correction = rate(question, answer)
    assert (rating == "up") == (correction is None)
