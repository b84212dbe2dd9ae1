"""The example raters encode the preferences their docstrings claim, and only those."""

from __future__ import annotations

from pathlib import Path

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


def test_every_rater_is_documented_and_returns_bool_or_none():
    assert set(raters.EXAMPLE_RATERS) == {"concise", "bullets", "examples"}
    for name, fn in raters.RATERS.items():
        assert fn.__doc__ and len(fn.__doc__) > 40, name
        for prompt, answer in [("Explain tides.", "short"), ("Write a haiku about rain.", "- a\n- b\n- c"),
                               ("How?", words(300))]:
            assert fn(prompt, answer) in (True, False, None)


def test_development_and_heldout_raters_each_cover_every_kind_and_never_overlap():
    kinds = {"format", "content", "style", "length"}
    assert set(raters.KIND) == set(raters.RATERS) and set(raters.KIND.values()) == kinds
    assert {raters.KIND[n] for n in raters.DEVELOPMENT_RATERS} == kinds
    assert {raters.KIND[n] for n in raters.HELDOUT_RATERS} == kinds
    assert not set(raters.DEVELOPMENT_RATERS) & set(raters.HELDOUT_RATERS)
    assert raters.EXAMPLE_RATERS.items() <= raters.DEVELOPMENT_RATERS.items()
    tables = (Path(__file__).resolve().parents[2] / "docs" / "experiments" / "simulator.md").read_text()
    for name in raters.RATERS:  # the simulator page's rater tables document each one
        assert f"| `{name}` |" in tables, name


def test_bold_terms_and_analogy():
    assert raters.bold_terms("q", "Use **flour** and **water**.") is True
    assert raters.bold_terms("q", "Use **flour** and water.") is False
    assert raters.analogy("Explain DNS.", "DNS is like a phone book for the internet.") is True
    assert raters.analogy("Explain DNS.", "Imagine a library index.") is True
    assert raters.analogy("Explain DNS.", "DNS maps names to addresses.") is False
    assert raters.analogy("Write a haiku about rain.", "like a drum") is None


def test_short_sentences_medium_and_thorough_lengths():
    assert raters.short_sentences("q", "Short one. Another short one! Fine?") is True
    assert raters.short_sentences("q", words(15) + ".") is False
    assert raters.short_sentences("q", words(14) + ".") is True
    assert raters.short_sentences("q", "") is False
    assert [raters.medium("q", words(n)) for n in (39, 40, 120, 121)] == [False, True, True, False]
    assert [raters.thorough("q", words(n)) for n in (89, 90)] == [False, True]


def test_plain_dislikes_any_markdown():
    assert raters.plain("q", "Just words, with 3 numbers and a dash - inside.") is True
    for marked in ["Use **bold**.", "# Title\ntext", "Run `ls`.", "- one\n- two", "1. first", "| a | b |"]:
        assert raters.plain("q", marked) is False, marked
    assert raters.plain("q", "  ") is False


def test_opens_with_answer_numbers_and_second_person():
    assert raters.opens_with_answer("Why?", "Because of gravity.\n\nIn more detail, mass bends space.") is True
    assert raters.opens_with_answer("Why?", "Because of gravity. Also mass.\n\nMore.") is False  # two sentences
    assert raters.opens_with_answer("Why?", "Because of gravity.") is False  # no details after it
    assert raters.opens_with_answer("Why?", words(26) + ".\n\nMore.") is False
    assert raters.numbers("How far?", "About 384,400 km.") is True
    assert raters.numbers("How?", "1. Mix\n2. Bake") is False  # list numbering is no figure
    assert raters.numbers("Write a haiku about rain.", "3 drops") is None
    assert raters.second_person("q", "You can do it; your plan works if you try.") is True
    assert raters.second_person("q", "You can do it; the plan works.") is False


def test_caveat_one_paragraph_first_person_and_few_sentences():
    assert raters.caveat("q", "Water boils at 100 °C; however, less at altitude.") is True
    assert raters.caveat("q", "Keep in mind the dough must rest.") is True
    assert raters.caveat("q", "Water boils at 100 °C.") is False
    assert raters.caveat("q", "The howevers of life.") is False  # whole words only
    assert raters.one_paragraph("q", "  One block of text. Still one.  \n") is True
    assert raters.one_paragraph("q", "First.\nSecond.") is False
    assert raters.one_paragraph("q", "   ") is False
    assert raters.first_person("q", "I think my answer helps.") is True
    assert raters.first_person("q", "I think it helps.") is False  # once is not enough
    assert raters.first_person("q", "Imagine mines.") is False  # "I" as a word, not a letter
    assert raters.few_sentences("Why?", "One. Two! Three?") is True
    assert raters.few_sentences("Why?", "One. Two. Three. Four.") is False
    assert raters.few_sentences("Why?", "- a\n- b\n- c\n- d") is False  # list items count as sentences
    assert raters.few_sentences("Why?", "") is False
    assert raters.few_sentences("Write a haiku about rain.", "Rain.") is None
