"""Every row a data stage drops is counted: rows per source of a mixture in and out of a stage, and
the figures every data stage's Result carries (load / work seconds, peak resident memory)."""

from __future__ import annotations

from typing import Any

from tunesmith.data import batches
from tunesmith.result import Result


class SourceTally:
    """by_source() accumulated batch by batch: rows per source in and out of a stage."""

    def __init__(self) -> None:
        self.rows_in: dict[str, int] = {}
        self.rows_out: dict[str, int] = {}
        self.seen = False

    @staticmethod
    def _add(into: dict[str, int], values: Any) -> None:
        for name, n in pd_value_counts(values).items():
            into[str(name)] = into.get(str(name), 0) + int(n)

    def add(self, batch: Any, keep: Any = None) -> None:
        """batch: an arrow batch (its `source` column, when it has one); keep: the mask of the rows kept."""
        if "source" not in batch.schema.names:
            return
        self.seen = True
        values = batch.column("source").to_numpy(zero_copy_only=False)
        self._add(self.rows_in, values)
        self._add(self.rows_out, values if keep is None else values[keep])

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "in": dict(self.rows_in), "out": dict(self.rows_out)}

    def absorb(self, state: dict[str, Any]) -> None:
        """Add a shard's state(); in shard order the sources keep the order a single pass meets them in."""
        self.seen = self.seen or bool(state["seen"])
        for into, counts in ((self.rows_in, state["in"]), (self.rows_out, state["out"])):
            for name, n in counts.items():
                into[name] = into.get(name, 0) + int(n)

    def result(self) -> dict[str, dict[str, int]] | None:
        if not self.seen:
            return None
        return {name: {"in": n, "out": self.rows_out.get(name, 0)} for name, n in self.rows_in.items()}



def pd_value_counts(values: Any) -> Any:
    import pandas as pd

    return pd.Series(values).value_counts(sort=False)



def by_source(before: Any, after: Any) -> dict[str, dict[str, int]] | None:
    """Rows per source of a mixture in and out of a stage (None for a single source)."""
    if "source" not in getattr(after, "columns", ()):
        return None
    counts_in, counts_out = before["source"].value_counts(), after["source"].value_counts()
    return {str(name): {"in": int(counts_in.get(name, 0)), "out": int(counts_out.get(name, 0))}
            for name in counts_in.index}



def source_metrics(per_source: dict[str, dict[str, int]] | None) -> dict[str, int]:
    return {f"rows_out.{name}": c["out"] for name, c in (per_source or {}).items()}



def stage_result(metrics: dict[str, Any], *artifacts: str, summary: str = "") -> Result:
    metrics["seconds"] = metrics["load_seconds"] + metrics["work_seconds"]
    metrics["peak_rss_mb"] = batches.peak_rss_mb()
    return Result(metrics=metrics, artifacts=[str(a) for a in artifacts], summary=summary)
