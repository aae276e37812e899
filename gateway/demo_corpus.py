"""The text the demo tokenizer is trained on, made here from word lists.

Deterministic (a seeded `random.Random`, whose `choice`/`randrange` sequence is stable across
CPython versions) so the trained tokenizer, and hence the demo checkpoint, is the same bytes on
every machine. The text is English-like on purpose: BPE then learns merges for common words,
numbers, punctuation and the `[INST]` chat markers, so prompts to the demo model tokenize into
a realistic number of tokens. The rest of Unicode is covered by the byte-level base alphabet,
not by this corpus.
"""

from __future__ import annotations

import random

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
    "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Zoe", "Ada", "Alan",
    "Marie", "Nikola", "Rosalind", "Emmy", "Kurt", "Linus", "Guido", "Barbara",
)
PLACES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Oslo", "Dublin",
    "Tokyo", "Kyoto", "Seoul", "Delhi", "Cairo", "Lagos", "Nairobi", "Lima", "Quito", "Toronto",
    "Chicago", "Boston", "Denver", "Seattle", "Sydney", "Auckland", "Zürich", "Kraków", "São Paulo",
    "Reykjavík", "the mountains", "the coast", "the village", "the city", "the valley", "the island",
)
ANIMALS = (
    "cat", "dog", "horse", "rabbit", "fox", "owl", "eagle", "whale", "dolphin", "tiger", "lion",
    "bear", "wolf", "mouse", "sparrow", "turtle", "penguin", "elephant", "giraffe", "monkey",
)
THINGS = (
    "book", "letter", "river", "garden", "window", "machine", "computer", "server", "network",
    "model", "cluster", "request", "token", "expert", "router", "engine", "queue", "cache",
    "question", "answer", "story", "song", "picture", "bridge", "train", "ship", "market", "school",
    "library", "kitchen", "table", "chair", "lamp", "clock", "map", "key", "door", "road", "forest",
    "field", "storm", "cloud", "star", "planet", "ocean", "mountain", "festival", "museum", "recipe",
    "problem", "solution", "idea", "plan", "meeting", "report", "program", "function", "variable",
    "number", "result", "experiment", "theory", "language", "poem", "city", "country", "history",
)
ADJECTIVES = (
    "small", "large", "quick", "slow", "bright", "dark", "quiet", "loud", "old", "new", "young",
    "ancient", "modern", "simple", "complex", "happy", "sad", "curious", "careful", "brave", "gentle",
    "strange", "famous", "hidden", "broken", "beautiful", "useful", "difficult", "easy", "important",
    "warm", "cold", "green", "blue", "red", "yellow", "golden", "silver", "wooden", "heavy", "light",
    "fast", "distributed", "sparse", "dense", "efficient", "reliable", "tiny", "enormous", "clever",
)
VERBS = (
    ("sees", "saw"), ("finds", "found"), ("builds", "built"), ("reads", "read"), ("writes", "wrote"),
    ("opens", "opened"), ("closes", "closed"), ("carries", "carried"), ("paints", "painted"),
    ("follows", "followed"), ("answers", "answered"), ("explains", "explained"), ("visits", "visited"),
    ("repairs", "repaired"), ("measures", "measured"), ("sends", "sent"), ("receives", "received"),
    ("computes", "computed"), ("remembers", "remembered"), ("describes", "described"),
    ("likes", "liked"), ("watches", "watched"), ("teaches", "taught"), ("learns", "learned"),
    ("chooses", "chose"), ("routes", "routed"), ("serves", "served"), ("loads", "loaded"),
)
ADVERBS = (
    "quickly", "slowly", "carefully", "quietly", "happily", "suddenly", "finally", "often", "rarely",
    "always", "never", "sometimes", "again", "together", "alone", "today", "yesterday", "tomorrow",
)
CONNECTIVES = ("and", "but", "because", "so", "while", "although", "when", "after", "before", "until")
QUESTIONS = (
    "What is the capital of {place}?", "Who wrote the {adj} {thing}?", "How many {thing}s are there?",
    "Why does the {animal} {verb} the {thing}?", "Can you explain the {thing} to {name}?",
    "Where did {name} find the {adj} {thing}?", "When will the {thing} arrive in {place}?",
    "Tell me a story about a {adj} {animal}.", "Write a short poem about {place}.",
    "What is {a} plus {b}?", "Summarize the {thing} in one sentence.", "Translate 'hello' into French.",
)
UNICODE_BITS = (
    "café", "naïve", "résumé", "über", "jalapeño", "façade", "coöperate", "Ångström", "déjà vu",
    "東京", "北京", "こんにちは", "안녕하세요", "Привет", "Γειά σου", "שלום", "مرحبا", "नमस्ते",
    "🙂", "🚀", "✨", "👍", "—", "…", "“quoted”", "‘single’", "€5", "£3", "¥100", "°C", "±", "×", "÷",
)
PUNCTUATION_ENDINGS = (".", ".", ".", "!", "?", "...", ";", ":")


