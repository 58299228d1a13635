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
  chat = single-turn conversations as {"messages": [...]} records: the packaged `dates` fine-tuning task's
         train records (exact answers), and CHAT_PROMPTS (written for this file) answered by the default
         model itself (leanlm's generate, sampling at temperature 0.7, top-p 0.9, seed 0) -- text the model
         generates itself, as LLM-QAT calibrates on. The chat template is NOT applied here: calibration
         renders each record with the template of the model being compressed.
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
    import torch

    import leanlm
    from leanlm.data.tasks import get_task
    from leanlm.infer.generate import generate
    from leanlm.infer.sampling import GenerationConfig

    torch.manual_seed(0)
    model, tok = leanlm.load(None, dtype=torch.float32)
    records = []
    cfg = GenerationConfig(max_new_tokens=256, temperature=0.7, top_p=0.9, seed=0)
    answers = generate(model, tok, [[{"role": "user", "content": p}] for p in CHAT_PROMPTS], cfg)  # one batch
    for p, a in zip(CHAT_PROMPTS, answers):
        records.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}],
                        "source": "generated"})
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
