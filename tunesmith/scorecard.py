"""The scorecard of a tuned model: base -> tuned -> each GGUF per task and metric, with the
difference, its standard error and a regression flag, the headline figure, contamination counts
beside each score, the chain back to the root base model, and the comparison plot."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from tunesmith import fileio
from tunesmith.errors import TunesmithError
from tunesmith.tasks import LOWER_IS_BETTER, short_metric


def _delta_stderr(p1: float, n1: int | None, p2: float, n2: int | None) -> float | None:
    if not n1 or not n2 or not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        return None
    return math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)



def metric_values(task: dict[str, Any], metric: str | None = None) -> dict[str, float]:
    """A task's figures by short name (scores written before free-form metrics have only one)."""
    return task.get("metrics") or {short_metric(task.get("metric") or metric or "score"): task["score"]}



def metric_table(name: str, b: dict[str, Any] | None, t: dict[str, Any], gguf: dict[str, Any] | None) -> dict[str, Any]:
    """Every figure of one task: base, tuned, delta and each GGUF's, with its direction."""
    out = {}
    for metric, value in metric_values(t).items():
        before = metric_values(b).get(metric) if b else None
        entry: dict[str, Any] = {"base": before, "tuned": value,
                                 "delta": None if before is None else value - before,
                                 "higher_is_better": metric not in LOWER_IS_BETTER}
        scores = {q: metric_values(g["tasks"][name], t["metric"]).get(metric) for q, g in (gguf or {}).items()
                  if name in g["tasks"]}
        if any(v is not None for v in scores.values()):
            entry["gguf"] = {q: v for q, v in scores.items() if v is not None}
        out[metric] = entry
    return out



# Held-out references longer than this (median words per answer) are free-form: code, chat,
# explanations. Exact match stays 0 on them however much the model learns, so the headline a recipe
# does not name is chrF there. Short answers (a label, a number, a word list) keep exact match.
FREE_FORM_WORDS = 10


