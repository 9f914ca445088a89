"""Compare recipes, sweep variants and runs from MLflow: one row per (recipe, variant), built
with `mlflow.search_runs` from the stage child runs that tunesmith.tracking pushes.

What each stage contributes (missing figures leave empty cells, never an error):
  data stages      metrics.rows_out                           -> rows.<stage>
  train/pretrain   train_loss (step history)                  -> train_loss.first / .last / .steps
  evaluate(_base)  the figures tag: tasks -> {base | tuned | <GGUF type>: score}
                                                              -> eval.<task>.<label>, eval.<task>.delta
                   its other metrics (chrf, ref_logprob, ...)  -> eval.<task>.<metric>.<label>
                   training rows matching its documents       -> eval.<task>.contaminated_rows
                   the recipe's headline figure               -> headline, headline.<label> (first)
  quantize         the figures tag: gguf -> {<type>: {size_bytes, top1_agreement, ...}}
                                                              -> gguf.<type>.MB / .agreement
  every stage      stage_seconds (tracking_run.finish)            -> seconds.<stage>
Structured figures are read as JSON (tunesmith.result); no metric name is parsed back.

Per (recipe, variant, stage) the latest run wins: a later invocation that skipped up-to-date
data stages still reads them from the earlier one. `by_invocation=True` keeps one row per
invocation instead (only stages that invocation ran).
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

from tunesmith.fileio import pyplot, save_figure, write_text
from tunesmith.pipeline import DATA_STAGES, STAGE_ORDER
from tunesmith.tracking import redact_uri
from tunesmith.tracking_writer import tracking_folder

log = logging.getLogger("tunesmith.compare")

SWEEP_PARAMS = ("train.method", "train.lora.r", "train.lora.alpha", "train.args.learning_rate",
                "train.args.num_train_epochs", "train.args.max_steps", "model.base")


def search_stage_runs(uri: str, experiments: list[str] | None = None):
    """All tunesmith stage runs (pandas DataFrame, mlflow.search_runs columns)."""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow

    mlflow.set_tracking_uri(uri)
    kwargs: dict[str, Any] = {"filter_string": "tags.`tunesmith.role` = 'stage'", "output_format": "pandas"}
    if experiments:
        client = mlflow.MlflowClient(tracking_uri=uri)
        known = [e for e in experiments if client.get_experiment_by_name(e) is not None]
        missing = sorted(set(experiments) - set(known))
        if missing:
            log.warning("no MLflow experiment named %s at %s", ", ".join(missing), uri)
        if not known:
            return pd.DataFrame()
        kwargs["experiment_names"] = known
    else:
        kwargs["search_all_experiments"] = True
    runs = mlflow.search_runs(**kwargs)
    if runs.empty:
        return runs
    if "status" in runs:
        runs = runs[runs["status"] == "FINISHED"]
    return runs.sort_values("start_time").reset_index(drop=True)


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _figures(run: Any) -> dict[str, Any]:
    """A stage run's structured figures (the tunesmith.figures tag), {} when it has none."""
    if run is None:
        return {}
    text = run.get("tags.tunesmith.figures")
    if not isinstance(text, str) or not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        log.warning("run %s: its figures tag is not JSON (truncated?)", run.get("run_id"))
        return {}


