"""GSM8K test questions planted in a GSM8K train sample, for the decontamination test and for
bench/decontaminate_plant.py: some copied verbatim, some lightly edited (numbers changed, words
swapped), the rest of the sample clean."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path


def _edit(question: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """Numbers changed the same way in question and answer, and two pairs of adjacent words of the
    question swapped: what a copy that someone touched up looks like."""
    shift = rng.randint(2, 9)

    def renumber(text: str) -> str:
        return re.sub(r"\d+", lambda m: str(int(m.group()) + shift), text)

    words = renumber(question).split(" ")
    for _ in range(2):
        if len(words) > 3:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words), renumber(answer)


def planted_sample(gsm8k_dir: Path, *, clean: int = 500, verbatim: int = 30, edited: int = 20,
                   seed: int = 0) -> tuple[list[dict], list[str], dict[str, set[int]]]:
    """(train rows {id, instruction, output}, test documents, {clean|verbatim|edited: row ids})."""
    rng = random.Random(seed)
    read = lambda name: [json.loads(line) for line in (gsm8k_dir / name).read_text().splitlines() if line.strip()]  # noqa: E731
    train, test = read("train.jsonl"), read("test.jsonl")
    rows, kinds = [], {"clean": set(), "verbatim": set(), "edited": set()}
    for rec in rng.sample(train, clean):
        kinds["clean"].add(len(rows))
        rows.append({"id": len(rows), "instruction": rec["question"], "output": rec["answer"]})
    for i, rec in enumerate(rng.sample(test, verbatim + edited)):
        q, a = (rec["question"], rec["answer"]) if i < verbatim else _edit(rec["question"], rec["answer"], rng)
        kinds["verbatim" if i < verbatim else "edited"].add(len(rows))
        rows.append({"id": len(rows), "instruction": q, "output": a})
    order = list(range(len(rows)))
    rng.shuffle(order)
    docs = ["\n".join([t["question"], t["answer"]]) for t in test]
    return [rows[i] for i in order], docs, kinds
