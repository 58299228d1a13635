"""Regenerate the packaged evaluation tasks (leanlm/data/tasks/lmeval/*.jsonl) deterministically.

    python benchmarks/make_tasks.py

leanlm_mc: short multiple-choice questions (one right continuation of four, scored by log-likelihood).
leanlm_cloze: a passage of the packaged evaluation texts (Austen; Python HOWTOs) and four candidate
next words, the right one and three other words of the same text.
leanlm_capitals: three-shot "Country: X / Capital: Y" prompts answered by greedy generation, exact match.
Each JSONL is read by leanlm.eval.tasks (the board) and, through the YAML beside it, by lm-evaluation-harness.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "leanlm" / "data" / "tasks" / "lmeval"

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
            ("China", "Beijing"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"), ("Iran", "Tehran"),
            ("Turkey", "Ankara"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
            ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("South Korea", "Seoul"),
            ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota"),
            ("Venezuela", "Caracas"), ("Nigeria", "Abuja")]

MC = [  # (context, right continuation, three wrong ones)
    ("The opposite of hot is", "cold", ["tall", "green", "fast"]),
    ("The opposite of up is", "down", ["left", "blue", "loud"]),
    ("The opposite of day is", "night", ["water", "table", "seven"]),
    ("The opposite of big is", "small", ["red", "happy", "wet"]),
    ("The opposite of open is", "closed", ["round", "sweet", "early"]),
    ("The colour of the clear sky on a sunny day is", "blue", ["green", "black", "brown"]),
    ("The colour of fresh grass is", "green", ["purple", "white", "orange"]),
    ("Snow is usually", "white", ["red", "blue", "green"]),
    ("A dog says", "woof", ["meow", "moo", "quack"]),
    ("A cat says", "meow", ["woof", "oink", "baa"]),
    ("A cow says", "moo", ["meow", "woof", "tweet"]),
    ("Two plus two equals", "four", ["seven", "nine", "one"]),
    ("Three plus four equals", "seven", ["two", "ten", "five"]),
    ("Ten minus one equals", "nine", ["three", "eleven", "six"]),
    ("The day after Monday is", "Tuesday", ["Friday", "Sunday", "Thursday"]),
    ("The day before Sunday is", "Saturday", ["Monday", "Wednesday", "Tuesday"]),
    ("The month after January is", "February", ["August", "May", "October"]),
    ("The month before December is", "November", ["March", "June", "April"]),
    ("Water freezes at zero degrees", "Celsius", ["Kelvin", "miles", "grams"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mercury", "Mars", "Venus"]),
    ("The planet we live on is called", "Earth", ["Saturn", "Neptune", "Pluto"]),
    ("Bees make", "honey", ["bread", "glass", "paper"]),
    ("Fish live in", "water", ["trees", "deserts", "clouds"]),
    ("Birds can", "fly", ["read", "drive", "type"]),
    ("We see with our", "eyes", ["knees", "elbows", "toes"]),
    ("We hear with our", "ears", ["feet", "hands", "teeth"]),
    ("The sun rises in the", "east", ["north", "west", "south"]),
    ("A week has seven", "days", ["hours", "years", "metres"]),
    ("A year has twelve", "months", ["weeks", "minutes", "days"]),
    ("An hour has sixty", "minutes", ["days", "weeks", "years"]),
    ("To write a letter you need a", "pen", ["spoon", "shoe", "chair"]),
    ("You drink coffee from a", "cup", ["shoe", "book", "lamp"]),
    ("Ice is frozen", "water", ["fire", "sand", "wood"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("A baby dog is called a", "puppy", ["kitten", "lamb", "chick"]),
    ("The capital of France is", "Paris", ["London", "Rome", "Madrid"]),
    ("The capital of Japan is", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("The capital of Italy is", "Rome", ["Paris", "Vienna", "Athens"]),
    ("In Python, a function is defined with the keyword", "def", ["if", "for", "class"]),
    ("In Python, a loop over a list is written with the keyword", "for", ["def", "import", "return"]),
]


def mc_records():
    rng = random.Random("leanlm_mc")
    out = []
    for ctx, right, wrong in MC:
        choices = [right] + wrong
        rng.shuffle(choices)
        out.append({"context": ctx, "choices": [" " + c for c in choices], "gold": choices.index(right)})
    return out


def cloze_records(n_per_text: int = 40):
    """Passages of ~300 characters ending before a word; the candidates are that word and three other
    words of 4+ letters from the same text (none equal to it)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from leanlm.data import packaged_text

    out = []
    for name in ("eval", "tech"):
        text = re.sub(r"\s+", " ", packaged_text(name))
        words = sorted(set(re.findall(r"\b[a-z]{4,}\b", text)))
        rng = random.Random(f"leanlm_cloze-{name}")
        matches = [m for m in re.finditer(r" ([a-z]{4,})\b", text) if m.start() > 400]
        for m in rng.sample(matches, n_per_text):
            ctx = text[m.start() - 300: m.start()]
            ctx = ctx[ctx.index(" ") + 1:]  # start at a word boundary
            right = m.group(1)
            wrong = rng.sample([w for w in words if w != right], 3)
            choices = [right] + wrong
            rng.shuffle(choices)
            out.append({"context": ctx, "choices": [" " + c for c in choices], "gold": choices.index(right),
                        "source": name})
    return out


def capitals_records():
    shots = "Country: Brazil\nCapital: Brasilia\n\nCountry: Ghana\nCapital: Accra\n\nCountry: Morocco\nCapital: Rabat\n\n"
    return [{"prompt": f"{shots}Country: {c}\nCapital:", "answer": cap} for c, cap in CAPITALS]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, recs in (("leanlm_mc", mc_records()), ("leanlm_cloze", cloze_records()),
                       ("leanlm_capitals", capitals_records())):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        print(name, len(recs))


if __name__ == "__main__":
    main()
