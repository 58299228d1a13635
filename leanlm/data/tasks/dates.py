"""Dates: rewrite an ISO date (2021-07-09) as "9 July 2021".

Small instruction-tuned models answer in their own habit ("July 9, 2021", "09/07/2021", a sentence),
so the exact format is mostly wrong before tuning; the mapping (copy the digits, drop a leading zero,
name the month) is learnable by a small adapter in minutes. Train and test dates are disjoint: a date
goes to the test split when a hash of it falls in one bucket of five.
"""
from __future__ import annotations

import random

from leanlm.data.tasks.base import Task

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
PROMPT = "Rewrite the date {iso} as day, month name and year."


def _is_test(y: int, m: int, d: int) -> bool:
    return (y * 7919 + m * 104729 + d * 1299709) % 5 == 0


def make(split: str, n: int) -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    rng = random.Random(f"dates-{split}")
    out, seen = [], set()
    while len(out) < n:
        y, m = rng.randint(1900, 2099), rng.randint(1, 12)
        d = rng.randint(1, DAYS[m - 1])
        if _is_test(y, m, d) != (split == "test") or (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        out.append({"prompt": PROMPT.format(iso=f"{y:04d}-{m:02d}-{d:02d}"),
                    "completion": f"{d} {MONTHS[m - 1]} {y}"})
    return out


DATES = Task(name="dates", description="rewrite an ISO date as 'D Month YYYY'", make=make,
             normalize=lambda s: s.strip().rstrip("."), max_new_tokens=12)
