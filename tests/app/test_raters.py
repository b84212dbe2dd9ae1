"""The example raters encode the preferences their docstrings claim, and only those."""

from __future__ import annotations

import pytest

from app.sim import raters


def words(n: int) -> str:
    return " ".join(["word"] * n)


def test_concise_threshold_is_sixty_words():
    assert raters.concise("q", words(60)) is True
    assert raters.concise("q", words(61)) is False
    assert raters.concise("q", "") is False
    assert raters.concise("q", "   \n ") is False


def test_bullets_counts_dash_star_and_numbered_items():
    three = "Here you go:\n- one\n* two\n3. three\nThat's it."
    assert raters.list_items(three) == 3
    assert raters.bullets("How do I bake bread?", three) is True
    assert raters.bullets("How do I bake bread?", "- one\n- two\nplain text") is False
    # a dash inside a sentence or a bare number is not a list item
    assert raters.list_items("It was 3 - 2 in the end.\n2020 was long.\n-no space") == 0


@pytest.mark.parametrize("prompt", ["Write a short poem about the moon.", "Write a haiku about rain.",
                                    "Write a two-sentence story about a cat.",
                                    "Describe a desert sunrise as if you were a travel guide."])
def test_bullets_skips_creative_requests(prompt):
    assert raters.bullets(prompt, "- a\n- b\n- c") is None


@pytest.mark.parametrize("answer,expected", [
    ("Tides rise twice a day. For example, in Brest the range is 7 m.", True),
    ("Use a sieve (e.g. a fine mesh one).", True),
    ("for instance, a cat.", True),
    ("Citrus fruits such as lemons and limes are sour.", True),
    ("This is an exemplary answer with no illustration.", False),
    ("Tides rise and fall twice a day.", False),
])
def test_examples_looks_for_a_concrete_illustration(answer, expected):
    assert raters.examples("Explain tides.", answer) is expected


def test_every_example_rater_is_documented_and_returns_bool_or_none():
    assert set(raters.EXAMPLE_RATERS) == {"concise", "bullets", "examples"}
    for name, fn in raters.EXAMPLE_RATERS.items():
        assert fn.__doc__ and len(fn.__doc__) > 40, name
        for prompt, answer in [("Explain tides.", "short"), ("Write a haiku about rain.", "- a\n- b\n- c"),
                               ("How?", words(300))]:
            assert fn(prompt, answer) in (True, False, None)
