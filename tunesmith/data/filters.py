"""Row filters. Rules apply in a fixed order and each dropped row is counted under the first
rule it fails, so ``rows_in == rows_out + sum(drops.values())`` always holds."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from tunesmith.data import batches, tokens
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


class Accounting:
    """Drops by reason over a stream of batches: the first rule a row fails counts it. The
    "a rule left no rows" check needs every batch, so report() makes it once they are all in."""

    def __init__(self, examples: int = 5):
        self.examples = examples
        self.rows_in = self.rows_out = self.tokens_in = self.tokens_out = 0
        self.drops: dict[str, int] = {}
        self.dropped_ids: dict[str, list[int]] = {}
        self.alive_after: dict[str, int] = {}

    def add(self, frame: pd.DataFrame, masks: list[tuple[str, np.ndarray]]) -> np.ndarray:
        """One batch's rows and its rules' drop masks; returns the mask of the rows kept."""
        alive = np.ones(len(frame), dtype=bool)
        for reason, mask in masks:
            hit = alive & mask
            self.drops[reason] = self.drops.get(reason, 0) + int(hit.sum())
            ids = self.dropped_ids.setdefault(reason, [])
            if len(ids) < self.examples and hit.any():
                ids.extend(frame.loc[hit, "id"].head(self.examples - len(ids)).astype(int).tolist())
            alive &= ~mask
            self.alive_after[reason] = self.alive_after.get(reason, 0) + int(alive.sum())
        n = frame["n_tokens"].to_numpy()
        self.rows_in += len(frame)
        self.rows_out += int(alive.sum())
        self.tokens_in += int(n.sum())
        self.tokens_out += int(n[alive].sum())
        return alive

    def state(self) -> dict[str, Any]:
        """What a shard job hands its gather (no check: a shard may lose every row, the data may not)."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "drops": dict(self.drops), "example_ids": dict(self.dropped_ids),
                "alive_after": dict(self.alive_after)}

    def absorb(self, state: dict[str, Any]) -> None:
        """Add a shard's state(); absorbed in shard order, the report is the one a single pass gives."""
        for key in ("rows_in", "rows_out", "tokens_in", "tokens_out"):
            setattr(self, key, getattr(self, key) + int(state[key]))
        for reason, n in state["drops"].items():
            self.drops[reason] = self.drops.get(reason, 0) + int(n)
        for reason, n in state["alive_after"].items():
            self.alive_after[reason] = self.alive_after.get(reason, 0) + int(n)
        for reason, ids in state["example_ids"].items():
            kept = self.dropped_ids.setdefault(reason, [])
            kept.extend(int(i) for i in ids[:max(0, self.examples - len(kept))])

    def report(self) -> dict[str, Any]:
        if self.rows_in:
            for i, (reason, left) in enumerate(self.alive_after.items()):
                if left == 0:
                    setting = f"filter.regex rule '{reason[6:]}'" if reason.startswith("regex:") else f"filter.{reason}"
                    so_far = dict(list(self.drops.items())[:i + 1])
                    raise DataError(f"filter '{reason}' removed the last {self.drops[reason]} rows, leaving none of "
                                    f"{self.rows_in} (drops so far: {so_far}). Loosen {setting}.")
        report = {"rows_in": self.rows_in, "rows_out": self.rows_out, "dropped": self.rows_in - self.rows_out,
                  "drops": dict(self.drops), "example_ids": dict(self.dropped_ids),
                  "tokens_in": self.tokens_in, "tokens_out": self.tokens_out}
        if report["rows_in"] != report["rows_out"] + sum(self.drops.values()):
            raise AssertionError(f"filter accounting is off: {report}")
        return report


def apply(frame: pd.DataFrame, section: dict[str, Any], examples: int = 5) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Filter canonical rows (with token counts). Returns kept rows and the report."""
    acc = Accounting(examples)
    alive = acc.add(frame, rules(section, frame))
    report = acc.report()
    return frame.loc[alive].reset_index(drop=True), report


def filter_batch(batch: Any, counts: Any, section: dict[str, Any], acc: Any, tally: Any) -> Any:
    """One raw batch with its counts attached, less the rows a rule drops (counted in acc and tally)."""
    batch = counts.attach(batch)
    frame = batch.drop_columns(["messages"]).to_pandas() if "messages" in batch.schema.names \
        else batch.to_pandas()
    alive = acc.add(frame, rules(section, frame))
    tally.add(batch, alive)
    return batches.take_mask(batch, alive)



def filtered_schema(raw_path: str) -> Any:
    """The schema filter writes: raw's columns, then the count columns (as CountIndex.attach makes them)."""
    import pyarrow as pa

    raw = batches.schema(raw_path)
    return pa.schema([pa.field(f.name, f.type) for f in raw if f.name not in tokens.COUNT_COLUMNS] +
                     [pa.field(c, pa.int64()) for c in tokens.COUNT_COLUMNS])
