"""lm-eval on the base model, the tuned model and its GGUF files, with tasks that run offline.

Task names in a recipe:
- `heldout`: generated here over the recipe's eval.jsonl. Each prompt is rendered with the chat
  template the model was trained with (chat_template.jinja from the format stage), so the model
  sees exactly the training format; generate_until, greedy, exact match on `answer` after
  stripping surrounding whitespace.
- `gsm8k_local`: lm-eval's own gsm8k task (`include:` of its YAML: prompts, few-shot, filters,
  metric) with the data read from a local JSONL; scored on the number after `####`.
- anything else: an lm-eval built-in task, which downloads its dataset from the hub.

Generated task YAMLs hold absolute paths: lm-eval resolves relative `data_files` against the
working directory, not the YAML's folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from tunesmith import fileio
from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith.evaluate")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASKS = ("heldout", "gsm8k_local")
# Metric reported per task; the other metrics stay in the lm-eval result files.
PRIMARY_METRIC = {"heldout": "exact_match,none", "gsm8k_local": "exact_match,strict-match"}
# End-of-turn markers of common chat templates: generation stops at the first one.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def default_gsm8k_file() -> Path:
    """../shared/data/gsm8k/test.jsonl beside the checkout (the reference data for tests and CI)."""
    return REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def task_specs(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Recipe evaluate.tasks (names or objects) -> one dict per task with every setting filled.
    section: the resolved evaluate section (schema defaults filled)."""
    specs = []
    for item in section["tasks"]:
        spec = {"name": item} if isinstance(item, str) else dict(item)
        spec.setdefault("limit", section["limit"])
        if spec["name"] == "gsm8k_local":
            # Chain-of-thought answers need room: lm-eval's gsm8k default, not the recipe's short one.
            spec.setdefault("max_gen_toks", 256)
        spec.setdefault("max_gen_toks", section["max_gen_toks"])
        spec["local"] = spec["name"] in LOCAL_TASKS
        specs.append(spec)
    return specs


# ---------------------------------------------------------------- local task files

