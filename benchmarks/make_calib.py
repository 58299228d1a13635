"""Regenerate the calibration mix's parts leanlm/data/texts/{code.txt,docs.txt,chat.jsonl} from local files.

    python benchmarks/make_calib.py                # all three
    python benchmarks/make_calib.py --only chat    # one part

No download: the sources are files a Debian bookworm system with Python 3.11 already holds (see
leanlm/data/texts/SOURCES.md for versions, licences and sha256 of the results):
  code = whole Python 3.11 standard-library modules (/usr/lib/python3.11, PSF licence), in the order of
         CODE_FILES while the text stays within CODE_MAX_BYTES.
  docs = technical documentation of libjpeg-turbo, zlib and xz-utils (/usr/share/doc, IJG / zlib
         licences / public domain), whole documents in the order of DOC_FILES, the last one cut at a
         blank line so the text stays within DOCS_MAX_BYTES.
  chat = single-turn conversations as {"messages": [...]} records: CHAT_PROMPTS with CHAT_ANSWERS (both
         written for this file), then the packaged `dates` fine-tuning task's first DATES_RECORDS train
         records (exact answers). The chat template is NOT applied here: calibration renders each record
         with the template of the model being compressed.
None of them comes from the evaluation texts (eval.txt, tech.txt) or from the legal text
benchmarks/calib_mix.py scores out of domain (/usr/share/common-licenses).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "leanlm" / "data" / "texts"
CODE_MAX_BYTES = 160_000
DOCS_MAX_BYTES = 160_000
STDLIB = Path("/usr/lib/python3.11")
CODE_FILES = ["textwrap.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "calendar.py", "csv.py",
              "string.py", "queue.py", "sched.py", "colorsys.py", "graphlib.py", "fnmatch.py", "glob.py",
              "copy.py", "pprint.py"]
DOC_FILES = ["zlib1g-dev/FAQ.gz", "zlib1g-dev/algorithm.txt.gz", "xz-utils/faq.txt.gz",
             "xz-utils/history.txt.gz", "libjpeg62-turbo-dev/usage.txt.gz", "libjpeg62-turbo-dev/wizard.txt.gz",
             "libjpeg62-turbo-dev/libjpeg.txt.gz"]
DATES_RECORDS = 40
CHAT_PROMPTS = [
    "What is a good way to start learning to cook at home?",
    "Explain why the sky looks blue during the day.",
    "Write a short poem about the sea at night.",
    "How do I make a cup of tea properly?",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Summarize the story of Little Red Riding Hood in a few sentences.",
    "How many minutes are there in a day? Show your working.",
    "What should I pack for a weekend hiking trip?",
    "Can you suggest a name for a small bakery?",
    "Why do leaves change colour in autumn?",
    "Write a polite email asking my manager for a day off next Friday.",
    "What are the main parts of a plant and what do they do?",
    "Explain what a prime number is, with examples.",
    "How do vaccines help the body fight disease?",
    "Tell me a fun fact about octopuses.",
    "What is 15% of 80?",
    "Give me a simple recipe for pancakes.",
    "How can I stay focused while studying?",
    "What were the main causes of the First World War?",
    "Describe the water cycle in simple terms.",
    "Write a short story about a robot who learns to paint.",
    "What is the capital of Australia, and why is it not Sydney?",
    "How does a bicycle stay upright when it moves?",
    "Give me a list of five healthy snacks.",
    "What does it mean to be a good friend?",
    "Explain the rules of chess in a few sentences.",
    "How do I write a function in Python that reverses a string?",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about spring rain.",
    "How do airplanes fly?",
    "What should I do if I feel stressed at work?",
    "Translate 'good morning, how are you?' into French.",
    "Why is exercise important for health?",
    "What is photosynthesis?",
    "Suggest three books for someone who likes mystery novels.",
    "How can I save money on groceries?",
    "Explain gravity to a ten-year-old.",
    "What are the planets of the solar system, in order from the Sun?",
    "Write a thank-you note to a teacher.",
    "How do I change a flat tyre on a car?",
    "What is the difference between a virus and a bacterium?",
    "Give me some ideas for a birthday party for a seven-year-old.",
    "What is the Pythagorean theorem? Give an example.",
    "How does a refrigerator keep food cold?",
    "Describe a sunset over the mountains.",
    "What is machine learning, in one paragraph?",
    "How can I be more confident when speaking in public?",
    "Why do cats purr?",
    "Plan a three-day trip to Rome for me.",
    "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
    "Write a limerick about a forgetful wizard.",
    "How do I care for a houseplant that gets little light?",
    "What is democracy?",
    "Explain how to compute the average of a list of numbers.",
    "What are some good habits for a healthy morning routine?",
    "Why is the ocean salty?",
    "Write a short dialogue between a customer and a shop assistant.",
    "How do bees make honey?",
    "What is the difference between 'affect' and 'effect'?",
    "Give me advice on how to learn a new language.",
    "What happened during the Moon landing in 1969?",
    "How do I boil an egg so that the yolk stays soft?",
    "What are renewable energy sources?",
    "Write a motivational message for someone starting a new job.",
    "If a train travels 60 kilometres in 45 minutes, what is its average speed in kilometres per hour?",
    "How does the heart pump blood around the body?",
    "What is a metaphor? Give two examples.",
    "Describe your ideal weekend.",
    "How can I reduce the amount of plastic I use?",
    "What is an algorithm?",
    "Why do we have seasons on Earth?",
]

CHAT_ANSWERS = [  # written for this file, one per prompt
    "Start with a few simple dishes you like, such as an omelette, a pasta sauce and a soup. Learn basic knife skills, taste as you go, and cook the same recipe a few times until it feels easy before moving on.",
    "Sunlight holds every colour. Air molecules scatter short blue wavelengths much more than long red ones, so blue light reaches your eyes from all over the sky.",
    "The sea lies dark beneath the moon,\nits silver path a quiet tune;\nthe waves breathe slow upon the sand,\nand stars lean down to touch the land.",
    "Boil fresh water, warm the pot or cup, add one tea bag or a teaspoon of leaves per cup, and pour the water over it. Let black tea steep three to five minutes, then remove the leaves and add milk or lemon if you like.",
    "1. Go to bed and get up at the same time every day.\n2. Avoid screens and caffeine in the evening.\n3. Keep your bedroom dark, quiet and cool.",
    "Weather is what the atmosphere does over hours or days: rain today, sun tomorrow. Climate is the average pattern of weather in a place over many years.",
    "A girl in a red hood walks through the forest to visit her grandmother. A wolf learns where she is going, gets there first and pretends to be the grandmother. A woodcutter arrives in time, and the girl and her grandmother are saved.",
    "A day has 24 hours and each hour has 60 minutes, so a day has 24 x 60 = 1,440 minutes.",
    "Pack sturdy boots, layers of clothing, a rain jacket, a map, water, snacks, a first-aid kit, sunscreen, a torch and, if you camp, a tent, a sleeping bag and a small stove.",
    "How about \"The Rising Loaf\", \"Crumb & Crust\" or \"Morning Oven\"?",
    "In autumn, trees stop making chlorophyll, the green pigment. As it fades, yellow and orange pigments that were there all along become visible, and some trees make red pigments as well.",
    "Subject: Request for a day off on Friday\n\nDear Ms Smith,\n\nI would like to ask for a day off next Friday for a personal matter. My tasks are up to date and a colleague has agreed to cover any urgent requests. Please let me know if this works for you.\n\nKind regards,\nAlex",
    "The roots take up water and anchor the plant, the stem carries water and food and holds the plant up, the leaves make food by photosynthesis, and the flowers make seeds.",
    "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. Examples are 2, 3, 5, 7, 11 and 13; 9 is not prime because 3 x 3 = 9.",
    "A vaccine shows the immune system a harmless piece or weakened form of a germ. The body learns to recognise it and makes antibodies and memory cells, so it can react quickly if the real germ arrives.",
    "An octopus has three hearts and blue blood, and each of its eight arms can taste what it touches.",
    "15% of 80 is 0.15 x 80 = 12.",
    "Mix 1 cup of flour, 1 tablespoon of sugar, 2 teaspoons of baking powder and a pinch of salt. Whisk in 1 cup of milk, 1 egg and 2 tablespoons of melted butter. Cook spoonfuls on a hot buttered pan until bubbles form, flip, and cook one more minute.",
    "Study in short blocks of 25 to 50 minutes with short breaks, put your phone in another room, set a clear goal for each session, and work in the same quiet place every day.",
    "The main causes were militarism, alliances, imperial rivalry and nationalism. The assassination of Archduke Franz Ferdinand in Sarajevo in June 1914 set off a chain of declarations of war between the alliance blocs.",
    "The sun warms water in seas and lakes and it evaporates. The vapour cools in the air and condenses into clouds. Water falls back as rain or snow, runs into rivers and the ground, and the cycle starts again.",
    "Unit 7 swept floors in the art school every night. One evening it found a brush on the floor and, instead of putting it away, dipped it in blue paint. Its first painting was a row of perfect squares; its hundredth was the night sky it saw through the window. The students never learned who left the paintings, but they kept every one.",
    "The capital of Australia is Canberra. When the colonies formed a federation in 1901, Sydney and Melbourne both wanted to be the capital, so a new city was built between them as a compromise.",
    "A moving bicycle stays upright mainly because the rider steers the front wheel under the bike when it starts to lean, and the geometry of the fork helps the wheel turn into the lean by itself.",
    "1. An apple with peanut butter\n2. Carrot sticks and hummus\n3. A handful of nuts\n4. Plain yoghurt with berries\n5. A boiled egg",
    "A good friend listens, keeps your secrets, is honest with you even when it is hard, and is there when you need help.",
    "Each player has sixteen pieces and moves one piece per turn; each kind of piece moves in its own way. The goal is to checkmate the other king: attack it so that it cannot escape.",
    "def reverse(s):\n    return s[::-1]\n\nThe slice [::-1] walks the string from the end to the start, so reverse(\"hello\") returns \"olleh\".",
    "A list is mutable: you can add, remove and change its items. A tuple is immutable: once created it cannot change, which makes it usable as a dictionary key. Lists are written with [ ], tuples with ( ).",
    "Soft rain on new leaves,\nthe garden drinks in silence,\na snail starts its walk.",
    "The wings are shaped and tilted so that air flowing over them is pushed downwards, which pushes the wing upwards: that is lift. Engines provide thrust to keep the air moving over the wings.",
    "Take a short break and breathe slowly, write down what needs doing and tackle one thing at a time, talk to your manager if the workload is too high, and protect time for sleep and exercise.",
    "Bonjour, comment allez-vous ?",
    "Exercise strengthens the heart and muscles, helps control weight, improves sleep and mood, and lowers the risk of diseases such as diabetes.",
    "Photosynthesis is how plants make food. Using the energy of sunlight, they turn water and carbon dioxide into sugar and release oxygen.",
    "Try \"The Murder of Roger Ackroyd\" by Agatha Christie, \"The Hound of the Baskervilles\" by Arthur Conan Doyle and \"The Big Sleep\" by Raymond Chandler.",
    "Plan your meals for the week, shop with a list, buy store brands and seasonal produce, cook in batches and use leftovers before they go bad.",
    "Gravity is an invisible pull between things. The Earth is so big that it pulls everything towards its centre, which is why a ball you drop falls down and why we do not float away.",
    "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "Dear Mr Jones,\n\nThank you for a wonderful year. Your patience and your enthusiasm made every lesson interesting, and I learned far more than I expected. I will miss your class.\n\nWith gratitude,\nSam",
    "Park safely and put on the hazard lights. Loosen the wheel nuts, jack up the car, remove the nuts and the wheel, fit the spare, tighten the nuts by hand, lower the car and then tighten the nuts fully in a star pattern.",
    "Bacteria are single living cells that can reproduce on their own; many are harmless. Viruses are much smaller and can only reproduce inside the cells of another living thing. Antibiotics work against bacteria, not viruses.",
    "A treasure hunt in the garden, a craft table, a magic show, musical chairs, or a theme such as pirates or space with matching games and a cake.",
    "In a right-angled triangle, the square of the longest side equals the sum of the squares of the other two: a^2 + b^2 = c^2. With sides 3 and 4, c^2 = 9 + 16 = 25, so c = 5.",
    "A refrigerator pumps a refrigerant through pipes. The liquid evaporates inside the fridge and absorbs heat, then a compressor squeezes the gas and it gives the heat off through the coils at the back.",
    "The sun sinks behind the peaks and the sky turns orange, then pink, then deep violet. The snow on the summits glows for a moment after the valleys have gone dark.",
    "Machine learning is a way of building computer programs that learn patterns from examples instead of following rules written by hand. A model is shown many inputs with the right answers, adjusts itself to make fewer mistakes, and can then make predictions on new data.",
    "Prepare well, practise out loud several times, start with a clear opening, speak slowly, look at a few friendly faces, and remember that the audience wants you to do well.",
    "Cats purr when they are content, but also when they are stressed or hurt; the purr may calm them, and its low vibrations may even help healing.",
    "Day 1: the Colosseum, the Roman Forum and the Palatine Hill. Day 2: the Vatican Museums, the Sistine Chapel and St Peter's Basilica. Day 3: the Pantheon, Piazza Navona, the Trevi Fountain and an evening in Trastevere.",
    "At sea level water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
    "A wizard whose memory was thin\nforgot where his spells had been;\nhe turned his cat blue,\nhis hat into stew,\nand could not recall how to begin.",
    "Choose a plant that tolerates shade, such as a snake plant or a ZZ plant, water it only when the soil is dry, wipe the leaves so they catch more light, and move it closer to a window if you can.",
    "Democracy is a system of government in which the people hold power, usually by electing representatives in free and fair elections, with rights such as free speech and equality before the law.",
    "Add all the numbers together and divide by how many there are. For 4, 8 and 9: (4 + 8 + 9) / 3 = 21 / 3 = 7.",
    "Wake at a regular time, drink a glass of water, move your body for a few minutes, eat a simple breakfast and plan the main tasks of the day before checking messages.",
    "Rain slowly dissolves salts from rocks on land, and rivers carry them to the sea. When seawater evaporates the salt stays behind, so over millions of years the oceans have become salty.",
    "Customer: Excuse me, do you have this shirt in a medium?\nAssistant: Let me check. Yes, here is a medium in blue.\nCustomer: Can I try it on?\nAssistant: Of course, the fitting rooms are just behind you.",
    "Bees collect nectar from flowers and store it in their honey stomach. Back in the hive they pass it to other bees, who add enzymes and spread it in the comb, and fan it with their wings until most of the water has evaporated.",
    "\"Affect\" is usually a verb: the rain affected our plans. \"Effect\" is usually a noun: the rain had an effect on our plans.",
    "Practise a little every day, learn the most common words first, listen to music and podcasts in the language, speak with native speakers early, and do not be afraid of mistakes.",
    "On 20 July 1969, Apollo 11's lunar module landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface, collected rock samples and planted a flag, while Michael Collins orbited above; all three returned safely to Earth.",
    "Lower the egg into boiling water, cook it for six to seven minutes, then put it straight into cold water to stop the cooking.",
    "Renewable energy comes from sources that are naturally replenished: sunlight, wind, flowing water, the heat of the Earth and biomass.",
    "Congratulations on your new job! Every expert was once a beginner. Ask questions, be patient with yourself, and trust that you were chosen for good reasons. You have got this.",
    "The average speed is distance divided by time: 60 km in 0.75 hours is 60 / 0.75 = 80 kilometres per hour.",
    "The heart is a muscle with four chambers. The right side pumps blood to the lungs to pick up oxygen, and the left side pumps the oxygen-rich blood through the arteries to the rest of the body; veins bring it back.",
    "A metaphor describes something by saying it is something else. Examples: \"Time is a thief\" and \"Her voice was music to his ears.\"",
    "A slow breakfast, a long walk in the hills, an afternoon with a good book, and dinner with friends.",
    "Carry a reusable bag and water bottle, buy loose fruit and vegetables, choose products with less packaging, and say no to plastic straws and cutlery.",
    "An algorithm is a precise list of steps that solves a problem, like a recipe. A computer program carries out an algorithm, for example to sort a list of names.",
    "The Earth's axis is tilted. As the Earth orbits the Sun, each half of the planet is tilted towards the Sun for part of the year (summer, longer and warmer days) and away from it for another part (winter).",
]


def normalise(text: str) -> str:
    """`\\n` line ends, tabs kept, trailing spaces removed, runs of blank lines collapsed to one."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def make_code() -> str:
    out = ""
    for name in CODE_FILES:
        part = f"# {name}\n\n" + normalise((STDLIB / name).read_text(encoding="utf-8"))
        if len((out + "\n" + part).encode()) > CODE_MAX_BYTES:
            break
        out = out + "\n" + part if out else part
    return out


