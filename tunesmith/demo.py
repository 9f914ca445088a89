"""The default recipe's dataset, written by the project itself (no third-party text).

Task: reverse the order of a short list of words. SmolLM2-135M-Instruct does not do this
reliably out of the box and answers with extra chatter, so exact match on held-out lists starts
near zero; a few minutes of CPU LoRA teach it. The file also carries the kinds of rows curation
must catch: exact duplicates, near duplicates (same answer, reworded instruction), empty
answers and over-long rows.

    python -m tunesmith.demo data/demo/reverse_words.jsonl
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tunesmith.fileio import write_jsonl

WORDS = (
    "apple river stone cloud tiger lamp garden pencil window rocket violin candle forest "
    "mirror planet bridge coffee jacket ladder island engine silver basket doctor orange "
    "summer winter spring autumn castle dragon feather garlic hammer kettle lemon magnet "
    "needle ocean pepper quartz rabbit saddle tomato umbrella valley walnut yogurt zebra "
    "anchor bottle cactus desert eagle falcon ginger harbor igloo jungle kitten lantern "
    "meadow nickel oyster parrot quilt radish sponge tunnel velvet wagon yarn button "
    "cherry dolphin elbow fossil guitar helmet iron jelly koala lizard marble noodle "
    "olive pillow rhythm shadow thunder turtle vessel whistle circle meteor piano "
    "copper crystal blanket compass harvest "
).split()

INSTRUCTIONS = (
    "Reverse the order of these words: {words}",
    "Write these words in reverse order: {words}",
    "List these words backwards, last word first: {words}",
)
SYSTEM = "You reverse word lists. Answer with the reversed list only."


def _row(rng: random.Random, n_words: int, template: str | None = None) -> dict[str, str]:
    words = rng.sample(WORDS, n_words)
    template = template or rng.choice(INSTRUCTIONS)
    return {"instruction": template.format(words=", ".join(words)), "output": ", ".join(reversed(words))}


def generate(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [_row(rng, rng.choice((3, 4))) for _ in range(n)]
    # Curation has real work to do: each kind below is counted in the stage reports.
    rows += [dict(rng.choice(rows)) for _ in range(n // 30)]  # exact duplicates
    for src in rng.sample(rows[:n], n // 30):  # near duplicates: same answer, reworded instruction
        words = src["instruction"].split(": ", 1)[1]
        other = [t for t in INSTRUCTIONS if not src["instruction"].startswith(t.split("{")[0])][0]
        rows.append({"instruction": other.format(words=words), "output": src["output"]})
    rows += [{"instruction": _row(rng, 3)["instruction"], "output": "   "} for _ in range(5)]  # empty
    rows += [_row(rng, 90) for _ in range(4)]  # over-long
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "data/demo/reverse_words.jsonl")
    write_jsonl(out, generate())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
