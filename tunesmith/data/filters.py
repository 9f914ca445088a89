"""Row filters. Rules apply in a fixed order and each dropped row is counted under the first
rule it fails, so ``rows_in == rows_out + sum(drops.values())`` always holds."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from tunesmith.errors import DataError


def _is_blank(values: pd.Series) -> np.ndarray:
    return values.fillna("").astype(str).str.strip().eq("").to_numpy()


def rules(section: dict[str, Any], frame: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(reason, drop mask) per active rule, in the order they are applied. section: the recipe's
    filter section with schema defaults filled (regex rules included)."""
    out: list[tuple[str, np.ndarray]] = []
    if section["drop_empty"]:
        # Documents (text schema) have no instruction; an instruction row needs both sides.
        is_doc = ~_is_blank(frame["text"]) if "text" in frame else np.zeros(len(frame), bool)
        empty = _is_blank(frame["output"]) | (_is_blank(frame["instruction"]) & ~is_doc)
        out.append(("empty", empty))
    n = frame["n_tokens"].to_numpy()
    if section["min_tokens"]:
        out.append(("min_tokens", n < section["min_tokens"]))
    if section["max_tokens"] is not None:
        out.append(("max_tokens", n > section["max_tokens"]))
    if section["min_output_tokens"]:
        out.append(("min_output_tokens", frame["n_output_tokens"].to_numpy() < section["min_output_tokens"]))
    for rule in section["regex"]:
        try:
            pattern = re.compile(rule["pattern"])
        except re.error as exc:
            raise DataError(f"filter.regex rule '{rule['name']}': invalid pattern {rule['pattern']!r}: {exc}") from None
        fld = rule["field"]
        hits = frame[fld].fillna("").astype(str).map(lambda s: pattern.search(s) is not None).to_numpy(bool)
        drop = hits if rule["action"] == "drop" else ~hits
        out.append((f"regex:{rule['name']}", drop))
    return out


def apply(frame: pd.DataFrame, section: dict[str, Any], examples: int = 5) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Filter canonical rows (with token counts). Returns kept rows and the report."""
    rows_in = len(frame)
    alive = np.ones(rows_in, dtype=bool)
    drops: dict[str, int] = {}
    dropped_ids: dict[str, list[int]] = {}
    for reason, mask in rules(section, frame):
        hit = alive & mask
        drops[reason] = int(hit.sum())
        dropped_ids[reason] = frame.loc[hit, "id"].head(examples).astype(int).tolist()
        alive &= ~mask
        if rows_in and not alive.any():
            setting = f"filter.regex rule '{reason[6:]}'" if reason.startswith("regex:") else f"filter.{reason}"
            raise DataError(f"filter '{reason}' removed the last {drops[reason]} rows, leaving none of {rows_in} "
                            f"(drops so far: {drops}). Loosen {setting}.")
    kept = frame.loc[alive].reset_index(drop=True)
    report = {"rows_in": rows_in, "rows_out": len(kept), "dropped": rows_in - len(kept), "drops": drops,
              "example_ids": dropped_ids,
              "tokens_in": int(frame["n_tokens"].sum()), "tokens_out": int(kept["n_tokens"].sum())}
    if report["rows_in"] != report["rows_out"] + sum(drops.values()):
        raise AssertionError(f"filter accounting is off: {report}")
    return kept, report
