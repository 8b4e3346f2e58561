"""Write the demo data set: dates written in words -> ISO 8601 (YYYY-MM-DD).

"the twenty-fifth of April, two thousand and eight" -> "2008-04-25". An objective task (exact
match) that SmolLM2-135M-Instruct gets wrong out of the box and learns from a few hundred
examples. Regenerate with `python demo/make_data.py` (deterministic).
"""

from __future__ import annotations

import calendar
import json
import random
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent / "data"
PROMPT = "Write the date in ISO format (YYYY-MM-DD).\nDate: {text}\nISO:"


ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
                "seventeenth", "eighteenth", "nineteenth"]
ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}


def cardinal(n: int) -> str:
    """1..99 in words."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def ordinal(n: int) -> str:
    """1..31 as an ordinal word."""
    if n < 20:
        return ORDINAL_ONES[n]
    if n % 10 == 0:
        return ORDINAL_TENS[n]
    return TENS[n // 10] + "-" + ORDINAL_ONES[n % 10]


def year_words(year: int) -> str:
    """1950..2049 the way people say them."""
    if year == 2000:
        return "two thousand"
    if 2000 < year < 2010:
        return f"two thousand and {ONES[year - 2000]}"
    century, rest = divmod(year, 100)
    return (f"{cardinal(century)} "
            f"{cardinal(rest) if rest >= 10 else 'oh-' + ONES[rest] if rest else 'hundred'}")


def spelled(day: date, rng: random.Random) -> str:
    month = calendar.month_name[day.month]
    if rng.random() < 0.5:
        return f"the {ordinal(day.day)} of {month}, {year_words(day.year)}"
    return f"{month} the {ordinal(day.day)}, {year_words(day.year)}"


def record(day: date, rng: random.Random) -> dict[str, str]:
    return {"prompt": PROMPT.format(text=spelled(day, rng)), "completion": " " + day.isoformat()}


def main() -> None:
    rng = random.Random(2026)
    start, span = date(1950, 1, 1).toordinal(), 365 * 100
    days = [date.fromordinal(start + i) for i in rng.sample(range(span), 560)]
    HERE.mkdir(exist_ok=True)
    for name, chunk in (("train", days[:480]), ("test", days[480:])):
        with (HERE / f"{name}.jsonl").open("w") as handle:
            for day in chunk:
                handle.write(json.dumps(record(day, rng)) + "\n")
    print(f"wrote {HERE}/train.jsonl (480) and test.jsonl (80)")


if __name__ == "__main__":
    main()
