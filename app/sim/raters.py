"""Simulated users for `kto-loop simulate`: `rate(prompt, answer) -> True | False | None` (None: would not rate).

Each encodes a preference the base model mostly does not satisfy; `HELDOUT_RATERS` are never used for tuning, so
a recipe's result on them is an honest one. Write your own: any importable `module:function` or
`path/to/file.py:function` with the same signature. Preferences and base rates: docs/experiments/simulator.md.
"""

from __future__ import annotations

import re

CONCISE_MAX_WORDS = 60
BULLETS_MIN_ITEMS = 3
SHORT_SENTENCE_WORDS = 14
MEDIUM_WORDS = (40, 120)
SECOND_PERSON_MIN = 3
THOROUGH_MIN_WORDS = 90
FEW_SENTENCES_MAX = 3
FIRST_PERSON_MIN = 2

_LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+\S")
_EXAMPLE = re.compile(r"\b(?:for example|for instance|e\.g\.|such as)", re.IGNORECASE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*")
_ANALOGY = re.compile(r"\b(?:like an?|similar to|think of (?:it|this|them) as|imagine|just as|analog(?:y|ous))\b",
                      re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
_MARKUP = re.compile(r"[*#`|]|^\s*(?:[-*•+]|\d{1,2}[.)])\s", re.MULTILINE)
_NUMBERED_ITEM = re.compile(r"^\s*\d{1,2}[.)]\s+", re.MULTILINE)
_DIGIT = re.compile(r"\d")
_YOU = re.compile(r"\byou(?:r|rs|rself|'re|'ll|'ve|'d)?\b", re.IGNORECASE)
_CAVEAT = re.compile(r"\b(?:however|although|keep in mind|note that|it depends|may vary|not always|be careful)\b",
                     re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|I'll|my|me)\b")
_CREATIVE = re.compile(r"^(?:write a (?:short poem|haiku|two-sentence story)|describe .* travel guide)",
                       re.IGNORECASE)


def word_count(text: str) -> int:
    return len(text.split())


def list_items(text: str) -> int:
    """Lines that start like a Markdown bullet or a numbered item."""
    return sum(1 for line in text.splitlines() if _LIST_ITEM.match(line))


def concise(prompt: str, answer: str) -> bool | None:
    """Length preference: likes answers of at most 60 words (and not empty). Base SmolLM2 rambles, often until
    the token limit, so most of its answers get a thumbs-down."""
    n = word_count(answer)
    return 0 < n <= CONCISE_MAX_WORDS


def bullets(prompt: str, answer: str) -> bool | None:
    """Format preference: likes answers laid out as a list of at least 3 items. Does not rate creative requests
    (poems, stories), where a list makes no sense — a real user skips those, so the rater returns None."""
    if _CREATIVE.match(prompt.strip()):
        return None
    return list_items(answer) >= BULLETS_MIN_ITEMS


def examples(prompt: str, answer: str) -> bool | None:
    """Content preference: likes answers that name concrete examples ("for example", "for instance", "e.g.",
    "such as ..."). The base model mostly explains in the abstract: about one answer in seven does this."""
    return bool(_EXAMPLE.search(answer))


def bold_terms(prompt: str, answer: str) -> bool | None:
    """Format preference: likes answers that mark their key terms in **bold**, at least two of them, so a skimming
    reader finds them."""
    return len(_BOLD.findall(answer)) >= 2


def analogy(prompt: str, answer: str) -> bool | None:
    """Content preference: likes answers that explain through an analogy ("like a", "similar to", "imagine", "think
    of it as"). Creative requests are not rated: an analogy is no help in a poem."""
    if _CREATIVE.match(prompt.strip()):
        return None
    return bool(_ANALOGY.search(answer))


def sentences(text: str) -> list[str]:
    """Sentences split at . ! ? followed by a space or the end; list items count as sentences."""
    return [s for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def short_sentences(prompt: str, answer: str) -> bool | None:
    """Style preference: likes plain, short sentences, at most 14 words on average, whatever the answer's length."""
    parts = sentences(answer)
    return bool(parts) and sum(map(word_count, parts)) / len(parts) <= SHORT_SENTENCE_WORDS


def medium(prompt: str, answer: str) -> bool | None:
    """Length preference with two edges: likes 40 to 120 words, neither a one-liner nor an essay."""
    return MEDIUM_WORDS[0] <= word_count(answer) <= MEDIUM_WORDS[1]


def plain(prompt: str, answer: str) -> bool | None:
    """Format preference that most base answers already meet: dislikes Markdown (bold, headings, code, lists,
    tables), which a plain-text client shows as stray symbols; the case where only a few answers are disliked."""
    return bool(answer.strip()) and not _MARKUP.search(answer)


def opens_with_answer(prompt: str, answer: str) -> bool | None:
    """Format preference: likes a one-line answer first (at most 25 words, one sentence), then a blank line, then the
    details, so the reader gets the point before the explanation. Creative requests are not rated."""
    if _CREATIVE.match(prompt.strip()):
        return None
    head, sep, rest = answer.strip().partition("\n\n")
    return bool(sep and rest.strip()) and "\n" not in head and word_count(head) <= 25 and len(sentences(head)) == 1


def numbers(prompt: str, answer: str) -> bool | None:
    """Content preference: likes answers that give a concrete figure (a date, a quantity, a measurement), not only
    words; list numbering does not count. Creative requests are not rated."""
    if _CREATIVE.match(prompt.strip()):
        return None
    return bool(_DIGIT.search(_NUMBERED_ITEM.sub("", answer)))


def second_person(prompt: str, answer: str) -> bool | None:
    """Style preference: likes answers that talk to the reader ("you", "your") at least three times rather than
    lecturing in the abstract."""
    return len(_YOU.findall(answer)) >= SECOND_PERSON_MIN


def thorough(prompt: str, answer: str) -> bool | None:
    """Length preference most base answers already meet: likes answers of at least 90 words, dislikes short ones."""
    return word_count(answer) >= THOROUGH_MIN_WORDS


def caveat(prompt: str, answer: str) -> bool | None:
    """Content preference: likes answers that state a limit or a caution ("however", "although", "keep in mind",
    "note that", "it depends", "may vary", "not always", "be careful") instead of only asserting."""
    return bool(_CAVEAT.search(answer))


def one_paragraph(prompt: str, answer: str) -> bool | None:
    """Format preference: likes an answer in one block of text, no line breaks (a chat bubble, not a document)."""
    text = answer.strip()
    return bool(text) and "\n" not in text


def first_person(prompt: str, answer: str) -> bool | None:
    """Style preference: likes an assistant that speaks for itself ("I", "my", "me") at least twice, rather than an
    impersonal text."""
    return len(_FIRST_PERSON.findall(answer)) >= FIRST_PERSON_MIN


def few_sentences(prompt: str, answer: str) -> bool | None:
    """Length preference counted in sentences, not words: likes answers of at most three sentences (list items count
    as sentences). Creative requests are not rated."""
    if _CREATIVE.match(prompt.strip()):
        return None
    n = len(sentences(answer))
    return 0 < n <= FEW_SENTENCES_MAX


EXAMPLE_RATERS = {"concise": concise, "bullets": bullets, "examples": examples}
DEVELOPMENT_RATERS = {**EXAMPLE_RATERS, "bold_terms": bold_terms, "analogy": analogy,
                      "short_sentences": short_sentences, "medium": medium, "plain": plain,
                      "opens_with_answer": opens_with_answer, "numbers": numbers}
"""`opens_with_answer` and `numbers` were held out until recipes were compared on them (2026-12-06): now develop."""
HELDOUT_RATERS = {"caveat": caveat, "one_paragraph": one_paragraph, "first_person": first_person,
                  "few_sentences": few_sentences, "second_person": second_person, "thorough": thorough}
"""Never used to tune a recipe: results on these are the ones that say how the product does on unseen preferences."""
RATERS = {**DEVELOPMENT_RATERS, **HELDOUT_RATERS}
KIND = {"concise": "length", "bullets": "format", "examples": "content", "bold_terms": "format",
        "analogy": "content", "short_sentences": "style", "medium": "length", "plain": "format",
        "opens_with_answer": "format", "numbers": "content", "second_person": "style", "thorough": "length",
        "caveat": "content", "one_paragraph": "format", "first_person": "style", "few_sentences": "length"}