def _noun_phrase(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(NAMES)
    if kind == 1:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)}"
    if kind == 2:
        return f"a {rng.choice(ADJECTIVES)} {rng.choice(THINGS)}"
    return f"the {rng.choice(THINGS)}"


def _number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(100))
    if kind == 1:
        return str(rng.randrange(100, 100_000))
    if kind == 2:
        return f"{rng.randrange(1000)}.{rng.randrange(100):02d}"
    if kind == 3:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 4:
        return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    return f"{rng.randrange(1, 100)}%"


def _sentence(rng: random.Random) -> str:
    subject = _noun_phrase(rng)
    present, past = rng.choice(VERBS)
    verb = rng.choice((present, past))
    obj = _noun_phrase(rng)
    kind = rng.randrange(7)
    if kind == 0:
        text = f"{subject} {verb} {obj} in {rng.choice(PLACES)}"
    elif kind == 1:
        adverb, connective = rng.choice(ADVERBS), rng.choice(CONNECTIVES)
        text = f"{subject} {adverb} {verb} {obj}, {connective} {_noun_phrase(rng)} " \
               f"{rng.choice(VERBS)[1]} {_noun_phrase(rng)}"
    elif kind == 2:
        text = f"In {rng.randrange(1800, 2030)}, {subject} {verb} {_number(rng)} {rng.choice(THINGS)}s"
    elif kind == 3:
        adjective, thing = rng.choice(ADJECTIVES), rng.choice(THINGS)
        text = f"{subject} said: \"{adjective} {thing}s are {rng.choice(ADJECTIVES)}\""
    elif kind == 4:
        adjective = rng.choice(ADJECTIVES)
        text = f"{subject} ({adjective}) {verb} {obj} at {_number(rng)} - {rng.choice(UNICODE_BITS)}"
    elif kind == 5:
        text = f"{subject}'s {rng.choice(THINGS)} {verb} {obj} {rng.choice(ADVERBS)}"
    else:
        connective = rng.choice(CONNECTIVES)
        text = f"{subject} {verb} {obj} {connective} {_noun_phrase(rng)} {rng.choice(VERBS)[0]} it"
    return text[0].upper() + text[1:] + rng.choice(PUNCTUATION_ENDINGS)


def _question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(
        place=rng.choice(PLACES), adj=rng.choice(ADJECTIVES), thing=rng.choice(THINGS),
        animal=rng.choice(ANIMALS), verb=rng.choice(VERBS)[0].removesuffix("s"), name=rng.choice(NAMES),
        a=rng.randrange(1000), b=rng.randrange(1000),
    )


def _chat_turn(rng: random.Random) -> str:
    """A line in the Mixtral-Instruct format, so `[INST]`/`[/INST]` become a few tokens."""
    answer = " ".join(_sentence(rng) for _ in range(rng.randrange(1, 3)))
    return f"[INST] {_question(rng)} [/INST] {answer}"


def demo_corpus(num_lines: int = 6000, seed: int = 1234) -> list[str]:
    """`num_lines` lines of English-like text, chat turns and code-ish snippets."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 10
        if kind < 6:
            lines.append(" ".join(_sentence(rng) for _ in range(rng.randrange(1, 4))))
        elif kind < 8:
            lines.append(_chat_turn(rng))
        elif kind == 8:
            lines.append(f"{rng.choice(THINGS)}_{rng.randrange(10)} = {_number(rng)}  # {_sentence(rng)}")
        else:
            lines.append(f"{rng.choice(UNICODE_BITS)} {_sentence(rng)} {rng.choice(UNICODE_BITS)}")
    return lines