def make_docs(doc_root: Path = Path("/usr/share/doc")) -> str:
    out = ""
    for name in DOC_FILES:
        path = doc_root / name
        raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        part = normalise(raw.decode("utf-8", errors="strict"))
        room = DOCS_MAX_BYTES - len(out.encode()) - 1
        if len(part.encode()) > room:  # cut the last document at a paragraph boundary
            cut = part.encode()[:room].decode("utf-8", errors="ignore")
            part = cut[: cut.rfind("\n\n")].rstrip("\n") + "\n" if "\n\n" in cut else ""
        if part:
            out = out + "\n" + part if out else part
        if len(out.encode()) >= DOCS_MAX_BYTES - 2000:
            break
    return out


def make_chat() -> str:
    from leanlm.data.tasks import get_task

    assert len(CHAT_PROMPTS) == len(CHAT_ANSWERS)
    records = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}], "source": "written"}
               for p, a in zip(CHAT_PROMPTS, CHAT_ANSWERS)]
    for r in get_task("dates").records("train", DATES_RECORDS):
        records.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}], "source": "dates"})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    import hashlib

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["code", "docs", "chat"], default=None)
    args = p.parse_args(argv)
    makers = {"code": ("code.txt", make_code), "docs": ("docs.txt", make_docs), "chat": ("chat.jsonl", make_chat)}
    for part, (fname, make) in makers.items():
        if args.only and part != args.only:
            continue
        text = make()
        write_atomic(OUT / fname, text)
        data = text.encode()
        print(f"{fname}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