def auto_headline(tasks: dict[str, Any], answers: list[str] | None) -> dict[str, str]:
    """The headline a recipe without evaluate.headline gets, and why: for heldout, exact match or
    chrF by the median length of the scored reference answers; for any other task its primary metric."""
    task = next(iter(tasks))
    primary = short_metric(tasks[task]["metric"])
    if task != "heldout" or not answers:
        return {"task": task, "metric": primary, "chosen_by": "default",
                "reason": f"{task}'s primary metric (the first task of evaluate.tasks)"}
    words = sorted(len(a.split()) for a in answers)
    median = words[len(words) // 2] if len(words) % 2 else (words[len(words) // 2 - 1] + words[len(words) // 2]) / 2
    if median > FREE_FORM_WORDS and "chrf" in tasks[task]["metrics"]:
        return {"task": task, "metric": "chrf", "chosen_by": "data",
                "reason": f"free-form references: median {median:g} words per held-out answer (> {FREE_FORM_WORDS}), "
                          f"where exact match stays near 0; chrF credits partly right answers"}
    return {"task": task, "metric": primary, "chosen_by": "data",
            "reason": f"short references: median {median:g} words per held-out answer (<= {FREE_FORM_WORDS}), "
                      f"where an answer is right or wrong as a whole"}


def headline(comparison: dict[str, Any], wanted: dict[str, str] | None,
             answers: list[str] | None = None) -> dict[str, Any]:
    """The recipe's headline figure (evaluate.headline; null: chosen by auto_headline from the
    scored reference answers), from the comparison's tasks, with why it was chosen. An unknown
    metric names the ones the task has."""

    tasks = comparison["tasks"]
    if not tasks:
        return {}
    if wanted:
        choice = {**wanted, "chosen_by": "recipe", "reason": "evaluate.headline in the recipe"}
        if choice["task"] not in tasks:
            raise TunesmithError(f"evaluate.headline.task '{choice['task']}' was not scored (tasks: {', '.join(tasks)})")
    else:
        choice = auto_headline(tasks, answers)
    task, metric = choice["task"], choice["metric"]
    metrics = tasks[task]["metrics"]
    if metric not in metrics:
        near = difflib.get_close_matches(metric, list(metrics), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise TunesmithError(f"evaluate.headline.metric '{metric}': task '{task}' has no such metric; "
                             f"{hint}it reports {', '.join(metrics)}")
    return {"task": task, "metric": metric, **metrics[metric], "chosen_by": choice["chosen_by"],
            "reason": choice["reason"]}



def compare(base: dict[str, Any], tuned: dict[str, Any], wanted_headline: dict[str, str] | None = None,
            answers: list[str] | None = None) -> dict[str, Any]:
    """answers: the held-out reference answers that were scored (they choose a headline the
    recipe does not name)."""
    tasks = {}
    for name, t in tuned["tasks"].items():
        b = base["tasks"].get(name)
        entry: dict[str, Any] = {
            "metric": t["metric"],
            "limit": t["limit"],
            "base": b["score"] if b else None,
            "base_limit": b["limit"] if b else None,
            "tuned": t["score"],
            "delta": (t["score"] - b["score"]) if b else None,
        }
        if b is not None:
            # A chain that regresses must say so: tuned below its base (for a chained recipe, the
            # upstream model), with the standard error of the difference of two proportions so a
            # reader can tell a row or two of noise from a real drop.
            entry["regressed"] = t["score"] < b["score"]
            entry["delta_stderr"] = _delta_stderr(t["score"], t["limit"], b["score"], b["limit"])
        gguf = {q: g["tasks"][name]["score"] for q, g in (tuned.get("gguf") or {}).items() if name in g["tasks"]}
        if gguf:
            entry["gguf"] = gguf
            entry["gguf_delta_vs_tuned"] = {q: s - t["score"] for q, s in gguf.items()}
        entry["metrics"] = metric_table(name, b, t, tuned.get("gguf"))
        tasks[name] = entry
    out = {"base_model": base.get("model"), "tuned_model": tuned.get("model"), "tasks": tasks}
    # the headline leads the file: it is what a reader should look at first
    return {"headline": headline(out, wanted_headline, answers), **out}



def add_contamination(comparison: dict[str, Any], report: dict[str, Any]) -> None:
    """Each task's contamination count (the decontaminate stage's report) beside its score:
    training rows matching the task's documents (for heldout: train rows leaking into the held-out
    split), and whether they were dropped or only flagged. A task it could not check says why."""
    method = f"{report.get('ngram')}-gram" + (" + embedding" if report.get("embedding") else "")
    for name, entry in comparison["tasks"].items():
        found = report["heldout"] if name == "heldout" else (report.get("tasks") or {}).get(name)
        if found is not None and (name != "heldout" or found.get("rows_checked")):
            entry["contamination"] = {"rows": found["rows_matched"], "rows_checked": found["rows_checked"],
                                      "action": report["action"], "method": method}
        else:
            entry["contamination"] = {"rows": None, "not_checked": (report.get("not_checked") or {}).get(
                name, "no documents to check against")}



def chain(upstream: dict[str, Any], comparison: dict[str, Any], recipe: str, source: str) -> list[dict[str, Any]]:
    """base -> each recipe of a chain -> this recipe -> its GGUFs, per task. Upstream entries are
    the upstream comparison's own scores (its held-out rows; `source` names the file): a chained
    recipe on the same data shows its upstream model's score twice, here and as its own base."""
    links = upstream.get("chain") or [
        {"label": "base", "model": upstream.get("base_model"),
         "tasks": {n: t["base"] for n, t in upstream["tasks"].items()}},
        {"label": upstream.get("recipe") or "upstream", "model": upstream.get("tuned_model"),
         "tasks": {n: t["tuned"] for n, t in upstream["tasks"].items()}},
    ]
    # an upstream's GGUF scores are not on the way to this recipe's model
    links = [dict(link, source=link.get("source", source)) for link in links if not link.get("gguf")]
    links.append({"label": recipe, "model": comparison.get("tuned_model"),
                  "tasks": {n: t["tuned"] for n, t in comparison["tasks"].items()}})
    for qtype in sorted({q for t in comparison["tasks"].values() for q in t.get("gguf", {})}):
        links.append({"label": qtype, "gguf": True, "tasks": {n: t["gguf"][qtype] for n, t in comparison["tasks"].items()
                                               if qtype in t.get("gguf", {})}})
    return links



def plot(comparison: dict[str, Any], path: str | Path, title: str = "") -> None:
    """One panel per task and metric, each on its own scale (chrF is 0-100, perplexity unbounded),
    the headline first: base, tuned and each GGUF side by side."""
    plt = fileio.pyplot()

    head = comparison.get("headline") or {}
    panels = [(n, m) for n, t in comparison["tasks"].items() for m in (t.get("metrics") or {short_metric(t["metric"]): {}})]
    panels.sort(key=lambda p: p != (head.get("task"), head.get("metric")))
    qtypes = sorted({q for t in comparison["tasks"].values() for q in t.get("gguf", {})}, key=lambda q: ("Q8" not in q, q))
    series = ["base", "tuned", *qtypes]
    # Fixed colours: matplotlib's cycle would paint the first GGUF bar the same blue as "tuned".
    palette = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    colors = {"base": "#9e9e9e", "tuned": "#1f77b4", **{q: palette[i % len(palette)] for i, q in enumerate(qtypes)}}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 0.55 * len(series) * len(panels) + 1.2 * len(panels)), 3.6),
                             squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        t = comparison["tasks"][task]
        m = (t.get("metrics") or {}).get(metric) or {"base": t.get("base"), "tuned": t.get("tuned"), "gguf": t.get("gguf", {})}
        values = [m.get(s) if s in ("base", "tuned") else (m.get("gguf") or {}).get(s) for s in series]
        bars = ax.bar(range(len(series)), [v or 0 for v in values], 0.7, color=[colors[s] for s in series])
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0)),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(series)), series, fontsize=7, rotation=30)
        star = "★ " if (task, metric) == (head.get("task"), head.get("metric")) else ""
        arrow = "" if m.get("higher_is_better", True) else " (lower is better)"
        dirty = (t.get("contamination") or {}).get("rows")
        dirty = "" if dirty is None else f", contaminated rows {dirty}"
        ax.set_title(f"{star}{task}: {metric}{arrow}\nn={t['limit']}{dirty}", fontsize=8)
        if metric in ("exact_match",) or metric.startswith("exact_match,"):
            ax.set_ylim(0, 1.15)
    fig.suptitle(title or "base vs tuned" + (" vs GGUF" if qtypes else ""), fontsize=9)
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)
