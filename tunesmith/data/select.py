"""Which curated rows go on to training: all, the top-k longest, or a seeded random k.
Kept rows stay in their original order, so a later split does not depend on the strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def apply(frame: pd.DataFrame, section: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    strategy = section["strategy"]
    k = int(section["k"])
    rows_in = len(frame)
    frame = frame.reset_index(drop=True)
    if strategy == "all" or k >= rows_in:
        positions = np.arange(rows_in)
    elif strategy == "top_k":
        # Stable sort: among equal lengths the earlier row wins, so reruns pick the same rows.
        positions = np.sort(np.argsort(-frame["n_tokens"].to_numpy(), kind="stable")[:k])
    elif strategy == "random_k":
        rng = np.random.default_rng(int(section["seed"]))
        positions = np.sort(rng.choice(rows_in, size=k, replace=False))
    else:
        raise ValueError(f"unknown select.strategy {strategy!r}")
    kept = frame.iloc[positions].reset_index(drop=True)
    report = {"strategy": strategy, "k": k if strategy != "all" else None, "rows_in": rows_in,
              "rows_out": len(kept), "tokens_in": int(frame["n_tokens"].sum()),
              "tokens_out": int(kept["n_tokens"].sum()),
              "min_tokens_kept": int(kept["n_tokens"].min()) if len(kept) else 0,
              "note": f"k={k} >= {rows_in} rows: all kept" if strategy != "all" and k >= rows_in else ""}
    return kept, report
