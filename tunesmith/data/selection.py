"""Which curated rows go on to training: all, the top-k longest, or a seeded random k.
Kept rows stay in their original order, so a later split does not depend on the strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def positions(n_tokens: np.ndarray, section: dict[str, Any]) -> np.ndarray:
    """The sorted positions of the rows kept, from every row's n_tokens alone (all a stream needs)."""
    strategy = section["strategy"]
    k = int(section["k"])
    rows_in = len(n_tokens)
    if strategy == "all" or k >= rows_in:
        return np.arange(rows_in)
    if strategy == "top_k":
        # Stable sort: among equal lengths the earlier row wins, so reruns pick the same rows.
        return np.sort(np.argsort(-np.asarray(n_tokens), kind="stable")[:k])
    if strategy == "random_k":
        rng = np.random.default_rng(int(section["seed"]))
        return np.sort(rng.choice(rows_in, size=k, replace=False))
    raise ValueError(f"unknown select.strategy {strategy!r}")


def report(n_tokens: np.ndarray, kept: np.ndarray, section: dict[str, Any]) -> dict[str, Any]:
    """kept: the positions positions() returned."""
    strategy = section["strategy"]
    k = int(section["k"])
    rows_in = len(n_tokens)
    kept_tokens = np.asarray(n_tokens)[kept]
    return {"strategy": strategy, "k": k if strategy != "all" else None, "rows_in": rows_in,
            "rows_out": len(kept), "tokens_in": int(np.sum(n_tokens)),
            "tokens_out": int(kept_tokens.sum()),
            "min_tokens_kept": int(kept_tokens.min()) if len(kept) else 0,
            "note": f"k={k} >= {rows_in} rows: all kept" if strategy != "all" and k >= rows_in else ""}


def apply(frame: pd.DataFrame, section: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    frame = frame.reset_index(drop=True)
    n_tokens = frame["n_tokens"].to_numpy()
    kept = positions(n_tokens, section)
    return frame.iloc[kept].reset_index(drop=True), report(n_tokens, kept, section)
