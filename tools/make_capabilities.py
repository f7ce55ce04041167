"""Write mechfix's built-in capability suite (mechfix/data/capabilities/*.jsonl).

Run once by the developers; the JSONL files are what ships. Every task has 60
items: verify measures items whose index is not a multiple of 3 (40), steer's
budget the others (20), so that verify's capability gate is measured on items
steer never chose on. Each item is a prompt, its answer and distractors, all
options written as continuations (leading space).

    python tools/make_capabilities.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "mechfix" / "data" / "capabilities"
N = 60

WORDS = ["lantern", "harbour", "violet", "pepper", "meadow", "copper", "falcon", "marble", "willow", "thunder",
         "candle", "orchid", "saddle", "glacier", "pebble", "compass", "walnut", "feather", "anchor", "velvet",
         "cactus", "ribbon", "tunnel", "biscuit", "dolphin", "maple", "silver", "basket", "crystal", "garden",
         "rocket", "pillow", "island", "mirror", "parrot", "button", "canyon", "helmet", "lemon", "forest"]
PLACES = ["blue door", "garden gate", "storage room", "back office", "old safe", "music room", "bike shed",
          "top drawer", "cellar", "north tower"]
FILLERS = [
    "Later that day, Mia walked to the shop and bought some bread.",
    "The weather stayed grey all afternoon, and nobody went outside.",
    "After lunch, the team met to talk about the new timetable.",
    "Tom made a cup of tea and read the newspaper for a while.",
    "The train was late again, so everyone waited on the platform.",
    "In the evening it started to rain, softly at first.",
]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
FRUITS = ["apples", "pears", "grapes", "cherries", "plums", "bananas", "peaches", "melons", "oranges", "lemons"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Dublin", "Prague", "Oslo", "Athens"]


def _others(rng: random.Random, pool: list[str], avoid: set[str], k: int) -> list[str]:
    return rng.sample([w for w in pool if w not in avoid], k)


def retrieval_prose(rng: random.Random) -> list[dict]:
    items = []
    for i in range(N):
        filler = " ".join(rng.sample(FILLERS, 2))
        if i % 2 == 0:
            place, word = rng.choice(PLACES), rng.choice(WORDS)
            prompt = f"The password for the {place} is {word}. {filler} The password for the {place} is"
            answer, wrong = word, _others(rng, WORDS, {word}, 3)
        else:
            num = rng.randint(10, 99)
            prompt = f"Please remember that the locker number is {num}. {filler} The locker number is"
            answer = str(num)
            wrong = [str(x) for x in rng.sample([x for x in range(10, 100) if x != num], 3)]
        items.append({"prompt": prompt, "answer": " " + answer, "distractors": [" " + w for w in wrong]})
    return items


def retrieval_dialogue(rng: random.Random) -> list[dict]:
    items = []
    for i in range(N):
        a, b, c = rng.sample(NAMES, 3)
        kind = i % 3
        if kind == 0:
            c1, c2 = rng.sample(COLOURS, 2)
            prompt = (f"{a}: My favourite colour is {c1}.\n{b}: Mine is {c2}.\n{c}: Sorry, {a}, what did you say?\n"
                      f"{a}: My favourite colour is")
            answer, wrong = c1, [c2, *_others(rng, COLOURS, {c1, c2}, 2)]
        elif kind == 1:
            word = rng.choice(WORDS)
            prompt = (f"{a}: Today's code word is {word}.\n{b}: Thanks, noted.\n{c}: I missed that. What is the code word?\n"
                      f"{a}: The code word is")
            answer, wrong = word, _others(rng, WORDS, {word}, 3)
        else:
            f1, f2 = rng.sample(FRUITS, 2)
            city = rng.choice(CITIES)
            prompt = (f"{a}: I am taking the train to {city} tomorrow.\n{b}: I am staying at home and buying {f1}.\n"
                      f"{c}: {a}, where are you going?\n{a}: I am taking the train to")
            answer, wrong = city, _others(rng, CITIES, {city}, 3)
        items.append({"prompt": prompt, "answer": " " + answer, "distractors": [" " + w for w in wrong]})
    return items


# (prompt, answer, distractors): common knowledge a small base model has seen many times.
FACTS = [
    ("The sun rises in the", "east", ["west", "north"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf"]),
    ("A baby dog is called a", "puppy", ["kitten", "foal"]),
    ("The colour of grass is", "green", ["blue", "red"]),
    ("The colour of the clear sky on a sunny day is", "blue", ["green", "brown"]),
    ("There are seven days in a", "week", ["month", "year"]),
    ("There are twelve months in a", "year", ["week", "day"]),
    ("Water freezes into", "ice", ["sand", "glass"]),
    ("Bees make", "honey", ["milk", "silk"]),
    ("Cows give us", "milk", ["honey", "wool"]),
    ("Sheep give us", "wool", ["milk", "honey"]),
    ("The opposite of hot is", "cold", ["warm", "tall"]),
    ("The opposite of up is", "down", ["left", "over"]),
    ("The opposite of day is", "night", ["week", "sun"]),
    ("The opposite of black is", "white", ["red", "dark"]),
    ("The opposite of big is", "small", ["tall", "wide"]),
    ("We see with our", "eyes", ["ears", "hands"]),
    ("We hear with our", "ears", ["eyes", "feet"]),
    ("Fish live in", "water", ["trees", "sand"]),
    ("Birds have", "feathers", ["scales", "fur"]),
    ("The largest ocean on Earth is the", "Pacific", ["Indian", "Arctic"]),
    ("The planet we live on is called", "Earth", ["Mars", "Venus"]),
    ("The closest star to the Earth is the", "Sun", ["Moon", "Mars"]),
    ("Ice cream is usually", "cold", ["hot", "loud"]),
    ("A triangle has three", "sides", ["wheels", "legs"]),
    ("Christmas is celebrated in the month of", "December", ["July", "April"]),
    ("The first month of the year is", "January", ["March", "October"]),
    ("The capital of the United Kingdom is", "London", ["Manchester", "Liverpool"]),
    ("The capital of Russia is", "Moscow", ["Kiev", "Minsk"]),
    ("The capital of Greece is", "Athens", ["Sparta", "Crete"]),
    ("The capital of Ireland is", "Dublin", ["Cork", "Belfast"]),
    ("The capital of Portugal is", "Lisbon", ["Porto", "Faro"]),
    ("The capital of China is", "Beijing", ["Shanghai", "Tokyo"]),
    ("People in France speak", "French", ["German", "Dutch"]),
    ("People in Germany speak", "German", ["French", "Spanish"]),
    ("People in Italy speak", "Italian", ["German", "Greek"]),
    ("People in Japan speak", "Japanese", ["Chinese", "Korean"]),
    ("The Statue of Liberty is in New", "York", ["Jersey", "Orleans"]),
    ("Romeo and Juliet was written by William", "Shakespeare", ["Wordsworth", "Blake"]),
    ("The Eiffel Tower is in", "Paris", ["London", "Rome"]),
    ("The Colosseum is in", "Rome", ["Paris", "Madrid"]),
    ("The Great Wall is in", "China", ["India", "Egypt"]),
    ("A spider has eight", "legs", ["wings", "eyes"]),
    ("A car has four", "wheels", ["wings", "doors"]),
    ("A bicycle has two", "wheels", ["engines", "wings"]),
    ("The chemical symbol for water is H2", "O", ["S", "N"]),
    ("The freezing point of water is zero degrees", "Celsius", ["Kelvin", "Fahrenheit"]),
    ("An apple a day keeps the doctor", "away", ["home", "late"]),
    ("Monkeys like to eat", "bananas", ["stones", "bread"]),
    ("Rabbits like to eat", "carrots", ["fish", "meat"]),
    ("The king of the jungle is the", "lion", ["mouse", "cow"]),
    ("Snow is", "white", ["green", "black"]),
    ("Lemons taste", "sour", ["sweet", "salty"]),
    ("Sugar tastes", "sweet", ["sour", "bitter"]),
    ("The opposite of left is", "right", ["down", "back"]),
    ("We sleep in a", "bed", ["car", "boat"]),
    ("We write with a", "pen", ["cup", "spoon"]),
    ("A doctor works in a", "hospital", ["library", "bakery"]),
    ("A teacher works in a", "school", ["hospital", "farm"]),
    ("Plants need water and", "sunlight", ["darkness", "plastic"]),
]


def recall(rng: random.Random) -> list[dict]:
    assert len(FACTS) == N, len(FACTS)
    return [{"prompt": p, "answer": " " + a, "distractors": [" " + d for d in ds]} for p, a, ds in FACTS]


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def reasoning(rng: random.Random) -> list[dict]:
    items, seen = [], set()
    while len(items) < N:
        kind = len(items) % 4
        shown = rng.choice([2, 3, 4])  # how many terms the prompt shows
        if kind == 0:  # arithmetic sequence of numbers
            step, start = rng.choice([1, 2, 5, 10]), rng.randint(1, 20)
            seq = [start + step * k for k in range(shown + 1)]
            answer = seq[-1]
            wrong = [answer + step, answer - step * 2, answer + 1 if step != 1 else answer + 3]
            item = {"prompt": ", ".join(str(x) for x in seq[:-1]) + ",", "answer": f" {answer}",
                    "distractors": [f" {w}" for w in wrong]}
        else:  # days of the week, months, or counting in words
            pool, cyclic = {1: (DAYS, True), 2: (MONTHS, True), 3: (NUMBER_WORDS, False)}[kind]
            k = rng.randint(0, len(pool) - 1 if cyclic else len(pool) - shown - 1)
            seq = [pool[(k + j) % len(pool)] for j in range(shown + 1)]
            wrong = _others(rng, pool, {seq[-1]}, 2)
            item = {"prompt": ", ".join(seq[:-1]) + ",", "answer": " " + seq[-1], "distractors": [" " + w for w in wrong]}
        if item["prompt"] not in seen:  # every item once, so that no item is both steer's and verify's
            seen.add(item["prompt"])
            items.append(item)
    return items


TASKS = {"retrieval-prose": retrieval_prose, "retrieval-dialogue": retrieval_dialogue, "recall": recall,
         "reasoning": reasoning}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in TASKS.items():
        items = make(random.Random(f"mechfix-{name}"))
        assert len({it["prompt"] for it in items}) == len(items), f"{name}: a prompt repeats"
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
