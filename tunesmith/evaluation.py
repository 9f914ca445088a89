"""lm-eval on the base model, the tuned model and its GGUF files, with tasks that run offline.

Task names in a recipe:
- `heldout`: generated here over the recipe's eval.jsonl. Each prompt is rendered with the chat
  template the model was trained with (chat_template.jinja from the format stage), so the model
  sees exactly the training format; generate_until, greedy, exact match on `answer` after
  stripping surrounding whitespace. Exact match is 0 for any long answer (code, chat), so the task
  also reports chrF of the greedy answer against the reference (lm-eval's own `chrf` metric, i.e.
  sacrebleu's corpus chrF, 0-100) and the reference answer's mean log-likelihood per token and
  perplexity under the model (lm-eval's loglikelihood requests, on the same rows, for base,
  tuned and every GGUF).
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
from tunesmith.tasks import LOWER_IS_BETTER, PRIMARY_METRIC, TURN_ENDS, default_gsm8k_file, task_specs

log = logging.getLogger("tunesmith.evaluate")



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
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]},
                        # lm-eval's registered chrf: a passthrough scored by sacrebleu.corpus_chrf
                        {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}],
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
            # the hub libraries' own switch, which the workflow sets when config.yaml says offline
            raise _offline_error(name, exc, os.environ.get("HF_HUB_OFFLINE") == "1") from None
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
    all_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k}
    return {
        "metric": metric,
        "score": float(metrics[metric]),
        "stderr": metrics.get(stderr_key) if isinstance(metrics.get(stderr_key), (int, float)) else None,
        "limit": n.get("effective", spec["limit"]),
        "n_available": n.get("original"),
        "all_metrics": all_metrics,
        # the primary metric first, then the rest, under names a recipe can write (evaluate.headline)
        # ("sample_len" and the like are counts, not metrics: lm-eval names metrics "<metric>,<filter>")
        "metrics": {short_metric(k): float(v) for k, v in sorted(all_metrics.items(), key=lambda kv: kv[0] != metric)
                    if "," in k},
        "seconds": round(seconds, 1),
        "results_file": str(result_file),
    }


def short_metric(key: str) -> str:
    """lm-eval's 'exact_match,none' -> 'exact_match'; a real filter stays ('exact_match,strict-match')."""
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else key


