"""Generate the demo task: short financial news in, one fixed-format JSON event out.

The task is synthetic on purpose: its answers are exact, so exact match measures
what the LoRA adapter learned and what quantization lost. The committed
train.jsonl and heldout.jsonl were written by this script; rerun it to check.

    python data/demo_task/generate.py data/demo_task
"""

import argparse
import json
import random
from pathlib import Path

SEED = 20260101
N_TRAIN = 320
N_HELDOUT = 40

PREFIXES = ["Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay",
            "Stark", "Wayne", "Tyrell", "Cyberdyne", "Soylent", "Acme", "Oscorp", "Massive",
            "Aperture", "Blue Sun", "Monarch", "Gringotts", "Duff", "Sirius", "Nakatomi",
            "Pied Piper", "Wonka", "Gekko", "Prestige", "Zorin", "Virtucon", "Yoyodyne", "Dunder"]
SUFFIXES = ["Corp", "Inc", "Holdings", "Group", "Systems", "Energy", "Bank", "Foods",
            "Motors", "Labs", "Airlines", "Mining", "Pharma", "Retail", "Logistics"]

# (event, direction, templates); {c} company, {a} amount, {p} percent, {t} target
TEMPLATES = [
    ("earnings", "up", [
        "{c} reported quarterly profit of {a}, beating analyst forecasts.",
        "Shares of {c} rose after it posted net income of {a} for the quarter.",
        "{c} said quarterly earnings climbed to {a} on strong demand.",
    ]),
    ("earnings", "down", [
        "{c} reported quarterly profit of {a}, missing analyst forecasts.",
        "{c} said quarterly earnings fell to {a} as costs rose.",
        "Shares of {c} slid after net income dropped to {a} for the quarter.",
    ]),
    ("acquisition", "none", [
        "{c} agreed to buy {t} for {a} in cash.",
        "{c} will acquire rival {t} in a deal valued at {a}.",
        "In a {a} deal, {c} announced it is taking over {t}.",
    ]),
    ("dividend", "up", [
        "{c} raised its quarterly dividend to {a} per share.",
        "The board of {c} approved a higher dividend of {a} per share.",
    ]),
    ("dividend", "down", [
        "{c} cut its quarterly dividend to {a} per share.",
        "The board of {c} reduced the dividend to {a} per share to save cash.",
    ]),
    ("layoffs", "down", [
        "{c} will cut {p} of its workforce to reduce costs.",
        "{c} announced layoffs affecting {p} of staff.",
        "Facing weak sales, {c} plans to lay off {p} of employees.",
    ]),
    ("guidance", "up", [
        "{c} raised its full-year revenue outlook to {a}.",
        "{c} now expects annual sales of {a}, up from its earlier forecast.",
    ]),
    ("guidance", "down", [
        "{c} lowered its full-year revenue outlook to {a}.",
        "{c} now expects annual sales of only {a}, below its earlier forecast.",
    ]),
]

SYSTEM = "Extract the event from the financial news. Answer with JSON only."


def money(rng: random.Random, per_share: bool) -> str:
    if per_share:
        return f"${rng.randint(5, 250) / 100:.2f}"
    unit = rng.choice(["million", "billion"])
    return f"${rng.randint(11, 990) / 10:g} {unit}"


def example(rng: random.Random) -> dict:
    event, direction, phrasings = rng.choice(TEMPLATES)
    company = f"{rng.choice(PREFIXES)} {rng.choice(SUFFIXES)}"
    target = f"{rng.choice(PREFIXES)} {rng.choice(SUFFIXES)}"
    while target == company:
        target = f"{rng.choice(PREFIXES)} {rng.choice(SUFFIXES)}"
    amount = f"{rng.randint(2, 30)}%" if event == "layoffs" else money(rng, event == "dividend")
    news = rng.choice(phrasings).format(c=company, a=amount, p=amount, t=target)
    answer = {"company": company, "event": event, "amount": amount, "direction": direction}
    return {"system": SYSTEM, "news": news, "answer": json.dumps(answer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    rng = random.Random(SEED)
    seen, rows = set(), []
    while len(rows) < N_TRAIN + N_HELDOUT:
        row = example(rng)
        if row["news"] not in seen:
            seen.add(row["news"])
            rows.append(row)
    for name, split in (("train", rows[:N_TRAIN]), ("heldout", rows[N_TRAIN:])):
        with open(args.out_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in split)


if __name__ == "__main__":
    main()
