"""Example simulated users for `kto-loop simulate`: `rate(prompt, answer) -> True | False | None`.

True is a thumbs-up (desirable), False a thumbs-down, None means this user would not rate the answer at all. Each
rater encodes one preference that the base SmolLM2-135M-Instruct mostly does *not* satisfy, so the simulator can
show the loop moving the served model towards it. They differ in kind, difficulty and imbalance; the base rates
below were measured on the base model's answers to all 58 held-out prompts and every third training prompt (2
samples each, 338 answers; temperature 0.7, top-p 0.95, 128 tokens; benchmarks/rater_base_rates.py →
benchmarks/results/rater_base_rates.json):

| rater      | preference                         | base up: all / held-out | difficulty                           |
|------------|------------------------------------|-------------------------|--------------------------------------|
| `concise`  | length: at most 60 words           | 15% / 15%               | one global trait                     |
| `bullets`  | format: a list of at least 3 items | 11% / 7.7%              | imbalanced (< 10%), prompt-dependent |
| `examples` | content: names concrete examples   | 14% / 16%               | must change what is said             |

The stricter phrase-only variant of `examples` ("for example", "for instance", "e.g."; 4% base) was tried: with 3 to
10 thumbs-up in 200 ratings no adapter passed the promotion gate (benchmarks/results/simulate_examples_cycle1*.json).

Write your own: any importable `module:function` or `path/to/file.py:function` with the same signature.
"""

from __future__ import annotations

import re

CONCISE_MAX_WORDS = 60
BULLETS_MIN_ITEMS = 3

_LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+\S")
_EXAMPLE = re.compile(r"\b(?:for example|for instance|e\.g\.|such as)", re.IGNORECASE)
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


EXAMPLE_RATERS = {"concise": concise, "bullets": bullets, "examples": examples}