def reference_likelihood(lm: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean log-likelihood per token of each row's reference answer after its rendered prompt, and
    the perplexity that goes with it (token-weighted over all rows). lm-eval's own loglikelihood
    requests score it, so HF models and GGUFs (tunesmith.gguf_lm) are measured the same way; tokens
    are counted with the model's own context/continuation split."""
    from lm_eval.api.instance import Instance

    rows = [r for r in rows if r["answer"]]
    if not rows:
        return {}
    requests = [Instance(request_type="loglikelihood", doc=r, arguments=(r["prompt_text"], r["answer"]), idx=0)
                for r in rows]
    lls = [ll for ll, _ in lm.loglikelihood(requests)]
    tokens = sum(len(lm._encode_pair(r["prompt_text"], r["answer"])[1]) for r in rows)
    mean = sum(lls) / max(1, tokens)
    return {"ref_logprob": mean, "ref_perplexity": math.exp(-mean), "ref_tokens": tokens}


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
        if spec["name"] == "heldout":  # lm-eval's limit is the first N docs: score the same rows
            lines = (Path(task_dir) / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()][: out["heldout"]["limit"] or None]
            ref = reference_likelihood(lm, rows)
            out["heldout"]["ref_tokens"] = ref.pop("ref_tokens", 0)
            out["heldout"]["metrics"].update(ref)
        log.info("%s %s: %s = %.4f (limit %s, %.0f s)", label, spec["name"], out[spec["name"]]["metric"],
                 out[spec["name"]]["score"], out[spec["name"]]["limit"], out[spec["name"]]["seconds"])
    return out


def score_model(model_dir: str | Path, tasks: list[Any], out_dir: str | Path, *, eval_jsonl: str | None = None,
                template: str | None = None, label: str = "model", **settings: Any) -> dict[str, Any]:
    """Score one HF model folder on the named tasks (used by the rules and to score by hand, e.g.
    `score_model(dir, [{"name": "gsm8k_local"}], out, limit=20)`). settings: evaluate-section keys
    (limit, batch_size, max_gen_toks, log_samples); the rest come from the recipe schema."""
    from transformers import AutoTokenizer

    from tunesmith.schema import section_defaults

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


def _metrics(task: dict[str, Any], metric: str | None = None) -> dict[str, float]:
    """A task's figures by short name (scores written before free-form metrics have only one)."""
    return task.get("metrics") or {short_metric(task.get("metric") or metric or "score"): task["score"]}


def metric_table(name: str, b: dict[str, Any] | None, t: dict[str, Any], gguf: dict[str, Any] | None) -> dict[str, Any]:
    """Every figure of one task: base, tuned, delta and each GGUF's, with its direction."""
    out = {}
    for metric, value in _metrics(t).items():
        before = _metrics(b).get(metric) if b else None
        entry: dict[str, Any] = {"base": before, "tuned": value,
                                 "delta": None if before is None else value - before,
                                 "higher_is_better": metric not in LOWER_IS_BETTER}
        scores = {q: _metrics(g["tasks"][name], t["metric"]).get(metric) for q, g in (gguf or {}).items()
                  if name in g["tasks"]}
        if any(v is not None for v in scores.values()):
            entry["gguf"] = {q: v for q, v in scores.items() if v is not None}
        out[metric] = entry
    return out


def headline(comparison: dict[str, Any], wanted: dict[str, str] | None) -> dict[str, Any]:
    """The recipe's headline figure (evaluate.headline; null: the first task's primary metric),
    from the comparison's tasks. An unknown metric names the ones the task has."""
    import difflib

    tasks = comparison["tasks"]
    if not tasks:
        return {}
    task = wanted["task"] if wanted else next(iter(tasks))
    if task not in tasks:
        raise TunesmithError(f"evaluate.headline.task '{task}' was not scored (tasks: {', '.join(tasks)})")
    metrics = tasks[task]["metrics"]
    metric = wanted["metric"] if wanted else short_metric(tasks[task]["metric"])
    if metric not in metrics:
        near = difflib.get_close_matches(metric, list(metrics), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise TunesmithError(f"evaluate.headline.metric '{metric}': task '{task}' has no such metric; "
                             f"{hint}it reports {', '.join(metrics)}")
    return {"task": task, "metric": metric, **metrics[metric]}


def compare(base: dict[str, Any], tuned: dict[str, Any], wanted_headline: dict[str, str] | None = None) -> dict[str, Any]:
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
    return {"headline": headline(out, wanted_headline), **out}


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


def env_threads(threads: int) -> None:
    """torch and llama.cpp share the job's cores; more threads than that thrash a shared machine."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))


# ---------------------------------------------------------------- the stages

def stage(name: str, model_dir: str, outputs: dict[str, str], section: dict[str, Any], *, eval_jsonl: str | None,
          template: str | None, gguf_dir: str | None = None, base_scores: str | None = None, recipe: str,
          variant: str | None, threads: int = 2, upstream: str | None = None, contamination: str | None = None):
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
    tasks = {n: {label: t["score"], "limit": t["limit"], "metric": t["metric"],
                 "metrics": {m: {label: v} for m, v in _metrics(t).items()}} for n, t in scores["tasks"].items()}
    for qtype, g in (scores.get("gguf") or {}).items():
        for n, t in g["tasks"].items():
            tasks[n][qtype] = t["score"]
            for m, v in _metrics(t).items():
                tasks[n]["metrics"].setdefault(m, {})[qtype] = v
    tags = {f"gguf.{q}.path": g["file"] for q, g in (scores.get("gguf") or {}).items()}
    if not tuned_rule:
        return Result(figures={"tasks": tasks}, artifacts=artifacts, tags=tags, summary="; ".join(
            f"{n} ({t['metric']}, limit {t['limit']}): base {t['score']:.3f}" for n, t in scores["tasks"].items()))

    comparison = compare(json.loads(Path(base_scores).read_text()), scores, ev["headline"])
    comparison.update(recipe=recipe, variant=variant)
    if contamination:
        add_contamination(comparison, json.loads(Path(contamination).read_text()))
    if upstream:  # model.base: recipe:<name>: the whole way from the root base model to here
        comparison["chain"] = chain(json.loads(Path(upstream).read_text()), comparison, recipe, upstream)
    fileio.write_json(outputs["compare"], comparison)
    plot(comparison, outputs["plot"], title=f"{recipe} [{variant}]: base vs tuned" + (" vs GGUF" if scores.get("gguf") else ""))
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
        lines.append("headline " + _chain_text(head["task"], head["metric"], head))
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

