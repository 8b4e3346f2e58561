"""Write the demo data set: spelled-out dates -> ISO 8601 (YYYY-MM-DD).

An objective task (exact match) that SmolLM2-135M-Instruct gets wrong out of the box and learns
from a few hundred examples. Regenerate with `python demo/make_data.py` (deterministic).
"""

from __future__ import annotations

import calendar
import json
import random
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent / "data"
PROMPT = "Write the date in ISO format (YYYY-MM-DD).\nDate: {text}\nISO:"


def spelled(day: date, rng: random.Random) -> str:
    month = calendar.month_name[day.month]
    style = rng.randrange(3)
    if style == 0:
        return f"{month} {day.day}, {day.year}"
    if style == 1:
        return f"{day.day} {month} {day.year}"
    return f"{calendar.month_abbr[day.month]} {day.day} {day.year}"


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
