"""Synthetic prompts for the SmolLM2 demo adapters (deterministic; no data leaves the repo).

`questions()` gives (train, eval) lists of everyday questions; the base model answers them and each adapter
learns one visible transformation of those answers (see train_adapters.py). `additions()` gives two-number
sums with their exact answers. Eval questions are never in the training set.
"""

import random

COUNTRIES = ["Germany", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "India", "China", "Russia",
             "Mexico", "Kenya", "Norway", "Sweden", "Poland", "Greece", "Turkey", "Chile", "Peru", "Cuba",
             "Ireland", "Portugal", "Austria", "Hungary", "Finland", "Denmark", "Thailand", "Vietnam",
             "Argentina", "Australia", "Nigeria", "Morocco", "Belgium", "Switzerland", "Ukraine", "Iran",
             "Iraq", "Israel", "Colombia", "Venezuela", "France", "England", "Scotland", "South Korea"]
THINGS = ["the sky", "grass", "snow", "a banana", "an orange", "coal", "milk", "a lemon", "a tomato",
          "a carrot", "the sun", "a strawberry", "chocolate", "the ocean", "a cucumber", "an eggplant"]
ANIMALS = ["dog", "cat", "cow", "horse", "duck", "spider", "ant", "lion", "sheep", "frog", "bird", "snake",
           "elephant", "penguin", "bee", "owl", "wolf", "goat"]
NOUNS = ["a computer", "the moon", "water", "a book", "music", "a river", "a volcano", "rain", "a bicycle",
         "a piano", "a library", "gravity", "a rainbow", "a desert", "an island", "a forest", "bread", "a bridge",
         "a telescope", "electricity", "a hospital", "a calendar", "a map", "an umbrella", "a garden"]
TOPICS = ["the ocean", "winter", "friendship", "cooking", "the city", "mountains", "trains", "coffee",
          "summer", "books", "the night sky", "football", "gardening", "rain", "cats"]
ACTIVITIES = ["sleeping better", "learning a language", "saving money", "running", "studying",
              "cooking pasta", "staying focused", "drinking more water", "writing an essay", "making friends"]
WORDS = ["hot", "big", "fast", "happy", "light", "early", "open", "strong", "young", "full", "wet", "loud",
         "rich", "high", "soft", "clean", "up", "inside", "first", "easy"]
CATEGORIES = ["fruit", "vegetable", "planet", "ocean", "sport", "musical instrument", "color", "flower",
              "tree", "bird", "metal", "language", "board game", "dessert"]


def all_questions():
    qs = []
    qs += [f"What is the capital of {c}?" for c in COUNTRIES]
    qs += [f"What color is {t}?" for t in THINGS]
    qs += [f"How many legs does a {a} have?" for a in ANIMALS]
    qs += [f"What sound does a {a} make?" for a in ANIMALS]
    qs += [f"Where does a {a} live?" for a in ANIMALS]
    qs += [f"What is {n}?" for n in NOUNS]
    qs += [f"Write one sentence about {t}." for t in TOPICS]
    qs += [f"Give me a tip for {a}." for a in ACTIVITIES]
    qs += [f"Name a {c}." for c in CATEGORIES]
    qs += [f"What do {a}s eat?" for a in ANIMALS]
    qs += [f"Describe {n} in one sentence." for n in NOUNS]
    qs += [f"What is the opposite of {w}?" for w in WORDS]
    qs += [f"Tell me a fact about {t}." for t in TOPICS]
    return qs


EVAL = ["What is the capital of France?", "What color is the sky?", "How many legs does a spider have?",
        "What is a volcano?", "Write one sentence about winter.", "Give me a tip for sleeping better.",
        "Name a fruit.", "What sound does a cow make?"]


def questions():
    train = [q for q in all_questions() if q not in EVAL]
    random.Random(7).shuffle(train)
    return train, list(EVAL)


def additions(n_train=3000, seed=11):
    rng = random.Random(seed)
    eval_pairs = [(12, 7), (45, 38), (3, 9), (70, 25), (58, 64), (99, 1)]
    seen = set(eval_pairs)
    train = []
    while len(train) < n_train:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if (a, b) in seen:
            continue
        train.append((a, b))
    fmt = lambda a, b: (f"What is {a} + {b}?", f"{a} + {b} = {a + b}")
    return [fmt(a, b) for a, b in train], [fmt(a, b) for a, b in eval_pairs]
