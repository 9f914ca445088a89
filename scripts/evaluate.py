"""Entry for evaluate_base (writes `scores`) and evaluate (also writes `compare` and `plot`).

evaluate scores the tuned model, then each quantized GGUF on the local tasks, and compares
with the base scores written by evaluate_base: base -> tuned -> Q8_0 -> Q4_K_M.
"""
from pathlib import Path

from tunesmith import evaluate, fileio, settings, tracking
from tunesmith.stage import StageIO, run


def _one(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value or None


def main(io: StageIO) -> None:
    section = io.params["section"]
    ev, model = section["evaluate"], section.get("model") or {}
    tuned_rule = "compare" in io.output
    model_dir = io.input["tuned"] if tuned_rule else io.input["base"]
    label = "tuned" if tuned_rule else "base"
    out_dir = Path(io.output["scores"]).parent
    evaluate.env_threads(io.threads)
    specs = evaluate.task_specs(ev)
    stage = "evaluate" if tuned_rule else "evaluate_base"
    with tracking.stage_run(stage, io.params, io.input, io.output, recipe=io.params["recipe"],
                            variant=io.params.get("variant"), results_dir=settings.results_dir(),
                            section=section) as rec:
        from transformers import AutoTokenizer

        task_dir = out_dir / "tasks" / label
        evaluate.prepare_tasks(specs, task_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                               eval_jsonl=_one(io.input.get("eval")), template=_one(io.input.get("template")))
        lm = evaluate.hf_lm(model_dir, batch_size=ev["batch_size"],
                            trust_remote_code=bool(model.get("trust_remote_code")))
        scores = {"model": model_dir, "label": label,
                  "tasks": evaluate.score(lm, specs, task_dir, out_dir, label=label, log_samples=ev["log_samples"])}
        del lm
        gguf_dir = _one(io.input.get("gguf"))
        if tuned_rule and gguf_dir and ev.get("gguf", True) and any(s["local"] for s in specs):
            scores["gguf"] = evaluate.score_gguf_files(gguf_dir, specs, task_dir, out_dir, types=ev.get("gguf_types"),
                                                       threads=io.threads, log_samples=ev["log_samples"])
        fileio.write_json(io.output["scores"], scores)
        rec.log_artifact(io.output["scores"])
        for name, t in scores["tasks"].items():
            rec.log_metrics({f"{name}.{label}": t["score"], f"{name}.limit": t["limit"]})
            rec.log_artifact(t["results_file"])
        for qtype, g in (scores.get("gguf") or {}).items():
            rec.set_tag(f"gguf.{qtype}.path", g["file"])
            for name, t in g["tasks"].items():
                rec.log_metrics({f"{name}.gguf_{qtype}": t["score"]})
                rec.log_artifact(t["results_file"])
        if tuned_rule:
            base = fileio_read(io.input["base_scores"])
            comparison = evaluate.compare(base, scores)
            comparison.update(recipe=io.params["recipe"], variant=io.params.get("variant"))
            fileio.write_json(io.output["compare"], comparison)
            evaluate.plot(comparison, io.output["plot"],
                          title=f"{io.params['recipe']} [{io.params.get('variant')}]: base vs tuned"
                                + (" vs GGUF" if scores.get("gguf") else ""))
            for name, c in comparison["tasks"].items():
                rec.log_metrics({f"{name}.base": c["base"], f"{name}.delta": c["delta"]})
            rec.log_artifact(io.output["compare"])
            rec.log_artifact(io.output["plot"])
            for name, c in comparison["tasks"].items():
                gg = "".join(f" -> {q} {s:.3f}" for q, s in (c.get("gguf") or {}).items())
                print(f"{name} ({c['metric']}, limit {c['limit']}): base {c['base']} -> tuned {c['tuned']:.3f}{gg}")
        else:
            for name, t in scores["tasks"].items():
                print(f"{name} ({t['metric']}, limit {t['limit']}): base {t['score']:.3f}")


def fileio_read(path):
    import json

    return json.loads(Path(path).read_text())


if __name__ == "__main__":
    run(main, "evaluate")