def _loss_history(uri: str, run_id: str) -> list[float]:
    from mlflow import MlflowClient

    try:
        history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train_loss")
    except Exception:  # noqa: BLE001 - a missing history is an empty cell
        return []
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def _row_for(stages: dict[str, Any], uri: str) -> dict[str, Any]:
    """One comparison row from {stage: run (a pandas Series)}."""
    row: dict[str, Any] = {}
    train = stages.get("train") if "train" in stages else stages.get("pretrain")
    params_from = train if train is not None else next(iter(stages.values()))
    for key in SWEEP_PARAMS:
        value = params_from.get(f"params.{key}") if params_from is not None else None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            row[key.split(".", 1)[1] if key.startswith("train.") else key] = value
    for stage in DATA_STAGES:
        run = stages.get(stage)
        if run is not None:
            rows = _num(run.get("metrics.rows_out"))
            if stage == "format" and rows is None:
                parts = [_num(run.get(f"metrics.rows_{k}")) for k in ("train", "eval")]
                rows = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
            if rows is not None:
                row[f"rows.{stage}"] = int(rows)
    if train is not None:
        history = _loss_history(uri, train["run_id"])
        last = _num(train.get("metrics.train_loss"))
        if history:
            row["train_loss.first"] = history[0]
            row["train_loss.last"] = history[-1]
            row["train_loss.steps"] = len(history)
        elif last is not None:
            row["train_loss.last"] = last
    base_scores = _figures(stages.get("evaluate_base")).get("tasks", {})
    tuned_scores = _figures(stages.get("evaluate")).get("tasks", {})
    for task in sorted({*base_scores, *tuned_scores}):
        # The tuned run's own base scores (copied from evaluate_base's file) win.
        values = {"base": base_scores.get(task, {}).get("base"), **tuned_scores.get(task, {})}
        for label, value in values.items():
            if label not in ("limit", "metric", "delta") and _num(value) is not None:
                row[f"eval.{task}.{label}"] = _num(value)
        if _num(values.get("base")) is not None and _num(values.get("tuned")) is not None:
            row[f"eval.{task}.delta"] = _num(values["tuned"]) - _num(values["base"])
        primary = str(values.get("metric", "")).removesuffix(",none")
        base_metrics = base_scores.get(task, {}).get("metrics") or {}
        for metric, labels in (tuned_scores.get(task, {}).get("metrics") or {}).items():
            if metric == primary:
                continue
            for label, value in {"base": (base_metrics.get(metric) or {}).get("base"), **labels}.items():
                if _num(value) is not None:
                    row[f"eval.{task}.{metric}.{label}"] = _num(value)
    head = _figures(stages.get("evaluate")).get("headline") or {}
    if head.get("task"):
        row["headline"] = f"{head['task']} {head['metric']}"
        for label, value in sorted(head.items(), key=lambda kv: ("base", "tuned", "delta").index(kv[0])
                                   if kv[0] in ("base", "tuned", "delta") else 3):
            if label not in ("task", "metric", "higher_is_better") and _num(value) is not None:
                row[f"headline.{label}"] = _num(value)
    for qtype, g in _figures(stages.get("quantize")).get("gguf", {}).items():
        if _num(g.get("size_bytes")) is not None:
            row[f"gguf.{qtype}.MB"] = round(_num(g["size_bytes"]) / 1e6, 2)
        if _num(g.get("top1_agreement")) is not None:
            row[f"gguf.{qtype}.agreement"] = _num(g["top1_agreement"])
    for stage in STAGE_ORDER:
        run = stages.get(stage)
        if run is not None and _num(run.get("metrics.stage_seconds")) is not None:
            row[f"seconds.{stage}"] = round(_num(run.get("metrics.stage_seconds")), 1)
    return row


def table(uri: str, experiments: list[str] | None = None, by_invocation: bool = False):
    """The comparison as a pandas DataFrame: recipe, variant, [invocation], then the figures."""
    import pandas as pd

    runs = search_stage_runs(uri, experiments)
    if runs.empty:
        return pd.DataFrame(columns=["recipe", "variant"])

    def tag(run: Any, key: str) -> str:
        value = run.get(f"tags.tunesmith.{key}")
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    # latest run per (recipe, [invocation,] variant, stage); data stages have variant "".
    latest: dict[tuple[str, str, str, str], Any] = {}
    for _, run in runs.iterrows():
        inv = tag(run, "invocation") if by_invocation else ""
        latest[(tag(run, "recipe"), inv, tag(run, "variant"), tag(run, "stage"))] = run
    groups = sorted({(r, i) for r, i, _, _ in latest})
    rows = []
    for recipe, inv in groups:
        variants = sorted({v for r, i, v, _ in latest if (r, i) == (recipe, inv) and v}, key=_natural) or ["main"]
        shared = {s: run for (r, i, v, s), run in latest.items() if (r, i) == (recipe, inv) and not v}
        for variant in variants:
            stages = dict(shared)
            stages.update({s: run for (r, i, v, s), run in latest.items() if (r, i, v) == (recipe, inv, variant)})
            row = {"recipe": recipe, "variant": variant}
            if by_invocation:
                row["invocation"] = inv
            row.update(_row_for(stages, uri))
            rows.append(row)
    frame = pd.DataFrame(rows)
    for col in frame.columns:  # counts stay integers even where another row has no value
        if col.startswith("rows.") or col == "train_loss.steps":
            frame[col] = frame[col].astype("Int64")
    front = [c for c in ("recipe", "variant", "invocation", "method", "lora.r", "args.learning_rate") if c in frame]
    rest = [c for c in frame.columns if c not in front]
    order = {"rows": 0, "train_loss": 1, "headline": 2, "eval": 3, "gguf": 4, "seconds": 5}
    rest.sort(key=lambda c: (order.get(c.split(".")[0], -1), _stage_rank(c)))
    return frame[front + rest]


def _natural(text: str) -> list:
    """r-8 before r-16: digits compare as numbers."""
    return [(0, float(p), "") if re.fullmatch(r"\d+(\.\d+)?", p) else (1, 0.0, p)
            for p in re.split(r"(\d+(?:\.\d+)?)", text) if p]


def _stage_rank(column: str) -> int:
    parts = column.split(".")
    if len(parts) > 1 and parts[1] in STAGE_ORDER:
        return STAGE_ORDER.index(parts[1])
    return 0