def render_heldout(eval_jsonl: str | Path, template_path: str | Path, tokenizer: Any) -> list[dict[str, Any]]:
    """eval.jsonl rows -> {id, prompt_text, answer}, the prompt rendered with the training template."""
    from tunesmith.data.formatting import read_split

    template = Path(template_path).read_text(encoding="utf-8")
    rows = []
    for i, row in enumerate(read_split(eval_jsonl), 1):
        text = tokenizer.apply_chat_template(row["prompt"], chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        rows.append({"id": row.get("id", i), "prompt_text": text,
                     "answer": row.get("answer") or row["completion"][-1]["content"]})
    return rows


def write_heldout_task(rows: list[dict[str, Any]], task_dir: str | Path, *, max_gen_toks: int,
                       stop: list[str]) -> Path:
    task_dir = Path(task_dir).resolve()
    data = task_dir / "heldout.jsonl"
    fileio.write_jsonl(data, rows)
    config = {
        "task": "heldout",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt_text}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": stop, "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         # exact match after stripping surrounding whitespace on both sides
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    path = task_dir / "heldout.yaml"
    fileio.write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def write_gsm8k_task(task_dir: str | Path, *, data_files: str | Path | None = None, max_gen_toks: int = 256,
                     num_fewshot: int | None = None) -> Path:
    """lm-eval's gsm8k over a local test file; few-shot examples come from train.jsonl beside it, if any."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    test = Path(data_files or default_gsm8k_file()).resolve()
    if not test.is_file():
        raise TunesmithError(
            f"gsm8k_local: test file {test} not found. Give the task a local GSM8K JSONL "
            f"(rows with 'question' and 'answer' ending in '#### <number>'): "
            f"evaluate.tasks: [{{name: gsm8k_local, data_files: /path/to/test.jsonl}}]")
    files = {"test": str(test)}
    train = test.with_name("train.jsonl")
    if train.is_file() and train != test:
        files["train"] = str(train)
    config: dict[str, Any] = {
        "include": str(builtin),
        "task": "gsm8k_local",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "training_split": "train" if "train" in files else None,
        "fewshot_split": "train" if "train" in files else "test",
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": max_gen_toks},
    }
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    elif "train" not in files:
        config["num_fewshot"] = 0  # no train split: few-shot examples would leak test answers
    path = Path(task_dir).resolve() / "gsm8k_local.yaml"
    fileio.write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def stop_strings(tokenizer: Any) -> list[str]:
    vocab = tokenizer.get_vocab()
    stops = [t for t in TURN_ENDS if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def prepare_tasks(specs: list[dict[str, Any]], task_dir: str | Path, *, tokenizer: Any,
                  eval_jsonl: str | None = None, template: str | None = None) -> None:
    """Write the YAML (and data) of every local task into task_dir."""
    Path(task_dir).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec["name"] == "heldout":
            if not eval_jsonl or not template:
                raise TunesmithError("task 'heldout' needs the recipe's eval.jsonl and chat_template.jinja "
                                     "(a recipe without an SFT dataset has no held-out split)")
            rows = render_heldout(eval_jsonl, template, tokenizer)
            write_heldout_task(rows, task_dir, max_gen_toks=spec["max_gen_toks"], stop=stop_strings(tokenizer))
        elif spec["name"] == "gsm8k_local":
            write_gsm8k_task(task_dir, data_files=spec.get("data_files"), max_gen_toks=spec["max_gen_toks"],
                             num_fewshot=spec.get("num_fewshot"))


# ---------------------------------------------------------------- running lm-eval

def hf_lm(model_dir: str | Path, *, batch_size: int, trust_remote_code: bool = False) -> Any:
    import torch
    from lm_eval.models.huggingface import HFLM

    if not (Path(model_dir) / "config.json").is_file():
        raise TunesmithError(f"{model_dir}: not a model folder (no config.json) to evaluate")
    cuda = torch.cuda.is_available()
    # bf16 matmuls are slow on CPU; float32 there is both faster and exact.
    return HFLM(pretrained=str(model_dir), backend="causal", dtype="auto" if cuda else "float32",
                device="cuda" if cuda else "cpu", batch_size=batch_size, trust_remote_code=trust_remote_code)


def _offline_error(name: str, exc: BaseException, offline: bool) -> TunesmithError:
    why = "this run is offline" if offline else "the hub could not be reached"
    return TunesmithError(
        f"task '{name}' is an lm-eval built-in task whose dataset comes from the Hugging Face hub, and "
        f"{why} ({type(exc).__name__}). Point it at local data instead: use a local task "
        f"('heldout' for the recipe's held-out split, or {{name: gsm8k_local, data_files: /path/test.jsonl}} "
        f"for lm-eval's gsm8k over a local file), or set offline: false in config.yaml where the hub is reachable.")


def _is_network_error(exc: BaseException) -> bool:
    names = ("OfflineModeIsEnabled", "ConnectionError", "ConnectError", "LocalEntryNotFoundError",
             "DatasetNotFoundError", "HfHubHTTPError", "MaxRetryError")
    seen: BaseException | None = exc
    while seen is not None:
        if any(n in type(c).__name__ for c in type(seen).__mro__ for n in names):
            return True
        text = str(seen)
        if "offline" in text.lower() or "Couldn't reach" in text or "HF_HUB_OFFLINE" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_task(lm: Any, spec: dict[str, Any], task_manager: Any, out_dir: str | Path, *, label: str,
             log_samples: bool = False) -> dict[str, Any]:
    """One lm-eval task on one model; keeps lm-eval's result JSON (and samples) under out_dir/lm_eval/."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from tunesmith import settings

    name = spec["name"]
    if name not in task_manager.all_tasks:
        raise TunesmithError(f"evaluate.tasks: unknown task {name!r}: use 'heldout', 'gsm8k_local' or an "
                             f"lm-eval task name (python -m lm_eval ls tasks)")
    started = time.time()
    try:
        results = simple_evaluate(model=lm, tasks=[name], task_manager=task_manager, limit=spec["limit"],
                                  num_fewshot=spec.get("num_fewshot"), log_samples=log_samples,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    except TunesmithError:
        raise
    except Exception as exc:
        if not spec["local"] and _is_network_error(exc):
            raise _offline_error(name, exc, settings.offline()) from None
        raise
    seconds = time.time() - started
    assert results is not None
    samples = results.pop("samples", None)
    folder = Path(out_dir) / "lm_eval" / label
    result_file = folder / f"results_{name}.json"
    fileio.write_text(result_file, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    if samples and log_samples:
        for task, rows in samples.items():
            fileio.write_text(folder / f"samples_{task}.jsonl", "".join(
                json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    metrics = results["results"][name]
    metric = PRIMARY_METRIC.get(name) or next(k for k in metrics if k != "alias" and "_stderr" not in k)
    n = results.get("n-samples", {}).get(name, {})
    stderr_key = metric.replace(",", "_stderr,", 1)
    return {
        "metric": metric,
        "score": float(metrics[metric]),
        "stderr": metrics.get(stderr_key) if isinstance(metrics.get(stderr_key), (int, float)) else None,
        "limit": n.get("effective", spec["limit"]),
        "n_available": n.get("original"),
        "all_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k},
        "seconds": round(seconds, 1),
        "results_file": str(result_file),
    }


def score(lm: Any, specs: list[dict[str, Any]], task_dir: str | Path, out_dir: str | Path, *, label: str,
          log_samples: bool = False) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    # A TaskManager indexes lm-eval's ~15k built-in task files unless told not to: 15-20 s on 2 cores,
    # longer than scoring the held-out rows. Tasks tunesmith writes itself need none of them.
    task_manager = TaskManager(include_path=str(Path(task_dir).resolve()),
                               include_defaults=any(not spec["local"] for spec in specs))
    out = {}
    for spec in specs:
        out[spec["name"]] = run_task(lm, spec, task_manager, out_dir, label=label, log_samples=log_samples)
        log.info("%s %s: %s = %.4f (limit %s, %.0f s)", label, spec["name"], out[spec["name"]]["metric"],
                 out[spec["name"]]["score"], out[spec["name"]]["limit"], out[spec["name"]]["seconds"])
    return out


def score_model(model_dir: str | Path, tasks: list[Any], out_dir: str | Path, *, eval_jsonl: str | None = None,
                template: str | None = None, label: str = "model", **settings: Any) -> dict[str, Any]:
    """Score one HF model folder on the named tasks (used by the rules and to score by hand, e.g.
    `score_model(dir, [{"name": "gsm8k_local"}], out, limit=20)`). settings: evaluate-section keys
    (limit, batch_size, max_gen_toks, log_samples); the rest come from the recipe schema."""
    from transformers import AutoTokenizer

    from tunesmith.recipe import section_defaults

    section = section_defaults("evaluate", {**settings, "tasks": tasks})
    specs = task_specs(section)
    task_dir = Path(out_dir) / "tasks" / label
    prepare_tasks(specs, task_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                  eval_jsonl=eval_jsonl, template=template)
    lm = hf_lm(model_dir, batch_size=section["batch_size"])
    return {"model": str(model_dir), "label": label,
            "tasks": score(lm, specs, task_dir, out_dir, label=label, log_samples=section["log_samples"])}


def score_gguf_files(gguf_dir: str | Path, specs: list[dict[str, Any]], task_dir: str | Path,
                     out_dir: str | Path, *, types: list[str] | None = None, threads: int = 2,
                     log_samples: bool = False) -> dict[str, Any]:
    """Local tasks on each quantized GGUF (in-process llama.cpp), in report.json order."""
    from tunesmith.gguf_lm import LlamaCppLM

    report_path = Path(gguf_dir) / "report.json"
    if not report_path.is_file():
        raise TunesmithError(f"{gguf_dir}: no report.json (is it the quantize rule's output?)")
    files = json.loads(report_path.read_text())["files"]
    local = [s for s in specs if s["local"]]
    out: dict[str, Any] = {}
    for qtype, entry in files.items():
        if (types is None and qtype == "F16") or (types is not None and qtype not in types):
            continue  # F16 matches the tuned model to ~1e-3 in logits: scoring it costs time and says little
        lm = LlamaCppLM(Path(gguf_dir) / entry["file"], threads=threads)
        try:
            out[qtype] = {"file": str(Path(gguf_dir) / entry["file"]),
                          "tasks": score(lm, local, task_dir, out_dir, label=f"gguf-{qtype}", log_samples=log_samples)}
        finally:
            lm.close()
    return out


# ---------------------------------------------------------------- comparison

def _delta_stderr(p1: float, n1: int | None, p2: float, n2: int | None) -> float | None:
    if not n1 or not n2 or not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        return None
    return math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def compare(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
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
        tasks[name] = entry
    return {"base_model": base.get("model"), "tuned_model": tuned.get("model"), "tasks": tasks}


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
    plt = fileio.pyplot()

    tasks = list(comparison["tasks"])
    series = ["base", "tuned"] + sorted({q for t in comparison["tasks"].values() for q in t.get("gguf", {})},
                                        key=lambda q: ("Q8" not in q, q))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(tasks) * len(series) / 2), 3.6))
    width = 0.8 / len(series)
    # Fixed colours: matplotlib's cycle would paint the first GGUF bar the same blue as "tuned".
    palette = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    colors = {"base": "#9e9e9e", "tuned": "#1f77b4", **{q: palette[i % len(palette)] for i, q in enumerate(series[2:])}}
    for i, s in enumerate(series):
        values = [(t.get(s) if s in ("base", "tuned") else t.get("gguf", {}).get(s)) for t in comparison["tasks"].values()]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=s, color=colors.get(s))
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    labels = [f"{n}\n{t['metric'].split(',')[0]}, n={t['limit']}" for n, t in comparison["tasks"].items()]
    ax.set_xticks(range(len(tasks)), labels, fontsize=8)
    ax.set_ylim(0, 1.3)  # headroom for the legend above bars at 1.0
    ax.set_ylabel("score")
    ax.set_title(title or "base vs tuned" + (" vs GGUF" if len(series) > 2 else ""), fontsize=9)
    ax.legend(fontsize=7, ncol=len(series), loc="upper left")
    fileio.save_figure(fig, path)
    plt.close(fig)


def env_threads(threads: int) -> None:
    """torch and llama.cpp share the job's cores; more threads than that thrash a shared machine."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))


# ---------------------------------------------------------------- the stages

def stage(name: str, model_dir: str, outputs: dict[str, str], section: dict[str, Any], *, eval_jsonl: str | None,
          template: str | None, gguf_dir: str | None = None, base_scores: str | None = None, recipe: str,
          variant: str | None, threads: int = 2, upstream: str | None = None):
    """evaluate_base (the base model: writes `scores`) or evaluate (the tuned model, then each GGUF in
    gguf_dir, compared with base_scores: also writes `compare` and `plot`).
    Figures: tasks -> {base | tuned | <GGUF type>: score}."""
    from transformers import AutoTokenizer

    from tunesmith.result import Result

    ev, model = section["evaluate"], section["model"]
    tuned_rule = name == "evaluate"
    label = "tuned" if tuned_rule else "base"
    out_dir = Path(outputs["scores"]).parent
    env_threads(threads)
    specs = task_specs(ev)
    task_dir = out_dir / "tasks" / label
    prepare_tasks(specs, task_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                  eval_jsonl=eval_jsonl, template=template)
    lm = hf_lm(model_dir, batch_size=ev["batch_size"], trust_remote_code=bool(model["trust_remote_code"]))
    scores: dict[str, Any] = {"model": model_dir, "label": label,
                              "tasks": score(lm, specs, task_dir, out_dir, label=label, log_samples=ev["log_samples"])}
    del lm
    if tuned_rule and gguf_dir and ev["gguf"] and any(s["local"] for s in specs):
        scores["gguf"] = score_gguf_files(gguf_dir, specs, task_dir, out_dir, types=ev["gguf_types"],
                                          threads=threads, log_samples=ev["log_samples"])
    fileio.write_json(outputs["scores"], scores)
    artifacts = [outputs["scores"], *(t["results_file"] for t in scores["tasks"].values())]
    for g in (scores.get("gguf") or {}).values():
        artifacts += [t["results_file"] for t in g["tasks"].values()]
    tasks = {n: {label: t["score"], "limit": t["limit"], "metric": t["metric"]} for n, t in scores["tasks"].items()}
    for qtype, g in (scores.get("gguf") or {}).items():
        for n, t in g["tasks"].items():
            tasks[n][qtype] = t["score"]
    tags = {f"gguf.{q}.path": g["file"] for q, g in (scores.get("gguf") or {}).items()}
    if not tuned_rule:
        return Result(figures={"tasks": tasks}, artifacts=artifacts, tags=tags, summary="; ".join(
            f"{n} ({t['metric']}, limit {t['limit']}): base {t['score']:.3f}" for n, t in scores["tasks"].items()))

    comparison = compare(json.loads(Path(base_scores).read_text()), scores)
    comparison.update(recipe=recipe, variant=variant)
    if upstream:  # model.base: recipe:<name>: the whole way from the root base model to here
        comparison["chain"] = chain(json.loads(Path(upstream).read_text()), comparison, recipe, upstream)
    fileio.write_json(outputs["compare"], comparison)
    plot(comparison, outputs["plot"], title=f"{recipe} [{variant}]: base vs tuned" + (" vs GGUF" if scores.get("gguf") else ""))
    for n, c in comparison["tasks"].items():
        tasks[n].update(base=c["base"], delta=c["delta"])
    lines = []
    for n, c in comparison["tasks"].items():
        gg = "".join(f" -> {q} {s:.3f}" for q, s in (c.get("gguf") or {}).items())
        base = "-" if c["base"] is None else f"{c['base']:.3f}"
        lines.append(f"{n} ({c['metric']}, limit {c['limit']}): base {base} -> tuned {c['tuned']:.3f}{gg}")
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
    return Result(figures={"tasks": tasks}, artifacts=[*artifacts, outputs["compare"], outputs["plot"]], tags=tags,
                  summary="; ".join(lines))
