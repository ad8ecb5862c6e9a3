"""The arithmetic verifier: stated calculations (symbols, words, percentages, units, chains) are computed again
exactly and compared with the stated result; numbers that are not calculations (dates, versions, ranges, list
numbering, times, phone numbers) never raise an alarm."""

import pytest

from token_clean_trainer.purge_mix.verify.arithmetic import find_calculations, verify_arithmetic
from token_clean_trainer.purge_mix.verify.base import FAILED, NOT_APPLICABLE, PASSED

SOURCES = [{"instruction": "What is 3 + 4?", "response": "7"}, {"instruction": "hi", "response": "hello"}]


def _pair(response: str, instruction: str = "Work out the numbers.") -> dict[str, str]:
    return {"instruction": instruction, "response": response}


@pytest.mark.parametrize(
    "text",
    [
        "3 + 4 = 7",
        "12 * 3 is 36.",
        "2^10 = 1024",
        "2 ** 10 = 1024",
        "15% of 200 is 30",
        "The sum of 3 and 4 is 7.",
        "(5 + 3) / 2 = 4",
        "(5 + 3) / 2 = 8 / 2 = 4",
        "three plus four equals seven",
        "5 km + 3 km = 8 km",
        "$5 + $3 = $8",
        "0.1 + 0.2 = 0.3",
        "2/3 = 0.67",
        "2/3 = 0.6",  # truncated to the stated decimals
        "The square root of 2 is approximately 1.41.",
        "10 / 3 is approximately 3.3",
        "22/7 ≈ 3.14",
        "The square root of 16 is 4.",
        "the product of 3, 4 and 5 is 60",
        "the difference between 10 and 4 is 6",
        "the average of 2, 4 and 6 is 4",
        "3 squared is 9",
        "12 divided by 4 is 3",
        "5 x 5 = 25",
        "1/4 = 25%",
        "**3 + 4 = 7**",
    ],
)
def test_right_calculations_are_found_and_pass(text):
    calculations = find_calculations(text)
    assert calculations and all(c["ok"] for c in calculations), calculations


@pytest.mark.parametrize(
    "text, computed",
    [
        ("3 + 4 = 8", "7"),
        ("12 * 3 is 35.", "36"),
        ("2^10 = 1000", "1024"),
        ("15% of 200 is 35", "30"),
        ("the sum of 3 and 4 is 8", "7"),
        ("(5 + 3) / 2 = 8 / 2 = 5", "4"),
        ("three plus four is eight", "7"),
        ("2/3 = 0.5", "0.6666666667 (2/3)"),
        ("5 km + 3 km = 9 km", "8"),
        ("The square root of 2 is 1.5.", "1.414213562"),  # neither rounded nor truncated
        ("2^4000 = 2^4000 + 1", "1.318204093e+1204"),  # exact, however large
        ("10 / 4 = 2", "2.5 (5/2)"),
    ],
)
def test_wrong_calculations_fail(text, computed):
    wrong = [c for c in find_calculations(text) if not c["ok"]]
    assert len(wrong) == 1 and wrong[0]["computed"] == computed


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11 is 25% faster than Python 3.10.",
        "Python 3.11 - 3.10 is 1 release apart.",
        "Pages 1-5 are the introduction, 6-10 the method.",
        "1. Install the package.\n2. Run it.\n3. Read the report.",
        "Step 2: open the file. Step 3 is the last.",
        "The meeting is at 10:30 and lasts 2 hours.",
        "The screen is 16:9.",
        "Call 555-123-4567 or +1 555 123 4567.",
        "On 2024-05-01, and again on 12/25/2023, the store opened.",
        "We offer 24/7 support; 24/7 is our promise.",
        "From 1990 - 2000 is a decade of growth.",
        "Version 2.0.1 is out; version 2 + fixes is 2.1.",
        "Is 3 + 4 = 8?",
        "Check whether 2^10 = 1000?",
        "3 + 4 is not 8.",
        "Python 3 is 2 times faster.",
        "Use `3 + 4 = 8` in the test.\n```python\nassert 3 + 4 == 8\n```",
    ],
)
def test_numbers_that_are_not_calculations_raise_no_alarm(text):
    assert [c for c in find_calculations(text) if not c["ok"]] == []


def test_verdicts():
    wrong = verify_arithmetic(_pair("First, 12 * 3 = 36. Then 36 + 4 = 41."), SOURCES)
    assert wrong.verifier == "arithmetic" and wrong.status == FAILED
    assert '"36 + 4 = 41"' in wrong.reason and "36 + 4 = 40" in wrong.reason and "not 41" in wrong.reason
    assert [c["ok"] for c in wrong.details["calculations"]] == [True, False]

    right = verify_arithmetic(_pair("15% of 200 is 30, so the rest is 170."), SOURCES)
    assert right.status == PASSED and right.reason == ""
    assert right.details["calculations"][0]["expression"] == "15% of 200"

    # The instruction is checked too: a premise with wrong arithmetic is a defect.
    premise = verify_arithmetic(_pair("Half of it.", instruction="Since 2 + 2 = 5, what is half of 5?"), SOURCES)
    assert premise.status == FAILED and premise.reason.startswith("the instruction states")

    none = verify_arithmetic(_pair("Python 3.11 was released in 2022; see pages 1-5."), SOURCES)
    assert none.status == NOT_APPLICABLE and none.details == {"calculations": []}


def test_huge_powers_and_division_by_zero_are_not_computed():
    assert find_calculations("9^9^9 = 1") == []
    assert find_calculations("10^100000 = 5") == []
    assert find_calculations("1 / 0 = 5") == []