def _fmt(value: Any) -> str:
    import pandas as pd

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(frame: Any, uri: str) -> str:
    lines = ["# tunesmith comparison", "",
             f"From MLflow at `{redact_uri(uri)}`: the latest finished stage runs per recipe and sweep variant.",
             "Empty cells: that stage did not run or did not log the figure.", ""]
    if frame.empty:
        return "\n".join(lines + ["No tunesmith stage runs found.", ""])
    groups = [("Run", [c for c in frame.columns if not re.match(r"^(rows|train_loss|eval|gguf|seconds)\.|^headline", c)]),
              ("Data rows after each curation stage", [c for c in frame.columns if c.startswith("rows.")]),
              ("Training loss", [c for c in frame.columns if c.startswith("train_loss.")]),
              ("Evaluation before/after (the recipe's headline first)",
               [c for c in frame.columns if c.startswith("headline")] + [c for c in frame.columns if c.startswith("eval.")]),
              ("GGUF", [c for c in frame.columns if c.startswith("gguf.")]),
              ("Wall time per stage (s)", [c for c in frame.columns if c.startswith("seconds.")])]
    for title, cols in groups:
        if not cols:
            continue
        if title != "Run":
            cols = ["recipe", "variant", *cols]
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, row in frame.iterrows():
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(frame: Any, path: str | Path) -> None:
    """Four panels: rows through curation, loss first/last, eval base/tuned, seconds per stage."""

    plt = pyplot()
    import numpy as np
    import pandas as pd

    frame = frame.copy()
    for col in frame.columns:
        if re.match(r"^(rows|train_loss|eval|gguf|seconds|headline)\.", col):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    labels = [f"{r}\n{v}" for r, v in zip(frame.get("recipe", []), frame.get("variant", []))]
    x = np.arange(len(labels))

    ax = axes[0][0]
    rows_cols = [c for c in frame.columns if c.startswith("rows.")]
    for (_, row), label in zip(frame.iterrows(), labels):
        ys = [row.get(c) for c in rows_cols]
        ax.plot([c.split(".", 1)[1] for c in rows_cols], ys, marker="o", label=label.replace("\n", " "))
    ax.set_title("Rows after each curation stage")
    ax.tick_params(axis="x", rotation=30)
    if rows_cols:
        ax.legend(fontsize=7)

    ax = axes[0][1]
    for i, (col, name) in enumerate((("train_loss.first", "first"), ("train_loss.last", "last"))):
        if col in frame:
            ax.bar(x + (i - 0.5) * 0.4, frame[col].astype(float).fillna(0), 0.4, label=name)
    ax.set_title("Train loss (first / last logged step)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.legend(fontsize=7)

    ax = axes[1][0]
    # primary metrics only (eval.<task>.<label>): chrF (0-100) or perplexity would flatten the rest
    eval_cols = [c for c in frame.columns if c.startswith("eval.") and c.count(".") == 2
                 and not c.endswith((".delta", ".limit", ".contaminated_rows"))]
    width = 0.8 / max(1, len(eval_cols))
    for i, col in enumerate(eval_cols):
        ax.bar(x + (i - (len(eval_cols) - 1) / 2) * width, frame[col].astype(float).fillna(0), width,
               label=col.removeprefix("eval."))
    ax.set_title("Eval scores: base vs tuned")
    ax.set_xticks(x, labels, fontsize=7)
    if eval_cols:
        ax.legend(fontsize=7)

    ax = axes[1][1]
    sec_cols = [c for c in frame.columns if c.startswith("seconds.")]
    bottom = np.zeros(len(labels))
    for col in sec_cols:
        values = frame[col].astype(float).fillna(0).to_numpy()
        ax.bar(x, values, 0.6, bottom=bottom, label=col.removeprefix("seconds."))
        bottom += values
    ax.set_title("Wall time per stage (s)")
    ax.set_xticks(x, labels, fontsize=7)
    if sec_cols:
        ax.legend(fontsize=6, ncol=2)

    fig.suptitle("tunesmith: recipes and sweep variants")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write(uri: str, out_dir: str | Path, experiments: list[str] | None = None,
          by_invocation: bool = False) -> dict[str, Path]:
    """Write compare.md, compare.csv and compare.png under out_dir; returns their paths."""

    frame = table(uri, experiments, by_invocation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}
    write_text(paths["md"], to_markdown(frame, uri))
    write_text(paths["csv"], frame.to_csv(index=False))
    plot(frame, paths["png"])
    log.info("compared %d row(s) from %s into %s", len(frame), redact_uri(uri), out)
    return paths


def write_unreachable(uri: str, out_dir: Path, waiting: list[Path], exc: BaseException) -> dict[str, Path]:
    folders = sorted({str(tracking_folder(p).parent) for p in waiting})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "png": out_dir / "compare.png"}
    cause = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    write_text(paths["md"], "\n".join([
        "# tunesmith comparison", "",
        f"MLflow at `{redact_uri(uri)}` could not be read ({cause}).",
        f"{len(waiting)} stage record(s) wait in their files. When the server is back:", "",
        f"    tunesmith sync-mlflow {' '.join(folders)}",
        "    tunesmith compare --out " + str(out_dir), ""]))
    write_text(paths["csv"], "")
    import pandas as pd  # as every function here: the workflow's other jobs need not pay for it

    plot(pd.DataFrame(columns=["recipe", "variant"]), paths["png"])
    log.warning("MLflow at %s unreachable: %d record(s) wait; compare.md says how to compare later",
                redact_uri(uri), len(waiting))
    return paths
