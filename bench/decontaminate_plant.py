"""Decontamination figures: GSM8K test questions planted in a GSM8K train sample (tests/plant_helpers.py:
30 verbatim, 20 edited, 500 clean), found by the default 13-gram check and with the embedding
check at several thresholds. Prints one run's figures (no repeats).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decontaminate_plant.py [--shared ../shared/data] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from plant_helpers import planted_sample  # noqa: E402

from tunesmith.data import decontaminate as decon  # noqa: E402
from tunesmith.data import duplicates as dedupe  # noqa: E402  (the embedding near-dedupe)
from tunesmith.schema import section_defaults  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.95")
    args = parser.parse_args()
    rows, docs, kinds = planted_sample(Path(args.shared) / "gsm8k")
    frame = pd.DataFrame([{"input": "", "system": "", "text": "", **r} for r in rows])
    fmt = section_defaults("format")

    def found(kept):
        flagged = {int(i) for i, c in zip(kept["id"], kept["contamination"]) if c}
        return {k: f"{len(ids & flagged)}/{len(ids)}" for k, ids in kinds.items()}

    t0 = time.perf_counter()
    kept, _ = decon.run(frame, {"gsm8k_local": docs}, section_defaults("decontaminate", {"split_leakage": False}), fmt)
    print(f"13-gram (default): {found(kept)}  {time.perf_counter() - t0:.2f} s for {len(rows)} rows x {len(docs)} docs")

    t0 = time.perf_counter()
    model = dedupe.load_embedder("default", offline=True, device=args.device)
    print(f"embedder load {time.perf_counter() - t0:.1f} s on {model.device}")
    texts = [decon.row_text(r) for r in frame.to_dict("records")]
    t0 = time.perf_counter()
    vectors = dedupe.embed(model, docs + texts)
    seconds = time.perf_counter() - t0
    print(f"embedding {len(docs) + len(texts)} texts: {seconds:.1f} s, {(len(docs) + len(texts)) / seconds:.0f} rows/s")
    doc_v, row_v = vectors[: len(docs)], vectors[len(docs):]
    for threshold in map(float, args.thresholds.split(",")):
        emb = {m.row for m in decon.embedding_matches(doc_v, row_v, threshold)}
        ngram = {i for i, c in enumerate(kept["contamination"]) if c}
        both = emb | ngram
        ids = [int(i) for i in frame["id"]]
        per = {k: f"{sum(ids[p] in v for p in both)}/{len(v)}" for k, v in kinds.items()}
        only = {k: f"{sum(ids[p] in v for p in emb)}/{len(v)}" for k, v in kinds.items()}
        print(f"embedding >= {threshold}: alone {only}; with 13-gram {per}")


if __name__ == "__main__":
    main()
