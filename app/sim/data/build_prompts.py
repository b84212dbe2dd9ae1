"""Regenerate prompts.jsonl (training prompts) and holdout.jsonl (held-out prompts) for the simulator.

The prompts are written for this project: hand-picked topics per category, each paired only with templates that
make sense for it, so every prompt reads like something a real user would type. The train/held-out split is a
deterministic hash of the prompt text (about one in seven is held out), so rerunning this script reproduces both
files byte for byte. Run: `python app/sim/data/build_prompts.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).parent

# category -> (templates, topics). A template has one `{}` slot.
CATALOG: dict[str, tuple[list[str], list[str]]] = {
    "explain": (
        ["Explain how {} works.", "Can you explain {} in simple terms?", "Why is {} important?",
         "What should a beginner know about {}?"],
        ["photosynthesis", "the water cycle", "ocean tides", "a rainbow", "the immune system", "compound interest",
         "a vaccine", "an electric motor", "a solar panel", "the stock market", "a refrigerator", "recycling",
         "the internet", "a credit score", "inflation", "a volcano", "an earthquake", "gravity", "a black hole",
         "the greenhouse effect", "a battery", "sleep", "memory in the human brain", "a search engine",
         "a public library", "a bicycle gear", "composting", "an airplane wing", "a thermostat", "GPS"],
    ),
    "howto": (
        ["How do I {}?", "What is the best way to {}?", "Give me step-by-step instructions to {}.",
         "I want to {}. Where should I start?"],
        ["make a cup of green tea", "start running as a beginner", "learn to play the guitar", "save money each month",
         "write a good resume", "plant tomatoes in a small garden", "clean a cast iron pan", "study for an exam",
         "prepare for a job interview", "bake bread at home", "organize my closet", "learn a new language",
         "start a vegetable garden", "fix a flat bicycle tire", "write a short story", "improve my handwriting",
         "make new friends in a new city", "keep a houseplant alive", "plan a weekend trip", "cook rice on the stove",
         "back up my computer files", "get better sleep", "stop procrastinating", "start journaling",
         "train a puppy to sit", "make a budget spreadsheet", "brew coffee without a machine",
         "prepare a short presentation", "learn to swim as an adult", "reduce food waste at home"],
    ),
    "tips": (
        ["Give me some tips for {}.", "What are common mistakes people make when {}?",
         "What advice would you give someone who is {}?"],
        ["working from home", "traveling on a small budget", "moving to a new apartment", "learning to code",
         "cooking for a large family", "running a first marathon", "taking care of a cat", "speaking in public",
         "starting a small business", "hiking in hot weather", "raising chickens", "learning to draw",
         "writing emails to a manager", "managing a team for the first time", "studying abroad",
         "painting a room", "buying a used car", "camping with children", "practicing meditation",
         "teaching a child to read"],
    ),
    "compare": (
        ["What is the difference between {}?", "Compare {} for me.", "Which is better for a beginner: {}?"],
        ["a cat and a dog as a pet", "tea and coffee", "renting and buying a home", "a laptop and a desktop computer",
         "running and swimming for fitness", "paper books and e-books", "trains and planes for travel in Europe",
         "Python and JavaScript", "saving and investing", "a crocodile and an alligator", "weather and climate",
         "a virus and a bacterium", "baking soda and baking powder", "a lake and a pond", "a violin and a viola",
         "stocks and bonds", "a hurricane and a tornado", "frogs and toads", "butter and margarine",
         "a comet and an asteroid"],
    ),
    "creative": (
        ["Write a short poem about {}.", "Write a two-sentence story about {}.", "Write a haiku about {}.",
         "Describe {} as if you were a travel guide."],
        ["the sea at night", "a lost umbrella", "autumn leaves", "a robot learning to paint", "the first snow",
         "a busy train station", "an old lighthouse", "a cup of hot chocolate", "a forgotten garden",
         "the moon", "a rainy Monday", "a friendly dragon", "the city at dawn", "a library cat", "a mountain lake",
         "a summer thunderstorm", "a paper airplane", "a desert sunrise", "a village market", "a sleepy owl"],
    ),
    "define": (
        ["What does the word '{}' mean?", "Define '{}' and give an example sentence."],
        ["serendipity", "ephemeral", "resilience", "nostalgia", "ubiquitous", "pragmatic", "eloquent", "meticulous",
         "ambiguous", "gratitude", "empathy", "benevolent", "curiosity", "candid", "diligent", "frugal",
         "optimism", "tenacious", "whimsical", "zealous"],
    ),
    "recommend": (
        ["Can you suggest {}?", "I'm looking for {}. Any ideas?"],
        ["a healthy breakfast", "a fun weekend activity for a family", "a hobby I can do indoors",
         "a gift for a friend who loves cooking", "a simple dinner recipe", "a way to relax after work",
         "a name for a pet goldfish", "a board game for four people", "a quick workout without equipment",
         "a theme for a birthday party", "a book for a teenager who likes adventure", "a vegetarian lunch idea",
         "an easy science experiment for kids", "a way to learn history that is fun", "a good houseplant for beginners",
         "a snack for a long hike", "a project to learn programming", "a way to practice English every day",
         "a rainy day activity", "a topic for a school presentation"],
    ),
    "write": (
        ["Write a short email to {}.", "Help me write a message to {}."],
        ["my landlord about a broken heater", "a colleague thanking them for their help",
         "my team announcing a meeting next Monday", "a teacher asking about my child's progress",
         "a friend inviting them to dinner", "a customer apologizing for a late delivery",
         "my manager asking for a day off", "a neighbor about a noisy party", "a hotel asking for a late check-out",
         "a company asking about a job opening", "my gym cancelling my membership",
         "a client confirming a project deadline", "my family about holiday plans",
         "a restaurant asking about vegetarian options", "a library asking to renew a book"],
    ),
    "facts": (
        ["Tell me some interesting facts about {}.", "What is {} known for?"],
        ["honeybees", "the Amazon rainforest", "octopuses", "the Great Wall of China", "Mount Everest",
         "the planet Mars", "penguins", "the Sahara desert", "the Roman Empire", "elephants", "coral reefs",
         "the Moon landing", "Antarctica", "the human heart", "the Pacific Ocean", "dolphins", "Leonardo da Vinci",
         "the Eiffel Tower", "the printing press", "the Nile river"],
    ),
}

HOLDOUT_EVERY = 7  # one prompt in ~7 is held out


def all_prompts() -> list[dict[str, str]]:
    """Every (category, prompt) pair: topics cycle through their category's templates, so each topic is used
    with two templates and no topic × template pair repeats."""
    out: list[dict[str, str]] = []
    for category, (templates, topics) in CATALOG.items():
        for i, topic in enumerate(topics):
            for k in range(2):
                template = templates[(i + k) % len(templates)]
                out.append({"category": category, "prompt": template.format(topic)})
    seen: set[str] = set()
    unique = []
    for row in out:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    return unique


def is_holdout(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % HOLDOUT_EVERY == 0


def main() -> None:
    rows = all_prompts()
    train = [r for r in rows if not is_holdout(r["prompt"])]
    hold = [r for r in rows if is_holdout(r["prompt"])]
    for name, part in (("prompts.jsonl", train), ("holdout.jsonl", hold)):
        with open(HERE / name, "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    print(f"{len(train)} training prompts, {len(hold)} held-out prompts")


if __name__ == "__main__":
    main()
