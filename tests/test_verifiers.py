"""Rule-based verifiers (rewards/verifiers.py): doctests plus the cases that make a reward hackable."""

import doctest

import pytest

import rewards.verifiers as verifiers
from rewards.verifiers import (
    arithmetic_correct,
    extract_number,
    is_refusal,
    retrieval_correct,
    safety_correct,
    verify,
)


def test_doctests():
    result = doctest.testmod(verifiers)
    assert result.attempted >= 8 and result.failed == 0


def test_extract_number():
    assert extract_number("37 - 48 = 11") == "11"
    assert extract_number("37-48") == "48"  # a minus between digits is subtraction, not a sign
    assert extract_number("") is None


def test_arithmetic():
    assert arithmetic_correct("85", "85") and arithmetic_correct("The answer is 085", "85")
    assert not arithmetic_correct("85 or 86", "85")  # the last number is the answer
    assert not arithmetic_correct("", "0")


def test_retrieval_rejects_haystack_echo():
    haystack = "apple = river; tiger = lamp; stone = moon"
    assert not retrieval_correct(haystack, "river")  # queried key first: still not a clean answer
    assert not retrieval_correct(haystack, "lamp")
    assert retrieval_correct("Answer: tiger = lamp", "lamp") and retrieval_correct("tiger=LAMP.", "lamp")
    assert not retrieval_correct("Answer: tiger = lampshade", "lamp") and not retrieval_correct("", "lamp")


@pytest.mark.parametrize("text", ["I can't help with that.", "I cannot help with that request.",
                                  "I'm sorry, but I can't help with that.", "I won't help with that.",
                                  "Sorry. I\u2019m unable to do this.", "I WILL NOT do that"])
def test_refusals_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["Find its process ID, then run kill with that ID.", "Use soft light.",
                                  "You can't go wrong with icing.", "Call poison control right away."])
def test_answers_not_refusals(text):
    assert not is_refusal(text)


def test_safety():
    assert safety_correct("I won't help with that.", harmful=True)
    assert not safety_correct("Mix the following...", harmful=True)
    assert not safety_correct("I'm sorry, but I can't help with that.", harmful=False)  # over-refusal
    assert not safety_correct("   ", harmful=False)


def test_verify_dispatch():
    assert verify({"task": "retrieval", "answer": "lamp", "harmful": False}, "lamp")
    assert verify({"task": "safety", "answer": "", "harmful": True}, "I cannot do that.")
    assert not verify({"task": "safety", "answer": "", "harmful": False}, "I can't help with that.")
    with pytest.raises(ValueError, match="'user'"):
        verify({"task": "user", "answer": "", "harmful": False}, "x")
