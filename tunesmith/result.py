"""What a stage returns. The runner (tunesmith.runner) records it; the stage never talks to MLflow.

- metrics: scalar figures under fixed names (rows_out, seconds_per_step, ...): MLflow metrics.
- histories: step curves, name -> [(step, value)]: MLflow step metrics (train_loss, eval_loss).
- figures: nested, structured results (scores per task and model, one entry per GGUF type).
  They are stored as JSON beside the record and as the `tunesmith.figures` tag, and flattened
  into MLflow metrics only for the UI: readers take the JSON, never parse metric names back.
- artifacts: files worth opening in the UI (reports, plots).
- summary: the one line printed on the terminal when the stage ends.
- delegated: the work ran in child processes (a multi-GPU relaunch) whose rank 0 recorded it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    metrics: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    delegated: bool = False

    def artifact(self, *paths: str | Path) -> "Result":
        self.artifacts.extend(str(p) for p in paths)
        return self


def flatten_figures(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested figures -> dotted MLflow metric names (numbers only), for display in the UI."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_figures(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
