"""evaluate: lm-eval on the tuned model and each GGUF, compared with the base (and the upstream
recipe's model in a chain): base -> tuned -> Q8_0 -> Q4_K_M, with contamination counts beside each
score. evaluate_model serves evaluate_base too (the base model alone: it writes `scores`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunesmith import evaluation, fileio, scorecard
from tunesmith.result import Result
from tunesmith.stageio import StageIO
from tunesmith.tasks import short_metric, task_specs

log = logging.getLogger("tunesmith.evaluate")


def run(io: StageIO) -> Result:
    return evaluate_model(io.stage, io.input["tuned"], io.output, io.section, eval_jsonl=io.one("eval"),
                          template=io.one("template"), gguf_dir=io.one("gguf"), base_scores=io.one("base_scores"),
                          recipe=io.recipe, variant=io.variant, threads=io.threads, upstream=io.one("upstream"),
                          contamination=io.one("contamination"))


def evaluate_model(name: str, model_dir: str, outputs: dict[str, str], section: dict[str, Any], *, eval_jsonl: str | None,
          template: str | None, gguf_dir: str | None = None, base_scores: str | None = None, recipe: str,
          variant: str | None, threads: int = 2, upstream: str | None = None, contamination: str | None = None):
    """evaluate_base (the base model: writes `scores`) or evaluate (the tuned model, then each GGUF in
    gguf_dir, compared with base_scores: also writes `compare` and `plot`).
    Figures: tasks -> {base | tuned | <GGUF type>: score}."""
    from transformers import AutoTokenizer

    ev, model = section["evaluate"], section["model"]
    tuned_rule = name == "evaluate"
    label = "tuned" if tuned_rule else "base"
    out_dir = Path(outputs["scores"]).parent
    evaluation.env_threads(threads)
    specs = task_specs(ev)
    task_dir = out_dir / "tasks" / label
    evaluation.prepare_tasks(specs, task_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                  eval_jsonl=eval_jsonl, template=template)
    lm = evaluation.hf_lm(model_dir, batch_size=ev["batch_size"], trust_remote_code=bool(model["trust_remote_code"]))
    scores: dict[str, Any] = {"model": model_dir, "label": label,
                              "tasks": evaluation.score(lm, specs, task_dir, out_dir, label=label, log_samples=ev["log_samples"])}
    del lm
    if tuned_rule and gguf_dir and ev["gguf"] and any(s["local"] for s in specs):
        scores["gguf"] = evaluation.score_gguf_files(gguf_dir, specs, task_dir, out_dir, types=ev["gguf_types"],
                                          threads=threads, log_samples=ev["log_samples"])
    fileio.write_json(outputs["scores"], scores)
    artifacts = [outputs["scores"], *(t["results_file"] for t in scores["tasks"].values())]
    for g in (scores.get("gguf") or {}).values():
        artifacts += [t["results_file"] for t in g["tasks"].values()]
    tasks = {n: {label: t["score"], "limit": t["limit"], "metric": t["metric"],
                 "metrics": {m: {label: v} for m, v in scorecard.metric_values(t).items()}} for n, t in scores["tasks"].items()}
    for qtype, g in (scores.get("gguf") or {}).items():
        for n, t in g["tasks"].items():
            tasks[n][qtype] = t["score"]
            for m, v in scorecard.metric_values(t).items():
                tasks[n]["metrics"].setdefault(m, {})[qtype] = v
    tags = {f"gguf.{q}.path": g["file"] for q, g in (scores.get("gguf") or {}).items()}
    if not tuned_rule:
        return Result(figures={"tasks": tasks}, artifacts=artifacts, tags=tags, summary="; ".join(
            f"{n} ({t['metric']}, limit {t['limit']}): base {t['score']:.3f}" for n, t in scores["tasks"].items()))

    held = scores["tasks"].get("heldout")
    answers = [r["answer"] for r in evaluation.heldout_rows(task_dir, held["limit"])] if held else None
    comparison = scorecard.compare(json.loads(Path(base_scores).read_text()), scores, ev["headline"], answers)
    comparison.update(recipe=recipe, variant=variant)
    if contamination:
        scorecard.add_contamination(comparison, json.loads(Path(contamination).read_text()))
    if upstream:  # model.base: recipe:<name>: the whole way from the root base model to here
        comparison["chain"] = scorecard.chain(json.loads(Path(upstream).read_text()), comparison, recipe, upstream)
    fileio.write_json(outputs["compare"], comparison)
    scorecard.plot(comparison, outputs["plot"], title=f"{recipe} [{variant}]: base vs tuned" + (" vs GGUF" if scores.get("gguf") else ""))
    for n, c in comparison["tasks"].items():
        tasks[n].update(base=c["base"], delta=c["delta"])
        if (c.get("contamination") or {}).get("rows") is not None:
            tasks[n]["contaminated_rows"] = c["contamination"]["rows"]
        for m, entry in c["metrics"].items():
            tasks[n]["metrics"][m].update(base=entry["base"], delta=entry["delta"])
    head = comparison["headline"]
    figures: dict[str, Any] = {"tasks": tasks}
    lines = []
    if head:
        figures["headline"] = {k: v for k, v in head.items() if k != "gguf"} | dict(head.get("gguf") or {})
        lines.append("headline " + _chain_text(head["task"], head["metric"], head) + f" ({head['reason']})")
    for n, c in comparison["tasks"].items():
        gg = "".join(f" -> {q} {s:.3f}" for q, s in (c.get("gguf") or {}).items())
        base = "-" if c["base"] is None else f"{c['base']:.3f}"
        dirty = (c.get("contamination") or {}).get("rows")
        dirty = "" if dirty is None else f" [training rows matching its documents: {dirty}, {c['contamination']['action']}]"
        lines.append(f"{n} ({c['metric']}, limit {c['limit']}): base {base} -> tuned {c['tuned']:.3f}{gg}{dirty}")
        for m, entry in c["metrics"].items():
            if m != short_metric(c["metric"]) and (n, m) != (head.get("task"), head.get("metric")):
                lines.append(_chain_text(n, m, entry))
    for n, c in comparison["tasks"].items():
        if c.get("regressed"):
            se = f", standard error of the difference {c['delta_stderr']:.3f}" if c.get("delta_stderr") else ""
            warning = (f"{n}: the tuned model scores BELOW its base ({c['tuned']:.3f} < {c['base']:.3f}, "
                       f"delta {c['delta']:+.3f}{se}, limit {c['limit']})")
            log.warning(warning)
            lines.append("REGRESSED " + warning)
    for name in comparison["tasks"] if "chain" in comparison else ():
        lines.append(f"{name} chain: " + " -> ".join(
            f"{link['label']} {link['tasks'][name]:.3f}" for link in comparison["chain"]
            if link["tasks"].get(name) is not None))
    return Result(figures=figures, artifacts=[*artifacts, outputs["compare"], outputs["plot"]], tags=tags,
                  summary="; ".join(lines))



def _chain_text(task: str, metric: str, entry: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"
    gg = "".join(f" -> {q} {num(v)}" for q, v in (entry.get("gguf") or {}).items())
    return f"{task} {metric}: base {num(entry.get('base'))} -> tuned {num(entry.get('tuned'))}{gg}"
