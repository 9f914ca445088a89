"""Near duplicates planted for the MinHash tests and bench/data_scale.py --near minhash: a known
share of rows copied later in the data with word-level edits (a word replaced, dropped or
inserted) at several edit rates, each copy's true shingle Jaccard similarity to its original known."""

from __future__ import annotations

import random
from typing import Sequence

EDIT_RATES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
JACCARD_BANDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0001)


def edit_words(text: str, rate: float, rng: random.Random, vocab: Sequence[str]) -> str:
    """round(rate x words) edits (at least one when rate > 0), each a replaced, dropped or
    inserted word at a random place; rate 0 is an exact copy."""
    words = text.split(" ")
    edits = max(1, round(rate * len(words))) if rate > 0 else 0
    for _ in range(edits):
        i = rng.randrange(len(words)) if words else 0
        op = rng.randrange(3)
        if op == 0 and words:
            words[i] = rng.choice(vocab)
        elif op == 1 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def true_jaccard(a: str, b: str, n: int) -> float:
    from tunesmith.data.minhash import shingles

    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def plant(texts: list[str], share: float, *, seed: int = 0, rates: Sequence[float] = EDIT_RATES,
          vocab: Sequence[str] | None = None) -> tuple[list[str], list[tuple[int, int, float]]]:
    """texts with round(share x len) copies inserted after their originals (each at a random later
    place, rates in turn). Returns the new texts and (original position, copy position, rate)."""
    rng = random.Random(seed)
    vocab = vocab or sorted({w for t in texts[:2000] for w in t.split()})
    n_copies = round(share * len(texts))
    sources = sorted(rng.sample(range(len(texts)), n_copies))
    inserts: dict[int, list[tuple[int, float]]] = {}  # copies that go right after position p of texts
    for k, src in enumerate(sources):
        at = rng.randrange(src, len(texts))
        inserts.setdefault(at, []).append((src, rates[k % len(rates)]))
    out, where, planted = [], {}, []
    for pos, text in enumerate(texts):
        where[pos] = len(out)
        out.append(text)
        for src, rate in inserts.get(pos, ()):
            planted.append((where[src], len(out), rate))
            out.append(edit_words(texts[src], rate, rng, vocab))
    return out, planted
